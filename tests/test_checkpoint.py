"""The run folder (appendix chapter, checkpoint.py): complete-or-invisible checkpoints, named damage, identity checks,
one run per folder, --resume-step, no non-finite weights, no pickle, and one-line errors from the train command."""
import json
import os
import pickle
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import REPO, assert_user_error, one_line_error, run_python
from nanochat_nb import checkpoint
from nanochat_nb.checkpoint import CheckpointError, load, load_model, save, steps
from nanochat_nb.common import read_log
from nanochat_nb.gpt import GPT, GPTConfig
from nanochat_nb.tokenizer import Tokenizer
from nanochat_nb.train import BASE_LRS, Trainer, main

SHARDS = Path(os.environ["NANOCHAT_DATA"]) / "pretrain"   # the course's real shards (conftest sets the variable)
FAST_LRS = [flag for name, lr in BASE_LRS.items() if name != "smear"
            for flag in (f"--{name.replace('_', '-')}-lr", str(10 * lr))]
TINY = ["--depth", "2", "--max-seq-len", "128", "--device-batch-size", "4", "--total-batch-size", "1024",
        "--num-iterations", "12", "--warmup-steps", "2", "--compile", "off", "--sample-every", "-1",
        "--eval-every", "-1", "--eval-tokens", "4096", "--save-every", "4", *FAST_LRS]


def flags(tokenizer, run_dir, *extra):
    return [*TINY, "--tokenizer-dir", str(tokenizer.folder), "--run-dir", str(run_dir), *extra]


def losses(run_dir: Path) -> dict:
    return {r["step"]: r["loss"] for r in read_log(run_dir / "log.jsonl") if "loss" in r}


def folder_digest(folder: Path) -> dict:
    return {p.name: checkpoint.file_digest(p)["sha256"] for p in sorted(folder.iterdir()) if p.is_file()}


@pytest.fixture(scope="module")
def run12(tokenizer, tmp_path_factory):
    "A real tiny run: 12 steps, checkpoints at 4, 8 and 12."
    run_dir = tmp_path_factory.mktemp("run12")
    main(flags(tokenizer, run_dir))
    assert steps(run_dir) == [4, 8, 12]
    return run_dir


@pytest.fixture
def run_copy(run12, tmp_path):
    "A copy of the run folder to damage."
    target = tmp_path / "run"
    shutil.copytree(run12, target)
    return target


@pytest.fixture(scope="module")
def other_tokenizer(tmp_path_factory, tokenizer):
    "A real tokenizer of the same size as `tokenizer`, trained on other text."
    import pyarrow.parquet as pq
    texts = pq.read_table(SHARDS / "shard_00003.parquet", columns=["text"]).column("text").to_pylist()[:300]
    tok = Tokenizer.train(iter(texts), vocab_size=tokenizer.vocab_size)
    folder = tmp_path_factory.mktemp("other_tokenizer")
    tok.save(folder)
    tok.folder = folder
    assert checkpoint.tokenizer_fingerprint(tok) != checkpoint.tokenizer_fingerprint(tokenizer)
    return tok


def tiny_model() -> GPT:
    config = GPTConfig(sequence_len=64, vocab_size=512, n_layer=2, n_head=2, n_kv_head=2, n_embd=128)
    return GPT(config).init_weights()


# ---- 1. complete or invisible; damage is named; nothing is unpickled ------------------------------------------
def test_resave_that_dies_halfway_leaves_no_mixed_set(tmp_path, monkeypatch):
    model = tiny_model()
    save(tmp_path, 10, model, {"moment": torch.ones(3)})
    with torch.no_grad():
        model.lm_head.weight.mul_(2)
    real = checkpoint.save_tensors

    def die_after_the_optimizer_shard(path, obj):
        if path.name.startswith("model_"):
            raise KeyboardInterrupt("killed")
        return real(path, obj)
    monkeypatch.setattr(checkpoint, "save_tensors", die_after_the_optimizer_shard)
    with pytest.raises(KeyboardInterrupt):
        save(tmp_path, 10, model, {"moment": torch.zeros(3)})
    assert steps(tmp_path) == [] and not list(tmp_path.glob(".*.tmp*"))   # uncommitted, not mixed
    monkeypatch.setattr(checkpoint, "save_tensors", real)
    save(tmp_path, 10, model, {"moment": torch.zeros(3)})
    state, optim, _ = load(tmp_path, 10)
    assert torch.equal(state["lm_head.weight"], model.lm_head.weight) and torch.equal(optim["moment"], torch.zeros(3))


@pytest.mark.parametrize("damage, message", [
    ("truncate model", "model_000008.pt in .* is damaged \\(.* bytes where meta_000008.json records"),
    ("flip a byte of the model", "model_000008.pt in .* is damaged \\(the size meta_000008.json records, other"),
    ("swap in another step's model", "model_000008.pt in .* is damaged"),
    ("truncate the optimizer", "optim_000008_rank0.pt in .* is damaged"),
    ("delete the optimizer", "optim_000008_rank0.pt is missing"),
    ("truncate meta", "meta_000008.json in .* is damaged \\(not valid JSON"),
])
def test_damaged_files_are_named_with_the_way_back(run_copy, damage, message):
    model, optim, meta = run_copy / "model_000008.pt", run_copy / "optim_000008_rank0.pt", run_copy / "meta_000008.json"
    if damage == "truncate model":
        model.write_bytes(model.read_bytes()[:-100])
    elif damage == "flip a byte of the model":
        data = bytearray(model.read_bytes())
        data[len(data) // 2] ^= 0xFF
        model.write_bytes(bytes(data))
    elif damage == "swap in another step's model":
        shutil.copy(run_copy / "model_000004.pt", model)
    elif damage == "truncate the optimizer":
        optim.write_bytes(optim.read_bytes()[:1000])
    elif damage == "delete the optimizer":
        optim.unlink()
    elif damage == "truncate meta":
        meta.write_text(meta.read_text()[:200])
    with pytest.raises(CheckpointError, match=message) as error:
        load(run_copy, 8)
    assert "step 4, is usable" in str(error.value) and "--resume-step 4" in str(error.value)
    load(run_copy, 4)   # the earlier checkpoint is untouched and loads


def test_resume_from_a_damaged_checkpoint_is_one_line(run_copy, tokenizer, capsys):
    model = run_copy / "model_000012.pt"
    model.write_bytes(model.read_bytes()[: model.stat().st_size // 2])
    err = assert_user_error(capsys, "model_000012.pt in", main, flags(tokenizer, run_copy, "--resume"))
    assert "--resume-step 8" in err


def test_nothing_is_unpickled(tmp_path):
    marker = tmp_path / "code_ran"

    class Exploit:
        def __reduce__(self):
            return (Path.touch, (marker,))
    save(tmp_path, 1, tiny_model())
    meta = json.loads((tmp_path / "meta_000001.json").read_text())
    del meta["files"]   # whoever doctored the model file can doctor the meta file too
    (tmp_path / "meta_000001.json").write_text(json.dumps(meta))
    with open(tmp_path / "model_000001.pt", "wb") as f:
        pickle.dump({"w": Exploit()}, f, protocol=2)
    with pytest.raises(CheckpointError, match="model_000001.pt in .* cannot be read"):
        load_model(tmp_path)
    assert not marker.exists()
    with pytest.raises(CheckpointError, match="pickled"):
        checkpoint.set_rng_state("gASVAAAAAAAAAAA=")   # the old meta format: a base64 pickle, refused


def test_meta_is_json_and_random_states_round_trip(run12):
    meta = json.loads((run12 / "meta_000008.json").read_text())
    assert set(meta["files"]) == {"model_000008.pt", "optim_000008_rank0.pt"}
    assert meta["tokenizer"] and meta["data"] and meta["model_config"]["n_layer"] == 2
    state = json.loads(json.dumps(checkpoint.rng_state()))
    a = (torch.rand(3), torch.randint(10, (3,)))
    checkpoint.set_rng_state(state)
    assert torch.equal(torch.rand(3), a[0]) and torch.equal(torch.randint(10, (3,)), a[1])


# ---- 2. identity: tokenizer, data, model -----------------------------------------------------------------------
def test_another_tokenizer_of_the_same_size_is_refused_and_never_overwrites(run_copy, tokenizer, other_tokenizer,
                                                                             capsys):
    before = folder_digest(run_copy / "tokenizer")
    argv = [*TINY, "--tokenizer-dir", str(other_tokenizer.folder), "--run-dir", str(run_copy), "--resume"]
    assert_user_error(capsys, "holds a different tokenizer", main, argv)
    assert folder_digest(run_copy / "tokenizer") == before
    shutil.rmtree(run_copy / "tokenizer")   # even without the copy, the checkpoint's fingerprint refuses it
    assert_user_error(capsys, "was trained with another tokenizer", main, argv)
    main([*argv, "--allow-mismatch", "tokenizer", "--num-iterations", "13"])   # explicitly asked: it goes on
    assert steps(run_copy)[-1] == 13


def test_evaluation_tokenizer_is_checked_against_the_checkpoint(run12, other_tokenizer):
    _, meta = load_model(run12)
    assert checkpoint.load_checkpoint_tokenizer(run12, meta).vocab_size == meta["model_config"]["vocab_size"]
    with pytest.raises(checkpoint.CheckpointMismatch, match="another tokenizer"):
        checkpoint.load_checkpoint_tokenizer(run12, meta, other_tokenizer.folder)


def make_data_folder(root: Path, shard_numbers) -> Path:
    "A data folder whose pretrain/ holds links to some of the course's real shards (the last one: validation)."
    (root / "pretrain").mkdir(parents=True, exist_ok=True)
    for i, n in enumerate(shard_numbers):
        (root / "pretrain" / f"shard_{i:05d}.parquet").symlink_to(SHARDS / f"shard_{n:05d}.parquet")
    return root


def test_resuming_over_other_shards_is_refused(tokenizer, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("NANOCHAT_DATA", str(make_data_folder(tmp_path / "data", [0, 1, 6])))
    run_dir = tmp_path / "run"
    main(flags(tokenizer, run_dir, "--num-iterations", "4"))
    (tmp_path / "data" / "pretrain" / "shard_00003.parquet").symlink_to(SHARDS / "shard_00002.parquet")   # a 4th
    resume = flags(tokenizer, run_dir, "--num-iterations", "6", "--resume")
    assert_user_error(capsys, "trained on other data: it trained on 3 shards, the data folder now gives 4", main, resume)
    assert steps(run_dir) == [4]
    main([*resume, "--allow-mismatch", "data"])
    assert steps(run_dir) == [4, 6]


# ---- 3. one run per folder ---------------------------------------------------------------------------------------
def test_a_second_run_into_a_busy_folder_fails_at_once_naming_the_holder(tokenizer, tmp_path, capsys):
    run_dir = tmp_path / "run"
    first = subprocess.Popen([sys.executable, "-m", "nanochat_nb.train",
                              *flags(tokenizer, run_dir, "--num-iterations", "100000", "--save-every", "-1")],
                             cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while not ((run_dir / "log.jsonl").exists() and losses(run_dir)):   # the first run is training
            assert first.poll() is None, first.stderr.read()[-3000:]
            assert time.time() < deadline, "the first run did not start training"
            time.sleep(0.5)
        log_before = (run_dir / "log.jsonl").stat().st_size
        started = time.time()
        assert_user_error(capsys, f"is in use by another run (PID {first.pid})", main, flags(tokenizer, run_dir))
        assert time.time() - started < 10
        assert first.poll() is None and (run_dir / "log.jsonl").exists()   # the first run's log was not renamed
        time.sleep(1)
        assert (run_dir / "log.jsonl").stat().st_size >= log_before
        assert not list(run_dir.glob("log.*.jsonl"))
    finally:
        first.kill()
        first.wait()
    main(flags(tokenizer, run_dir, "--num-iterations", "2"))   # a killed holder leaves no stale lock behind


# ---- 4. --resume-step moves the later checkpoints aside -----------------------------------------------------------
def test_resume_step_sets_the_later_checkpoints_aside(run_copy, run12, tokenizer, capsys):
    original = {name: digest for name, digest in folder_digest(run_copy).items() if "_0000" in name}
    main(flags(tokenizer, run_copy, "--resume-step", "4"))
    out = capsys.readouterr().out
    aside = [p for p in run_copy.iterdir() if p.name.startswith("abandoned_")]
    assert len(aside) == 1 and f"moved to {aside[0]}" in out
    assert sorted(p.name for p in aside[0].iterdir()) == sorted(n for n in original if "000008" in n or "000012" in n)
    assert all(folder_digest(aside[0])[name] == original[name] for name in folder_digest(aside[0]))   # nothing lost
    assert steps(run_copy) == [4, 8, 12]   # re-trained from step 4
    assert {s: losses(run_copy)[s] for s in range(5, 13)} == {s: losses(run12)[s] for s in range(5, 13)}


# ---- 5. non-finite weights are never saved ---------------------------------------------------------------------------
def poison_after_update(monkeypatch, step: int):
    "Make the weights NaN right after the optimizer update of training step `step`."
    update = Trainer._optimizer_step

    def poisoned(self):
        update(self)
        if self.state.step + 1 == step:
            with torch.no_grad():
                self.model.lm_head.weight.fill_(float("nan"))
    monkeypatch.setattr(Trainer, "_optimizer_step", poisoned)


def test_nan_on_a_save_step_is_not_saved(tokenizer, tmp_path, monkeypatch, capsys):
    poison_after_update(monkeypatch, 8)
    err = assert_user_error(capsys, "lm_head.weight holds a NaN or an infinity at step 8", main, flags(tokenizer, tmp_path))
    assert "the last good checkpoint is step 4" in err
    assert steps(tmp_path) == [4] and not (tmp_path / "model_000008.pt").exists()


def test_nan_after_the_last_update_fails_the_run(tokenizer, tmp_path, monkeypatch, capsys):
    poison_after_update(monkeypatch, 12)
    err = assert_user_error(capsys, "holds a NaN or an infinity at step 12", main, flags(tokenizer, tmp_path))
    assert "the last good checkpoint is step 8" in err and steps(tmp_path) == [4, 8]


def test_nan_validation_stops_the_run(tokenizer, tmp_path, monkeypatch, capsys):
    poison_after_update(monkeypatch, 6)
    err = assert_user_error(capsys, "validation bits per byte became nan at step 6", main,
                            flags(tokenizer, tmp_path, "--eval-every", "6"))
    assert "the last good checkpoint is step 4" in err and steps(tmp_path) == [4]


# ---- 6. one-line errors from the train command ------------------------------------------------------------------------
@pytest.mark.parametrize("extra, env, message", [
    (["--preset", "nope"], {}, "Unknown preset 'nope'"),
    (["--emulate-ranks", "0"], {}, "--emulate-ranks must be a positive number of ranks, got 0"),
    ([], {"NANOCHAT_HOME": "/proc/version/home"}, "NANOCHAT_HOME"),
])
def test_train_command_errors_are_one_line(tokenizer, tmp_path, extra, env, message):
    run_dir = [] if env else ["--run-dir", str(tmp_path / "run")]
    argv = [*TINY, "--tokenizer-dir", str(tokenizer.folder), *run_dir, *extra]
    done = run_python("-m", "nanochat_nb.train", *argv, env=env)
    assert message in one_line_error(done, "nanochat-base-train")
