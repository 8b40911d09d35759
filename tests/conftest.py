"""Shared test settings: offline, the course's data, a throw-away home folder, a small trained tokenizer."""
import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
# fp32 unless a run asks otherwise: on a CPU with fast bf16 (AMX) the dtype would otherwise be measured and change
# which tolerances the exactness tests need; tests of the dtype choice unset it themselves.
for key, value in {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_UPDATE_DOWNLOAD_COUNTS": "0",
                   "MPLBACKEND": "Agg", "NANOCHAT_DTYPE": "fp32"}.items():
    os.environ.setdefault(key, value)
if not os.environ.get("NANOCHAT_DATA") and (REPO.parent / "shared" / "data").is_dir():
    os.environ["NANOCHAT_DATA"] = str(REPO.parent / "shared" / "data")


# Under pytest-xdist (`make test` runs one worker per core, `--dist loadgroup`) a file's tests stay on one worker, so
# its module fixtures (trained runs, servers) are built once; the chapter and lesson runs are independent and long,
# so they spread over the workers one by one.
SPREAD_ONE_BY_ONE = {"test_notebooks.py", "test_lessons.py"}


def pytest_collection_modifyitems(items):
    for item in items:
        if item.path.name not in SPREAD_ONE_BY_ONE:
            item.add_marker(pytest.mark.xdist_group(item.path.name))


@pytest.fixture(scope="session", autouse=True)
def nanochat_home(tmp_path_factory):
    "Every test session writes to its own home folder, never to the user's cache."
    home = tmp_path_factory.mktemp("nanochat_home")
    os.environ["NANOCHAT_HOME"] = str(home)
    return home


@pytest.fixture(scope="session")
def data_root() -> Path:
    root = Path(os.environ["NANOCHAT_DATA"])
    assert (root / "pretrain").is_dir(), f"tests need the course data at {root} (set NANOCHAT_DATA)"
    return root


@pytest.fixture(scope="session")
def tokenizer(tmp_path_factory, data_root):
    "A real BPE tokenizer (vocab 2048) trained on 2M characters of the first training shard, saved to disk."
    from nanochat_nb.tokenizer import Tokenizer
    import pyarrow.parquet as pq
    texts = pq.read_table(data_root / "pretrain" / "shard_00000.parquet", columns=["text"]).column("text").to_pylist()
    budget, sample = 2_000_000, []
    for text in texts:
        sample.append(text[:budget])
        budget -= len(sample[-1])
        if budget <= 0:
            break
    tok = Tokenizer.train(iter(sample), vocab_size=2048)
    folder = tmp_path_factory.mktemp("tokenizer")
    tok.save(folder)
    tok.folder = folder
    return tok


def run_python(*args, env=None, timeout=600, cwd=REPO):
    "Run `python *args` in a subprocess; return the CompletedProcess (stdout and stderr as text)."
    import subprocess
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=full_env, timeout=timeout, cwd=cwd)


def one_line_error(done, prog: str) -> str:
    "The message of a command that failed on bad input: exit code 2, one line on stderr, no traceback."
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-3000:]
    assert done.stderr.count("\n") == 1 and done.stderr.startswith(f"{prog}: "), done.stderr
    return done.stderr.strip()


def assert_user_error(capsys, message, fn, *args):
    "fn(*args), in this process, exits with code 2 and one stderr line containing `message`, no traceback."
    import pytest
    with pytest.raises(SystemExit) as error:
        fn(*args)
    err = capsys.readouterr().err.strip()
    assert error.value.code == 2, err
    assert message in err and len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


@pytest.fixture(scope="module")
def one_thread():
    "Tiny models decode fastest on one thread (on a busy machine, threads waiting for each other cost milliseconds)."
    import torch
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def byte_tokenizer():
    "A byte-level tokenizer (no merges): instant, with all the special tokens."
    from nanochat_nb.tokenizer import Tokenizer
    return Tokenizer({bytes([i]): i for i in range(256)})


# The chat test model speaks only these letters: each pair (a, b) gets lm_head rows +30 e_k and -30 e_k, so whatever
# the hidden state, some letter's logit is far above the stop tokens' (rows of zeros): answers never end early.
SPOKEN = "etaoin srhldcumfpgwy"


def chatty_model(tokenizer, sequence_len=8192):
    "A depth-2 GPT on a byte-level tokenizer that answers in the letters of SPOKEN and never stops early."
    import torch
    from nanochat_nb.gpt import GPT, GPTConfig
    torch.manual_seed(0)
    model = GPT(GPTConfig(sequence_len=sequence_len, vocab_size=tokenizer.vocab_size, n_layer=2, n_head=2,
                          n_kv_head=2, n_embd=64)).init_weights()
    with torch.no_grad():
        model.lm_head.weight.zero_()
        for k, (a, b) in enumerate(zip(SPOKEN[:10], SPOKEN[10:])):
            model.lm_head.weight[ord(a), k], model.lm_head.weight[ord(b), k] = 30.0, -30.0
    return model.eval()
