"""Chapter 7: bits per byte and CORE, on the real eval bundle and real text."""
import http.server
import json
import math
import shutil
import threading
import zipfile
from pathlib import Path

import pytest

from nanochat_nb.core_eval import (EVAL_BUNDLE_URL, centered_accuracy, centered_standard_error, core_metric,
                                   core_standard_error, download_eval_bundle, format_core_table, load_core_tasks,
                                   load_task_data, plot_core, read_reference_results, render_prompts,
                                   sample_fewshot, shuffled_items, task_items)


@pytest.fixture(scope="module")
def bundle(data_root) -> Path:
    return data_root / "eval_bundle"


@pytest.fixture(scope="module")
def tasks(bundle):
    return {task.label: task for task in load_core_tasks(bundle)}


def first_prompts(task, cap=16, idx=0):
    items = shuffled_items(load_task_data(task.path, task.task_type), cap)
    return render_prompts(task.task_type, items[idx], sample_fewshot(items, idx, task.num_fewshot), task.delimiter)


# ---------------------------------------------------------------------------------------------------------------
# the bundle

def test_bundle_has_22_tasks_18_with_data(tasks):
    assert len(tasks) == 22
    assert sorted(label for label, t in tasks.items() if not t.available) == [
        "coqa", "hellaswag", "hellaswag_zeroshot", "squad"]
    assert tasks["arc_easy"].delimiter == "\nAnswer: " and tasks["copa"].delimiter == " "
    assert tasks["arc_easy"].baseline == 0.25 and tasks["jeopardy"].baseline == 0.0
    assert (tasks["agi_eval_lsat_ar"].num_fewshot, tasks["winograd"].task_type) == (3, "schema")


def test_missing_bundle_folder_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"does not exist.*--download-bundle"):
        load_core_tasks(tmp_path / "nowhere")
    (tmp_path / "half").mkdir()
    with pytest.raises(FileNotFoundError, match="has no core.yaml"):
        load_core_tasks(tmp_path / "half")


def test_malformed_line_names_file_and_line(tmp_path, tasks):
    lines = tasks["copa"].path.read_text().splitlines()
    lines[6] = lines[6][:-3]  # cut off the closing of line 7
    broken = tmp_path / "copa.jsonl"
    broken.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=r"copa.jsonl, line 7: not valid JSON"):
        load_task_data(broken, "multiple_choice")
    lines[6] = json.dumps({"query": "no choices here", "gold": 0})
    broken.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=r"line 7: a multiple_choice item needs choices"):
        load_task_data(broken, "multiple_choice")


# ---------------------------------------------------------------------------------------------------------------
# shuffling, few-shot sampling, prompts (hand-checked against the real items)

def test_shuffle_then_cap_and_fewshot_from_the_other_items(tasks):
    task = tasks["arc_easy"]
    everything = load_task_data(task.path, task.task_type)
    capped = shuffled_items(everything, 16)
    assert capped == shuffled_items(everything)[:16] and len(shuffled_items(everything, -1)) == 2376
    for idx in range(16):
        shots = sample_fewshot(capped, idx, 10)
        assert len(shots) == 10 and capped[idx] not in shots and all(s in capped for s in shots)
    few = sample_fewshot(capped[:4], 0, 10)  # a cap below the number of shots: all the other items
    assert len(few) == 3 and capped[0] not in few and sample_fewshot(capped, 3, 0) == []


def test_multiple_choice_prompt_zero_shot(tasks):
    assert first_prompts(tasks["copa"]) == [
        "Political violence broke out in the nation, therefore many citizens relocated to the capitol.",
        "Political violence broke out in the nation, therefore many citizens took refuge in other territories."]
    assert first_prompts(tasks["openbook_qa"])[2] == \
        "Mosquitoes enjoy all the people at a BBQ in the summer for what reason? nice weather"


def test_multiple_choice_prompt_ten_shot_with_delimiter(tasks):
    prompts = first_prompts(tasks["arc_easy"])
    assert len(prompts) == 4
    assert prompts[3] == (
        "Question: Gel electrophoresis is a technology which allows researchers to reliably separate and sort DNA "
        "fragments. This technology is most useful for which application?\nAnswer: genetic engineering\n\n"
        "Question: Which of these best describes the Moon?\nAnswer: Smaller than Earth\n\n"
        "Question: A student ties a string around a weight and swings the weight in a circle around her body. If the "
        "student represents the Sun and the weight represents Earth, what does the string represent?\nAnswer: gravity\n\n"
        "Question: Which food contains the highest percentage of protein?\nAnswer: chicken\n\n"
        "Question: What is the primary source of stored thermal energy in oceans?\nAnswer: sunlight\n\n"
        "Question: When a butterfly emerges from its chrysalis, its wings are crumpled. In order to expand its wings, "
        "the butterfly hangs upside down, causing fluid to be pumped into the veins of its wings. This pumping most "
        "likely expands the wings by\nAnswer: increasing the pressure inside the wings\n\n"
        "Question: An engineer was given an assignment to build a model rocket. The main requirement was that it had "
        "to build it out of a metal that could release the energy that built up when reentering the atmosphere of "
        "Earth. What property should the engineer concentrate on the most when designing the rocket?\n"
        "Answer: specific heat\n\n"
        "Question: The Hardy-Weinberg law is only valid when\nAnswer: the population is large.\n\n"
        "Question: The thin layer of rock on Earth's surface is the\nAnswer: lithosphere\n\n"
        "Question: What do the elements sulfur (S), nitrogen (N), phosphorus (P), and bromine (Br) have in common?\n"
        "Answer: They are nonmetals.\n\n"
        "Question: Charles Darwin made a number of observations and inferences during his travels. He studied island "
        "finches during a long period of time. Which statement is an inference?\n"
        "Answer: Island finches share a common ancestry with mainland finch species.")
    prefix = prompts[3][:prompts[3].rindex("Answer: ") + len("Answer: ")]
    assert prompts[0] == prefix + "Individual birds have different colored feathers."


def test_schema_prompts(tasks):
    assert first_prompts(tasks["winograd"]) == [
        "In the storm, the tree fell down and crashed through the roof of my house. Now, I have to get the tree repaired.",
        "In the storm, the tree fell down and crashed through the roof of my house. Now, I have to get the roof repaired."]
    assert first_prompts(tasks["winogrande"]) == [
        "Kyle loved to camp in the wilderness but Justin preferred a nice hotel. Kyle booked a trip to New York City.",
        "Kyle loved to camp in the wilderness but Justin preferred a nice hotel. Justin booked a trip to New York City."]


def test_language_modelling_prompts_ten_shot(tasks):
    without, full = first_prompts(tasks["bigbench_qa_wikidata"])
    assert without == (
        "The native language of Hillary Clinton is English\n\n"
        "The country of citizenship of Rudolf Clausius is Germany\n\n"
        "The language used in British Western Pacific Territories is English\n\n"
        "The language of Jack and the Beanstalk is English\n\n"
        "The religion of Jimmy Cliff is Islam\n\n"
        "The honorific prefix of Thomas Beecham is Sir\n\n"
        "The religion of Bess Myerson is Judaism\n\n"
        "The country of Nanded is India\n\n"
        "The country of citizenship of Karunanithi is India\n\n"
        "Tuesday is followed by Wednesday\n\n"
        "The country of citizenship of Stephen Spinella is")
    assert full == without + " Italy"
    without, full = first_prompts(tasks["lambada_openai"])  # zero-shot; the trailing space is stripped
    assert without.endswith('"Please don\'t deny it,') and full == without + " Zhang"


# ---------------------------------------------------------------------------------------------------------------
# centering and the mean

def test_centering_and_mean_worked_example():
    assert centered_accuracy(0.25, 0.25) == 0.0 and centered_accuracy(1.0, 0.25) == 1.0
    assert math.isclose(centered_accuracy(0.5, 0.25), 1 / 3)  # ARC-Easy: chance is 25%
    assert math.isclose(centered_accuracy(0.4, 0.5), -0.2)  # BoolQ-like: worse than chance
    assert math.isclose(core_metric({"arc_easy": 1 / 3, "jeopardy": 0.1, "boolq": -0.2}), (1 / 3 + 0.1 - 0.2) / 3)



def known_result(with_counts: bool = True) -> dict:
    "ARC-Easy at 50% of 100 items (chance 25%) and Jeopardy at 10% of 400 items (chance 0)."
    tasks = {"arc_easy": {"type": "multiple_choice", "accuracy": 0.5, "centered": 1 / 3, "baseline": 0.25,
                          "items": 100, "correct": [True, False] * 50, "seconds": 1.0, "truncated": 0},
             "jeopardy": {"type": "language_modeling", "accuracy": 0.1, "centered": 0.1, "baseline": 0.0,
                          "items": 400, "correct": [True] * 40 + [False] * 360, "seconds": 1.0, "truncated": 0}}
    if not with_counts:  # a report written before items and baseline were recorded: only the verdicts say n
        for r in tasks.values():
            del r["items"], r["baseline"]
    return {"core": core_metric({k: r["centered"] for k, r in tasks.items()}), "tasks": tasks, "tasks_used": 2,
            "tasks_total": 22, "skipped": [], "truncated": 0, "max_per_task": None, "max_seq_len": 256,
            "seconds": 2.0}


@pytest.mark.parametrize("with_counts", [True, False])
def test_error_bars_are_the_binomial_standard_error_of_the_centered_accuracy(with_counts):
    import matplotlib.pyplot as plt
    from matplotlib.container import BarContainer
    result = known_result(with_counts)
    arc, jeopardy = math.sqrt(0.5 * 0.5 / 100) / 0.75, math.sqrt(0.1 * 0.9 / 400)  # 0.0667 and 0.015
    assert [task_items(r) for r in result["tasks"].values()] == [100, 400]
    assert centered_standard_error(result["tasks"]["arc_easy"]) == pytest.approx(arc)
    assert centered_standard_error(result["tasks"]["jeopardy"]) == pytest.approx(jeopardy)
    assert core_standard_error(result) == pytest.approx(math.hypot(arc, jeopardy) / 2)
    assert f"± {math.hypot(arc, jeopardy) / 2:.4f}" in format_core_table(result)

    ax = plot_core(result)
    assert [t.get_text() for t in ax.get_yticklabels()] == ["arc_easy (n=100)", "jeopardy (n=400)"]
    ours = next(c for c in ax.containers if isinstance(c, BarContainer))  # the first series' bars
    segments = ours.errorbar.lines[2][0].get_segments()  # one horizontal line per bar: centered ± error
    for segment, centered, error in zip(segments, [1 / 3, 0.1], [arc, jeopardy]):
        (low, _), (high, _) = segment
        assert (low, high) == (pytest.approx(centered - error), pytest.approx(centered + error))
    plt.close(ax.figure)


def test_a_report_without_counts_still_plots():
    import matplotlib.pyplot as plt
    result = known_result()
    for r in result["tasks"].values():
        del r["items"], r["correct"]
    assert math.isnan(centered_standard_error(result["tasks"]["arc_easy"]))
    ax = plot_core(result)
    assert [t.get_text() for t in ax.get_yticklabels()] == ["arc_easy", "jeopardy"]
    plt.close(ax.figure)

def test_gpt2_reference_core_recomputed_from_its_accuracies(bundle, tasks):
    refs = read_reference_results(bundle)
    assert set(refs) == {"gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl"}
    for name, ref in refs.items():
        centered = {label: centered_accuracy(r["accuracy"], tasks[label].baseline) for label, r in ref["tasks"].items()}
        assert len(centered) == 22
        assert all(abs(centered[k] - ref["tasks"][k]["centered"]) < 1e-5 for k in centered), name
        assert abs(core_metric(centered) - ref["core"]) < 1e-5, name
    assert refs["gpt2"]["core"] == 0.113891 and refs["gpt2-xl"]["core"] == 0.256525


# ---------------------------------------------------------------------------------------------------------------
# downloading the bundle (from a local HTTP server)

class _Server:
    def __init__(self, folder: Path):
        handler = lambda *a, **kw: http.server.SimpleHTTPRequestHandler(*a, directory=str(folder), **kw)
        handler.log_message = lambda *a: None
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.requests = 0
        original = self.httpd.finish_request

        def counting(*args):
            self.requests += 1
            original(*args)
        self.httpd.finish_request = counting
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def test_download_bundle_from_local_server(tmp_path, bundle):
    served = tmp_path / "served"
    served.mkdir()
    (served / "not_a_zip.zip").write_text("hello")
    members = ["core.yaml", "eval_meta_data.csv", "eval_data/commonsense_reasoning/copa.jsonl"]
    with zipfile.ZipFile(served / "eval_bundle.zip", "w") as zf:  # nanochat's archive has one top folder
        for member in members:
            zf.write(bundle / member, f"eval_bundle/{member}")
    server = _Server(served)
    try:
        dest = tmp_path / "data" / "eval_bundle"
        assert download_eval_bundle(dest, url=f"{server.url}/eval_bundle.zip") == dest
        for member in members:
            assert (dest / member).read_bytes() == (bundle / member).read_bytes()
        assert sum(t.available for t in load_core_tasks(dest)) == 1
        assert [p.name for p in dest.parent.iterdir()] == ["eval_bundle"]  # no temporary files left
        before = server.requests
        download_eval_bundle(dest, url=f"{server.url}/eval_bundle.zip")  # already there: kept, not fetched again
        assert server.requests == before
        with pytest.raises(RuntimeError, match="Could not download the eval bundle"):
            download_eval_bundle(tmp_path / "other", url=f"{server.url}/missing.zip")
        with pytest.raises(ValueError, match="not a zip archive"):
            download_eval_bundle(tmp_path / "other", url=f"{server.url}/not_a_zip.zip")
        assert not (tmp_path / "other").exists()
        (tmp_path / "occupied").mkdir()
        with pytest.raises(FileExistsError, match="not an eval bundle"):
            download_eval_bundle(tmp_path / "occupied", url=f"{server.url}/eval_bundle.zip")
    finally:
        server.close()
    assert EVAL_BUNDLE_URL.endswith("/eval_bundle.zip")


# ---------------------------------------------------------------------------------------------------------------
# the batched evaluator against a straightforward one-item-at-a-time evaluator, on real items

import torch
import torch.nn.functional as F

from nanochat_nb.core_eval import (ScoredItem, crop_left, evaluate_bpb, evaluate_core, evaluate_items, evaluate_task,
                                   format_core_table, score_rows, task_scored_items)
from nanochat_nb.gpt import GPT, GPTConfig

CONTEXT = 192  # short enough that 10-shot prompts get cropped


@pytest.fixture(scope="module")
def small_model(tokenizer):
    "A depth-2 GPT with fixed random weights, scaled up so that its predictions are far from uniform."
    torch.manual_seed(1234)
    model = GPT(GPTConfig.from_depth(2, vocab_size=tokenizer.vocab_size, sequence_len=CONTEXT)).init_weights()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 2 and ("c_proj" in name or "lm_head" in name):
                p.normal_(0, 0.05)
    return model.eval()


def one_item(model, tokenizer, task, items, idx, max_len):
    "The plain way: render, tokenize each prompt, find the spans by hand, one forward pass per row."
    item = items[idx]
    prompts = render_prompts(task.task_type, item, sample_fewshot(items, idx, task.num_fewshot), task.delimiter)
    rows = [tokenizer.encode(p, prepend="<|bos|>") for p in prompts]
    if task.task_type == "language_modeling":
        without, full = rows
        assert full[:len(without)] == without
        spans = [(full, len(without), len(full))]
    elif task.task_type == "multiple_choice":
        start = 0
        while all(len(r) > start for r in rows) and len({r[start] for r in rows}) == 1:
            start += 1
        spans = [(r, start, len(r)) for r in rows]
    else:
        shared = 0
        while all(len(r) > shared for r in rows) and len({r[-1 - shared] for r in rows}) == 1:
            shared += 1
        spans = [(r, len(r) - shared, len(r)) for r in rows]
    means, hits = [], []
    for row, start, end in spans:
        if len(row) > max_len:
            cut = len(row) - max_len
            row, start, end = row[cut:], max(start - cut, 1), end - cut
        with torch.no_grad():
            logits = model(torch.tensor([row]))[0, start - 1:end - 1]
        targets = torch.tensor(row[start:end])
        means.append(F.cross_entropy(logits, targets).item())
        hits.append(int((logits.argmax(-1) == targets).sum()))
    if task.task_type == "language_modeling":
        correct = hits[0] == spans[0][2] - spans[0][1]
    else:
        correct = means.index(min(means)) == item["gold"]
    return correct, means, hits


def test_batched_equals_one_at_a_time_on_every_task(small_model, tokenizer, tasks):
    seen_types, cropped, right = set(), 0, 0
    for task in tasks.values():
        if not task.available:
            continue
        items = shuffled_items(load_task_data(task.path, task.task_type), 6)
        reference = [one_item(small_model, tokenizer, task, items, i, CONTEXT) for i in range(len(items))]
        batched = evaluate_task(small_model, tokenizer, task, max_per_task=6, max_seq_len=CONTEXT, batch_tokens=2048)
        assert batched["correct"] == [r[0] for r in reference], task.label
        scored = task_scored_items(task, items, range(len(items)), tokenizer, CONTEXT)
        means, hits = score_rows(small_model, [r for s in scored for r in s.rows], [x for s in scored for x in s.starts],
                                 [x for s in scored for x in s.ends], tokenizer.bos_id, batch_tokens=2048)
        assert hits == [h for r in reference for h in r[2]], task.label
        assert means == pytest.approx([m for r in reference for m in r[1]], rel=1e-4, abs=1e-4), task.label
        seen_types.add(task.task_type)
        cropped += batched["truncated"]
        right += sum(batched["correct"])
    assert seen_types == {"multiple_choice", "schema", "language_modeling"}
    assert cropped > 0 and right > 0


def test_language_modelling_item_is_right_when_greedy_decoding_matches(small_model, tokenizer, tasks):
    "Give real prompts the model's own greedy continuation: the evaluator must call them right, and wrong if changed."
    task = tasks["bigbench_qa_wikidata"]
    items = shuffled_items(load_task_data(task.path, task.task_type), 4)
    good, bad = [], []
    for item in task_scored_items(task, items, range(4), tokenizer, CONTEXT):
        prompt = item.rows[0][:item.starts[0]][-(CONTEXT - 3):]
        row = list(prompt)
        for _ in range(3):
            with torch.no_grad():
                row.append(int(small_model(torch.tensor([row]))[0, -1].argmax()))
        good.append(ScoredItem([row], [len(prompt)], [len(row)], None))
        bad.append(ScoredItem([row[:-1] + [(row[-1] + 1) % tokenizer.vocab_size]], [len(prompt)], [len(row)], None))
    assert evaluate_items(small_model, good + bad, tokenizer.bos_id) == [True] * 4 + [False] * 4


def test_crop_left_keeps_the_scored_end():
    item = ScoredItem([list(range(10)), list(range(8))], [6, 6], [10, 8], gold=0)
    cropped = crop_left(item, 5)
    assert cropped.truncated and cropped.rows == [[5, 6, 7, 8, 9], [3, 4, 5, 6, 7]]
    assert (cropped.starts, cropped.ends) == ([1, 3], [5, 5])
    assert crop_left(item, 10) is item and not item.truncated


# ---------------------------------------------------------------------------------------------------------------
# CORE over the tasks that have data

def test_missing_task_file_is_skipped_with_a_warning(tmp_path, bundle, tasks, small_model, tokenizer):
    partial = tmp_path / "eval_bundle"
    for name in ["core.yaml", "eval_meta_data.csv", *[f"openai-community-gpt2{s}.csv" for s in ("", "-xl")]]:
        (partial / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(bundle / name, partial / name)
    for uri in ["commonsense_reasoning/copa.jsonl", "language_understanding/winograd_wsc.jsonl",
                "symbolic_problem_solving/bigbench_operators.jsonl"]:
        (partial / "eval_data" / uri).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(bundle / "eval_data" / uri, partial / "eval_data" / uri)
    with pytest.warns(UserWarning, match=r"'arc_easy' skipped: its data file .*arc_easy.jsonl"):
        result = evaluate_core(small_model, tokenizer, partial, max_per_task=4, verbose=False)
    assert (result["tasks_used"], result["tasks_total"], len(result["skipped"])) == (3, 22, 19)
    assert list(result["tasks"]) == ["copa", "winograd", "bigbench_operators"]
    assert all(r["items"] == len(r["correct"]) == 4 for r in result["tasks"].values())  # the items scored
    assert [r["baseline"] for r in result["tasks"].values()] == [tasks[k].baseline for k in result["tasks"]]
    assert result["core"] == pytest.approx(sum(r["centered"] for r in result["tasks"].values()) / 3)
    assert "over 3 of 22 tasks" in format_core_table(result)


# ---------------------------------------------------------------------------------------------------------------
# bits per byte

def test_bpb_of_a_uniform_model_on_real_text(tokenizer, data_root):
    import pyarrow.parquet as pq
    texts = pq.read_table(data_root / "pretrain" / "shard_00006.parquet", columns=["text"]).column("text").to_pylist()[:3]
    stream = [t for text in texts for t in tokenizer.encode(text[:3000], prepend="<|bos|>")]
    n = len(stream) // 65 * 65
    chunk = torch.tensor(stream[:n]).view(-1, 65)
    inputs, targets = chunk[:, :-1], chunk[:, 1:].clone()
    model = GPT(GPTConfig.from_depth(2, vocab_size=tokenizer.vocab_size, sequence_len=64)).init_weights()
    torch.nn.init.zeros_(model.lm_head.weight)  # equal logits: every token costs log2(V) bits
    token_bytes = tokenizer.token_bytes()
    counted = targets[token_bytes[targets] > 0]
    text_bytes = sum(len(text[:3000].encode()) for text in texts)
    assert token_bytes[counted].sum().item() <= text_bytes  # the bytes are the text's own (minus a cut-off tail)
    expected = math.log2(tokenizer.vocab_size) * len(counted) / token_bytes[counted].sum().item()
    assert evaluate_bpb(model, [(inputs, targets)], token_bytes) == pytest.approx(expected, rel=1e-6)
    masked = targets.clone()
    masked[:, :10] = -1  # ignored targets count neither nats nor bytes
    kept = masked[masked >= 0]
    kept = kept[token_bytes[kept] > 0]
    expected = math.log2(tokenizer.vocab_size) * len(kept) / token_bytes[kept].sum().item()
    assert evaluate_bpb(model, [(inputs[:, :32], masked[:, :32]), (inputs[:, 32:], masked[:, 32:])],
                        token_bytes) == pytest.approx(expected, rel=1e-6)


# ---------------------------------------------------------------------------------------------------------------
# the command line, alone and under torchrun

from conftest import run_python

from nanochat_nb.checkpoint import CheckpointError, checkpoint_tokenizer_dir
from nanochat_nb.core_eval import SAMPLE_PROMPTS, greedy_samples, latest_checkpoint_dir, result_stem


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, small_model, tokenizer):
    "A run folder as training leaves it: checkpoint 7 (with the tokenizer's fingerprint) and a copy of the tokenizer."
    from nanochat_nb.checkpoint import save, tokenizer_fingerprint
    folder = tmp_path_factory.mktemp("run") / "d2"
    save(folder, 7, small_model, meta={"tokenizer": tokenizer_fingerprint(tokenizer)})
    tokenizer.save(folder / "tokenizer")
    return folder


def copy_run(checkpoint: Path, dest: Path) -> Path:
    shutil.copytree(checkpoint, dest)
    return dest


def eval_cli(*flags):
    return run_python("-m", "nanochat_nb.core_eval", *map(str, flags), timeout=300)


def one_line_error(out) -> str:
    "The stderr of a command that should have failed on bad input: exit code 2 and a single line, no traceback."
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 2 and len(lines) == 1 and lines[0].startswith("nanochat-base-eval: "), out.stderr[-3000:]
    return lines[0]


def test_cli_writes_results_and_matches_torchrun(checkpoint, tmp_path):
    flags = ["--preset", "tiny", "--checkpoint", str(checkpoint), "--max-per-task", "2", "--eval-tokens", "2048"]
    single = run_python("-m", "nanochat_nb.core_eval", *flags, "--out", str(tmp_path / "one"), timeout=300)
    assert single.returncode == 0, single.stderr[-3000:]
    assert "CORE" in single.stdout and "over 18 of 22 tasks" in single.stdout
    result = json.loads((tmp_path / "one" / "base_eval_000007_max2.json").read_text())
    assert (tmp_path / "one" / "base_eval_000007_max2.png").is_file()
    assert result["step"] == 7 and len(result["samples"]) > 0 and 0 < result["val_bpb"] < 20
    assert result["core"]["tasks_used"] == 18 and result["core"]["max_seq_len"] == 256  # the tiny preset's crop

    double = run_python("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
                        "nanochat_nb.core_eval", *flags, "--eval", "core,bpb", "--out", str(tmp_path / "two"),
                        timeout=300)
    assert double.returncode == 0, double.stderr[-3000:]
    split = json.loads((tmp_path / "two" / "base_eval_000007_max2.json").read_text())
    assert split["core"]["core"] == pytest.approx(result["core"]["core"], abs=1e-9)
    for label, task in result["core"]["tasks"].items():
        assert split["core"]["tasks"][label]["correct"] == task["correct"], label
    assert split["val_bpb"] == pytest.approx(result["val_bpb"], rel=0.1)  # other batches, same text


def test_cli_bad_input(checkpoint, tmp_path):
    line = one_line_error(eval_cli("--checkpoint", checkpoint, "--eval", "core,speed"))
    assert "--eval 'core,speed' is not a list of core, bpb, sample" in line
    line = one_line_error(eval_cli("--checkpoint", checkpoint, "--bundle-dir", tmp_path / "x"))
    assert "does not exist" in line and "--download-bundle" in line
    line = one_line_error(eval_cli("--checkpoint", tmp_path / "nowhere", "--eval", "sample"))
    assert f"{tmp_path / 'nowhere'} does not exist" in line
    line = one_line_error(eval_cli("--checkpoint", checkpoint, "--eval", "sample", "--step", "8"))
    assert "No checkpoint for step 8" in line and "it has steps 7" in line
    line = one_line_error(eval_cli("--checkpoint", checkpoint, "--eval", "sample", "--allow-mismatch", "depth"))
    assert "--allow-mismatch 'depth'" in line


def test_cli_names_a_truncated_model_file(checkpoint, tmp_path):
    run = copy_run(checkpoint, tmp_path / "d2")
    model_path = run / "model_000007.pt"
    model_path.write_bytes(model_path.read_bytes()[:-1000])  # as a copy cut short leaves it
    line = one_line_error(eval_cli("--checkpoint", run, "--eval", "sample", "--out", tmp_path / "out"))
    assert "model_000007.pt" in line and "damaged" in line
    assert not (tmp_path / "out").exists()


def train_small_tokenizer(data_root, shard: str):
    from nanochat_nb.tokenizer import Tokenizer
    import pyarrow.parquet as pq
    texts = pq.read_table(data_root / "pretrain" / shard, columns=["text"]).column("text").to_pylist()[:100]
    return Tokenizer.train(iter(texts), vocab_size=300)


def test_cli_refuses_another_tokenizer_of_the_same_size(tmp_path, data_root):
    from nanochat_nb.checkpoint import save, tokenizer_fingerprint
    ours, other = train_small_tokenizer(data_root, "shard_00000.parquet"), train_small_tokenizer(data_root, "shard_00001.parquet")
    assert ours.vocab_size == other.vocab_size and tokenizer_fingerprint(ours) != tokenizer_fingerprint(other)
    torch.manual_seed(0)
    model = GPT(GPTConfig.from_depth(1, vocab_size=ours.vocab_size, sequence_len=64)).init_weights()
    run = tmp_path / "run"
    save(run, 3, model, meta={"tokenizer": tokenizer_fingerprint(ours)})
    ours.save(run / "tokenizer")
    other.save(tmp_path / "other_tokenizer")
    flags = ["--checkpoint", run, "--eval", "sample", "--out", tmp_path / "out"]

    line = one_line_error(eval_cli(*flags, "--tokenizer-dir", tmp_path / "other_tokenizer"))
    assert "another tokenizer" in line and "--allow-mismatch tokenizer" in line
    assert not (tmp_path / "out").exists()

    allowed = eval_cli(*flags, "--tokenizer-dir", tmp_path / "other_tokenizer", "--allow-mismatch", "tokenizer")
    assert allowed.returncode == 0, allowed.stderr[-3000:]
    samples = json.loads((tmp_path / "out" / "base_eval_000003.json").read_text())["samples"]
    assert [s[:len(p)] for s, p in zip(samples, SAMPLE_PROMPTS)] == SAMPLE_PROMPTS

    own = eval_cli(*flags)  # the run's own copy in <run>/tokenizer
    assert own.returncode == 0, own.stderr[-3000:]


def test_greedy_samples_match_a_full_forward_per_token(small_model, tokenizer):
    prompts = SAMPLE_PROMPTS[:3]
    samples = greedy_samples(small_model, tokenizer, prompts, max_tokens=6)
    for prompt, sample in zip(prompts, samples):
        ids = tokenizer.encode(prompt, prepend=tokenizer.bos_id)
        for _ in range(6):  # the slow way: the whole sequence again for every new token
            with torch.no_grad():
                ids.append(int(small_model(torch.tensor([ids]))[0, -1].argmax()))
        assert sample == tokenizer.decode(ids[1:]) and sample.startswith(prompt)


def test_latest_run_folder_counts_committed_checkpoints_only(tmp_path):
    import os
    root = tmp_path / "base_checkpoints"
    with pytest.raises(CheckpointError, match="No checkpoint under .*nanochat-base-train"):
        latest_checkpoint_dir(root)
    older, newer, unfinished = root / "d4", root / "d20", root / "d26"
    for folder in (older, newer, unfinished):
        folder.mkdir(parents=True)
        (folder / "model_000010.pt").write_bytes(b"")
    (older / "meta_000010.json").write_text("{}")
    (newer / "meta_000010.json").write_text("{}")
    os.utime(older / "meta_000010.json", (1, 1))
    os.utime(unfinished / "model_000010.pt", (2**31, 2**31))  # the newest file, but never committed (no meta)
    assert latest_checkpoint_dir(root) == newer


def test_tokenizer_lookup_and_result_names(tmp_path):
    run = tmp_path / "base_checkpoints" / "d20"
    run.mkdir(parents=True)
    assert checkpoint_tokenizer_dir(run) is None  # the default tokenizer folder then
    (tmp_path / "tokenizer").mkdir()  # nanochat's layout: <base>/tokenizer beside <base>/base_checkpoints
    assert checkpoint_tokenizer_dir(run) == tmp_path / "tokenizer"
    (run / "tokenizer").mkdir()  # ours: a copy inside the run folder wins
    assert checkpoint_tokenizer_dir(run) == run / "tokenizer"
    assert (result_stem(500, None), result_stem(500, 16)) == ("base_eval_000500", "base_eval_000500_max16")
