"""Chat tasks on the course's real data: GSM8K's calculator calls, mixtures and slicing, malformed records,
scoring rules (GSM8K, letters, HumanEval in its sandbox, spelling), and the hub path against a local server."""
import http.server
import json
import shutil
import threading
import time
from collections import Counter

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from nanochat_nb import tasks
from nanochat_nb.common import UserError
from nanochat_nb.engine import Calculator
from nanochat_nb.tasks import (ARC, GSM8K, MMLU, AlpacaSeed, DollyHH, HumanEval, IdentityConversations, SmolTalk,
                               SpellingBee, TaskMixture, TaskSequence, run_program)
from nanochat_nb.tokenizer import normalize_conversation


@pytest.fixture(scope="module")
def gsm8k_train():
    return GSM8K("train")


@pytest.fixture(scope="module")
def humaneval():
    return HumanEval(timeout=3)


# ---------------------------------------------------------------------------------------------------------------
# GSM8K

def test_every_gsm8k_calculator_call_gives_the_annotated_result(gsm8k_train):
    "All 7,473 training answers: each python part, run by the engine's calculator, gives the python_output after it."
    calculator, calls = Calculator(), 0
    assert len(gsm8k_train) == 7473 and gsm8k_train.skipped == 0
    for conversation in gsm8k_train:
        parts = conversation["messages"][1]["content"]
        for part, result in zip(parts, parts[1:]):
            if part["type"] == "python":
                assert result["type"] == "python_output"
                assert tasks.same_answer(calculator(part["text"]), result["text"]), (part, result)
                calls += 1
    assert calls == 23716


def test_gsm8k_conversion_keeps_the_text():
    "Putting the parts back together gives the original answer, annotations included."
    raw = [json.loads(line) for line in open(tasks.chat_data("gsm8k", "test.jsonl"))]
    test = GSM8K("test")
    assert len(test) == len(raw) == 1319
    for row, conversation in zip(raw[:200], test):
        text = ""
        for part in conversation["messages"][1]["content"]:
            text += {"text": "{}", "python": "<<{}=", "python_output": "{}>>"}[part["type"]].format(part["text"])
        assert text == row["answer"] and conversation["messages"][0]["content"] == row["question"]


def test_gsm8k_scorer(gsm8k_train):
    item = gsm8k_train[0]  # Natalia's clips: 72
    assert gsm8k_train.evaluate(item, "48/2 = 24, 48 + 24 = 72.\n#### 72")
    assert gsm8k_train.evaluate(item, "#### 72.0") and gsm8k_train.evaluate(item, "#### 7 and then #### 72")
    assert not gsm8k_train.evaluate(item, "#### 71") and not gsm8k_train.evaluate(item, "The answer is 72.")
    assert not gsm8k_train.evaluate(item, "#### 720")
    big = {"messages": [{"role": "user", "content": "?"}, {"role": "assistant", "content": [
        {"type": "text", "text": "#### 1,234,567"}]}]}
    assert gsm8k_train.evaluate(big, "#### 1234567") and gsm8k_train.evaluate(big, "#### 1,234,567")
    assert not gsm8k_train.evaluate(big, "#### 1,234,568")


# ---------------------------------------------------------------------------------------------------------------
# slicing, mixtures, sequences

def answers(task):
    return [c["messages"][1]["content"] for c in task]


def test_slicing_follows_python():
    full = answers(DollyHH())
    for start, stop, step in [(0, None, 1), (10, 50, 3), (-20, None, 2), (5, -900, 1), (900, 10, -7), (2000, None, 1)]:
        task = DollyHH(start=start, stop=stop, step=step)
        assert answers(task) == full[start:stop:step] and len(task) == len(full[start:stop:step])
    task = DollyHH(start=10, stop=20)
    assert task[-1] == task[9] and task[2:4] == [task[2], task[3]]
    with pytest.raises(IndexError):
        task[10]


def test_mixture_is_deterministic_and_counts_epochs():
    alpaca, dolly = AlpacaSeed(), DollyHH(stop=100)
    mix = TaskMixture([alpaca, dolly, dolly], seed=7)
    again = TaskMixture([AlpacaSeed(), DollyHH(stop=100), DollyHH(stop=100)], seed=7)
    other = TaskMixture([alpaca, dolly, dolly], seed=8)
    assert len(mix) == 175 + 2 * 100
    assert answers(mix) == answers(again) and answers(mix) != answers(other)
    assert Counter(answers(mix)) == Counter(answers(alpaca) + 2 * answers(dolly))  # every item, dolly twice
    first_half = {t for t, _ in mix.index[: len(mix) // 2]}
    assert first_half == {0, 1, 2}  # shuffled, not one task after another
    assert answers(TaskMixture([alpaca, dolly, dolly], seed=7, start=5, stop=300, step=4)) == answers(mix)[5:300:4]


def test_sequence_and_nesting():
    a, b = AlpacaSeed(stop=3), DollyHH(start=10, stop=12)
    seq = TaskSequence([a, b])
    assert answers(seq) == answers(a) + answers(b) and len(seq) == 5
    nested = TaskMixture([seq, TaskSequence([b], step=2)], seed=0)
    assert sorted(answers(nested)) == sorted(answers(a) + answers(b) + answers(b)[::2])


def test_every_task_renders(byte_tokenizer):
    "Each task's conversations pass the tokenizer's checks and render with a mask (assistant tokens trained)."
    for task in (GSM8K("test", stop=50), MMLU("dev"), ARC("easy", step=100), ARC("challenge", step=100), HumanEval(step=20),
                 IdentityConversations(step=50), DollyHH(step=50), AlpacaSeed(step=10), SpellingBee(40)):
        assert len(task) > 0
        for conversation in task:
            normalize_conversation(conversation)
            ids, mask = byte_tokenizer.render_conversation(conversation, max_tokens=10**6)
            assert ids[0] == byte_tokenizer.bos_id and 0 < sum(mask) < len(mask), task.name


def test_choice_format_and_scorer():
    mmlu = MMLU("test", subjects=["abstract_algebra", "virology"])
    assert len(mmlu) == 100 + 166 and {c["subject"] for c in mmlu} == {"abstract_algebra", "virology"}
    item = mmlu[2]  # abstract_algebra_test.csv, row 3: choices 0, 1, "0,1", "0,4"; answer 3
    question = item["messages"][0]["content"]
    assert question == ("Multiple Choice question: Find all zeros in the indicated finite field of the given polynomial "
                        "with coefficients in that field. x^5 + 3x^3 + x^2 + 2x in Z_5\n- 0=A\n- 1=B\n- 0,1=C\n- 0,4=D\n"
                        "\nRespond only with the letter of the correct answer.")
    assert item["messages"][1]["content"] == "D" and item["letters"] == ["A", "B", "C", "D"]
    assert mmlu.evaluate(item, "D") and mmlu.evaluate(item, " D\n") and not mmlu.evaluate(item, "A")
    arc = ARC("challenge")
    rows = [json.loads(line) for line in open(tasks.default_data_dir() / "eval_bundle/eval_data/world_knowledge/arc_challenge.jsonl")]
    assert [c["messages"][1]["content"] for c in arc] == ["ABCDE"[r["gold"]] for r in rows]
    assert Counter(len(c["letters"]) for c in arc).keys() <= {3, 4, 5}


def test_mmlu_reads_none_and_numbers_as_text():
    "pandas would turn a choice 'None' into a missing value and '1.50' into 1.5; the loader keeps the text."
    mmlu = MMLU("test")
    assert len(mmlu) == 14042 and mmlu.skipped == 0
    assert any("- None=" in c["messages"][0]["content"] for c in mmlu)


# ---------------------------------------------------------------------------------------------------------------
# malformed records and missing data

@pytest.fixture
def small_data(tmp_path, monkeypatch):
    "A data folder with chat/ files made of real records plus broken ones."
    root = tmp_path / "data"
    (root / "chat" / "gsm8k").mkdir(parents=True)
    (root / "chat" / "sft").mkdir(parents=True)
    good = [json.loads(line) for line in open(tasks.chat_data("gsm8k", "train.jsonl"))][:5]
    bad = [{"question": "What is 2+2?", "answer": "It is <<2+2>>4.\n#### 4"},  # a call without '='
           {"question": "What is 2+2?", "answer": "It is <<2+2=>>4.\n#### 4"},  # a call without a result
           {"question": "", "answer": "#### 4"},  # an empty question
           {"question": "What is 2+2?"}]  # no answer
    lines = [json.dumps(r) for r in good[:2] + bad + good[2:]]
    (root / "chat" / "gsm8k" / "train.jsonl").write_text("\n".join(lines) + "\n")
    identity = open(tasks.chat_data("sft", "identity_conversations.jsonl")).readlines()[:3]
    identity.insert(1, json.dumps([{"role": "assistant", "content": "I speak first"}]) + "\n")
    identity.insert(2, json.dumps([{"role": "user", "content": "hi"}, {"role": "robot", "content": "beep"}]) + "\n")
    (root / "chat" / "sft" / "identity_conversations.jsonl").write_text("".join(identity))
    monkeypatch.setenv("NANOCHAT_DATA", str(root))
    return root, good


def test_malformed_records_are_skipped_and_counted(small_data, capsys):
    root, good = small_data
    task = GSM8K("train")
    assert task.skipped == 4 and len(task) == 5
    assert [c["messages"][0]["content"] for c in task] == [r["question"] for r in good]
    assert "GSM8K: skipped 4 malformed records" in capsys.readouterr().out and len(task.problems) == 4
    identity = IdentityConversations()
    assert identity.skipped == 2 and len(identity) == 3


def test_missing_and_unreadable_data(small_data):
    root, _ = small_data
    with pytest.raises(tasks.TaskDataMissing, match="gsm8k/test.jsonl is missing: set NANOCHAT_DATA"):
        GSM8K("test")
    with pytest.raises(tasks.TaskDataMissing, match="HumanEval.jsonl"):
        HumanEval()
    (root / "chat" / "gsm8k" / "train.jsonl").write_text('{"question": "x", "answer": "#### 1"}\n{not json\n')
    with pytest.raises(tasks.TaskDataError, match="cannot be read as json"):
        GSM8K("train")
    with pytest.raises(UserError, match="splits 'train' and 'test'"):
        GSM8K("validation")
    with pytest.raises(UserError, match="loads from local"):
        DollyHH(source="hub")


# ---------------------------------------------------------------------------------------------------------------
# HumanEval and its sandbox

def test_humaneval_canonical_solutions_pass_and_wrong_ones_fail(humaneval):
    assert len(humaneval) == 164
    for conversation in humaneval[::16]:
        solution = conversation["messages"][1]["content"]
        assert humaneval.evaluate(conversation, solution), conversation["task_id"]
        assert humaneval.evaluate(conversation, f"Here it is:\n```python\n{solution}```\nDone."), conversation["task_id"]
        wrong = conversation["prompt"] + "    return None\n"
        assert not humaneval.evaluate(conversation, wrong), conversation["task_id"]


@pytest.mark.parametrize("body, reason", [
    ("    while True:\n        pass\n", "timed out"),
    ("    open('escaped.txt', 'w').write('x')\n    return True\n", "PermissionError"),
    ("    import pathlib\n    pathlib.Path({target!r}).write_text('x')\n    return True\n", "PermissionError"),
    ("    import socket\n    socket.create_connection(('127.0.0.1', 80))\n    return True\n", "socket"),
    ("    import os\n    os.system('touch {target}')\n    return True\n", "PermissionError"),
    ("    import os\n    os.fork()\n    return True\n", "PermissionError"),
    ("    x = bytearray(2**33)\n    return True\n", "MemoryError"),
])
def test_humaneval_programs_that_misbehave_fail_cleanly(humaneval, tmp_path, body, reason):
    "A program that loops, writes files, opens sockets, spawns or hogs memory fails, quickly, and leaves nothing."
    conversation = humaneval[0]  # has_close_elements
    target = tmp_path / "escaped.txt"
    program = tasks.humaneval_program(conversation, conversation["prompt"] + body.format(target=str(target)))
    start = time.perf_counter()
    passed, why = run_program(program, timeout=2)
    assert not passed and reason in why, why
    assert time.perf_counter() - start < 4
    assert not target.exists()


def test_sandbox_runs_in_an_empty_temporary_folder():
    passed, why = run_program("import os\nassert os.listdir('.') == []\n"
                              "assert os.path.basename(os.getcwd()).startswith('nanochat_program_')")
    assert passed, why
    assert run_program("import sys; sys.exit(3)") == (False, "exit code 3")


# ---------------------------------------------------------------------------------------------------------------
# spelling

def test_spelling_bee():
    train, test = SpellingBee(500, "train"), SpellingBee(200, "test")
    assert [c["messages"] for c in test] == [c["messages"] for c in SpellingBee(200, "test")]  # same every time
    assert not set(train.words) & set(test.words) and len(train.words) + len(test.words) > 300_000
    kinds = Counter(c["kind"] for c in train)
    assert 100 < kinds["spell"] < 250 and kinds["count"] == 500 - kinds["spell"]
    calculator = Calculator()
    for item in train[:100]:
        word = item["messages"][1]["content"]
        if item["kind"] == "spell":
            assert train.evaluate(item, word) and not train.evaluate(item, word[:-1])
            continue
        parts = item["messages"][1]["content"]
        assert calculator(parts[1]["text"]) == parts[2]["text"] == item["answer"]
        assert train.evaluate(item, parts[-1]["text"]) and not train.evaluate(item, f"#### {int(item['answer']) + 1}")


def test_sft_mixture_and_validation_sizes():
    mixture = tasks.sft_mixture(max_per_task=50, spelling=40, gsm8k_epochs=3)
    counts = Counter(mixture.tasks[t].name for t, _ in mixture.index)
    assert counts == {"GSM8K": 150, "MMLU": 50, "IdentityConversations": 50, "DollyHH": 50, "AlpacaSeed": 50,
                      "SpellingBee": 40}
    validation = tasks.sft_validation(max_per_task=30)
    assert [(t.name, len(t)) for t in validation.tasks] == [("GSM8K", 30), ("MMLU", 30), ("SpellingBee", 30)]
    assert len({c["subject"] for c in validation.tasks[1]}) > 20  # spread over subjects, not the first one


# ---------------------------------------------------------------------------------------------------------------
# the hub path, against a local server in the hub's layout

class HubServer:
    "A local HTTP server for files laid out as <root>/datasets/<repo>/resolve/main/<path>."

    def __init__(self, root):
        class Quiet(http.server.SimpleHTTPRequestHandler):
            def __init__(self, *args, **kwargs):
                super().__init__(*args, directory=str(root), **kwargs)

            def log_message(self, *args):
                pass
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Quiet)
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def hub(tmp_path, monkeypatch):
    root = tmp_path / "hub_site"

    def publish(repo, path, rows):
        dest = root / "datasets" / repo / "resolve" / "main" / path
        dest.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.Table.from_pylist(rows), dest)

    gsm8k = [json.loads(line) for line in open(tasks.chat_data("gsm8k", "train.jsonl"))][:20]
    publish("openai/gsm8k", "main/train-00000-of-00001.parquet", gsm8k)
    identity = [json.loads(line) for line in open(tasks.chat_data("sft", "identity_conversations.jsonl"))][:10]
    smol = [{"messages": [{"role": "system", "content": "Be brief."}] + m, "source": "identity"} for m in identity]
    smol.append({"messages": [{"role": "user", "content": "hi"}], "source": "broken"})  # no answer: malformed
    publish("HuggingFaceTB/smol-smoltalk", "data/test-00000-of-00001.parquet", smol)
    server = HubServer(root)
    monkeypatch.setenv("HF_ENDPOINT", server.url)
    monkeypatch.setenv("NANOCHAT_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    yield server, gsm8k, identity
    server.close()


def test_hub_path_against_a_local_server(hub, monkeypatch):
    server, gsm8k, identity = hub
    assert tasks.hub_url("openai/gsm8k", "main/x.parquet") == f"{server.url}/datasets/openai/gsm8k/resolve/main/main/x.parquet"
    from_hub = GSM8K("train", source="hub")
    assert [c["messages"] for c in from_hub] == [c["messages"] for c in GSM8K("train", stop=20)]
    smol = SmolTalk("test")
    assert len(smol) == 10 and smol.skipped == 1
    assert [c["messages"] for c in smol] == [[{"role": "system", "content": "Be brief."}] + m for m in identity]
    assert normalize_conversation(smol[0])[0]["content"].startswith("Be brief.\n\n")
    server.close()  # now cached: loads again without the server, and offline
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert len(GSM8K("train", source="hub")) == 20


def test_hub_errors_say_what_to_do(hub, monkeypatch):
    with pytest.raises(tasks.HubError, match="Could not download .*test-00000-of-00001.parquet .*HF_ENDPOINT"):
        GSM8K("test", source="hub")  # the server has no such file: 404
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(tasks.HubError, match="HF_HUB_OFFLINE/HF_DATASETS_OFFLINE is set"):
        SmolTalk("train")
