"""Supervised fine-tuning (chapter 13): packing whole conversations with padding, masked loss and its gradients,
the warm-started optimizer, a real SFT run of a tiny base model, exact resume, and bad input."""
import shutil

import numpy as np
import pytest
import torch

from conftest import assert_user_error
from nanochat_nb import checkpoint, tasks
from nanochat_nb.common import read_log
from nanochat_nb.gpt import GPT, GPTConfig
from nanochat_nb.sft import (EmptyMixture, SFTLoader, SFTTrainer, build_parser, epoch_steps, main, rows_to_batch,
                             sft)
from nanochat_nb.tokenizer import Tokenizer
from nanochat_nb.train import build_parser as base_parser, train

SEQ = 256
FAST_LRS = ["--matrix-lr", "0.2", "--embedding-lr", "3", "--unembedding-lr", "0.08", "--value-embedding-lr", "1.5"]


@pytest.fixture(scope="module")
def conversations():
    "Real conversations of the task chapter: spelling, GSM8K with calculator calls, general chat."
    return tasks.TaskMixture([tasks.SpellingBee(120, "train"), tasks.GSM8K("train", stop=120),
                              tasks.DollyHH(stop=120)], seed=0)


@pytest.fixture(scope="module")
def validation():
    return tasks.TaskSequence([tasks.GSM8K("test", stop=30), tasks.SpellingBee(30, "test")])


@pytest.fixture(scope="module")
def base_run(tokenizer, tmp_path_factory):
    "A depth-2 base run (8 steps on the real shards, gradient accumulation 2), checkpointed with its optimizer."
    run_dir = tmp_path_factory.mktemp("base") / "d2"
    train(base_parser().parse_args([
        "--depth", "2", "--max-seq-len", str(SEQ), "--device-batch-size", "2", "--total-batch-size", "1024",
        "--num-iterations", "8", "--warmup-steps", "2", "--eval-every", "-1", "--sample-every", "-1",
        "--compile", "off", "--tokenizer-dir", str(tokenizer.folder), "--run-dir", str(run_dir), *FAST_LRS]))
    return run_dir


def sft_args(base, run_dir, *extra):
    return build_parser().parse_args(["--base", str(base), "--run-dir", str(run_dir), "--compile", "off",
                                      "--chat-eval-every", "-1", "--eval-every", "-1", "--eval-tokens", "2048",
                                      *extra])


def rendered_set(tokenizer, conversations) -> set:
    return {tuple(tokenizer.render_conversation(c, max_tokens=10**6)[0]) for c in conversations}


def padding_start(row: np.ndarray, bos: int) -> int:
    "Where a packed row's padding begins: the run of mask-0 BOS tokens that ends it."
    pos = len(row)
    while pos > 1 and row[pos - 1, 0] == bos and row[pos - 1, 1] == 0:
        pos -= 1
    return pos


# ---- packing ----------------------------------------------------------------------------------------------
def test_rows_hold_whole_conversations_and_padding_has_no_target(tokenizer, conversations):
    too_long = {"messages": [{"role": "user", "content": "spell " * 400}, {"role": "assistant", "content": "no"}]}
    data = [conversations[i] for i in range(len(conversations))] + [too_long]
    rendered, bos = rendered_set(tokenizer, data), tokenizer.bos_id
    loader = SFTLoader(tokenizer, data, batch_size=4, seq_len=SEQ)
    padded_rows = 0
    for _ in range(40):
        rows = loader.next_rows()
        inputs, targets = rows_to_batch(rows)
        assert (inputs[:, 0] == bos).all()
        for r, row in enumerate(rows):
            end = padding_start(row, bos)
            content = row[:end, 0].tolist()
            starts = [i for i, t in enumerate(content) if t == bos] + [end]
            pieces = [tuple(content[a:b]) for a, b in zip(starts, starts[1:])]
            assert starts[0] == 0 and all(piece in rendered for piece in pieces)   # never cropped
            assert (targets[r, end - 1:] == -1).all()                                # padding: no loss
            trained = targets[r, :end - 1] >= 0
            assert torch.equal(trained, torch.from_numpy(row[1:end, 1] == 1))         # the mask, shifted by one
            padded_rows += end < len(row)
    stats = loader.stats()
    assert stats["skipped"] >= 1   # the 400-word conversation never fits: skipped, and counted
    assert padded_rows > 0 and stats["epoch"] >= 1


def test_best_fit_pads_only_when_nothing_fits(tokenizer, conversations):
    loader = SFTLoader(tokenizer, conversations, batch_size=1, seq_len=SEQ)
    row = np.empty((SEQ + 1, 2), dtype=np.int64)
    for _ in range(60):
        placements = loader.packer.fill_row(row, loader._refill, loader.pad)
        free = SEQ + 1 - sum(length for _, _, length, _ in placements)
        if free:
            assert loader.packer.lengths[0] > free   # the shortest buffered conversation would not have fitted
        lengths = [length for _, _, length, _ in placements]
        assert lengths[0] == max(lengths)            # each row starts with the largest that fits


def test_loader_resumes_exactly(tokenizer, conversations):
    loader = SFTLoader(tokenizer, conversations, batch_size=3, seq_len=SEQ, rank=1, world_size=2)
    for _ in range(7):
        next(loader)
    state = loader.state_dict()
    expected = [next(loader) for _ in range(4)]
    again = SFTLoader(tokenizer, conversations, batch_size=3, seq_len=SEQ, rank=1, world_size=2)
    again.load_state_dict(state)
    for (a, b), (c, d) in zip(expected, [next(again) for _ in range(4)]):
        assert torch.equal(a, c) and torch.equal(b, d)


# ---- the masked loss --------------------------------------------------------------------------------------
def tiny_model(vocab_size: int) -> GPT:
    torch.manual_seed(0)
    model = GPT(GPTConfig.from_depth(2, vocab_size=vocab_size, sequence_len=SEQ), compute_dtype=torch.float32)
    model.init_weights()
    with torch.no_grad():   # every weight nonzero, so that every gradient carries signal
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return model


def gradients(model, inputs, targets, loss_fn=None) -> dict:
    model.zero_grad(set_to_none=True)
    (loss_fn(model) if loss_fn else model(inputs, targets)).backward()
    return {name: p.grad.clone() for name, p in model.named_parameters()}


def test_context_and_padding_positions_give_no_gradient(tokenizer, conversations):
    loader = SFTLoader(tokenizer, conversations, batch_size=2, seq_len=SEQ)
    rows = loader.next_rows()
    while all(padding_start(row, tokenizer.bos_id) == len(row) for row in rows):
        rows = loader.next_rows()
    inputs, targets = rows_to_batch(rows)
    model = tiny_model(tokenizer.vocab_size)
    masked = gradients(model, inputs, targets)

    # the masked loss is the mean over the trained positions only, of losses that are defined everywhere
    next_tokens = torch.from_numpy(rows[:, 1:, 0])
    trained = targets >= 0
    def trained_only(m):
        losses = m(inputs, next_tokens, loss_reduction="none")   # a loss at every position, context included
        return (losses * trained).sum() / trained.sum()
    reference = gradients(model, inputs, targets, trained_only)
    for name in masked:
        assert torch.allclose(masked[name], reference[name], rtol=1e-4, atol=1e-7), name

    # a padding input comes after everything else in its row and has no target: changing it changes nothing
    r = next(i for i, row in enumerate(rows) if padding_start(row, tokenizer.bos_id) < len(row))
    pad_at = padding_start(rows[r], tokenizer.bos_id)
    changed = inputs.clone()
    changed[r, pad_at:] = 7
    assert all(torch.equal(a, b) for a, b in zip(masked.values(), gradients(model, changed, targets).values()))

    # the user's text as a target can be anything: the loss never reads it
    user_text = (rows[..., 1] == 0) & (rows[..., 0] != tokenizer.bos_id)
    assert user_text[:, 1:].any()
    other_rows = rows.copy()
    other_rows[..., 0] = np.where(user_text, np.random.default_rng(0).integers(tokenizer.vocab_size, size=user_text.shape),
                                  rows[..., 0])
    _, other_targets = rows_to_batch(other_rows)
    assert all(torch.equal(a, b) for a, b in zip(masked.values(), gradients(model, inputs, other_targets).values()))


# ---- the run ----------------------------------------------------------------------------------------------
def test_warm_start_loads_the_base_optimizer_state(base_run, tmp_path, conversations, validation):
    trainer = SFTTrainer(sft_args(base_run, tmp_path / "run", "--num-steps", "4"), conversations, validation)
    try:
        trainer.setup()
        _, base_optim, meta = checkpoint.load(base_run)
        base_lrs = meta["plan"]["lrs"]
        own = trainer.optimizer.state_dict()
        assert own["state"].keys() == base_optim["state"].keys()
        for key, saved in base_optim["state"].items():
            for name, value in saved.items():
                assert torch.equal(torch.as_tensor(own["state"][key][name]), torch.as_tensor(value)), (key, name)
        for group in trainer.optimizer.param_groups:
            assert group["lr"] == pytest.approx(0.8 * base_lrs[group["name"]]) and group["weight_decay"] == 0.0
        weights = checkpoint.load_model(base_run)[0].state_dict()
        assert all(torch.equal(v, trainer.model.state_dict()[k]) for k, v in weights.items())
    finally:
        trainer.close()
    fresh = SFTTrainer(sft_args(base_run, tmp_path / "fresh", "--num-steps", "4", "--fresh-optimizer"),
                       conversations, validation)
    try:
        assert not fresh.setup().optimizer.state_dict()["state"]
    finally:
        fresh.close()


# 8 steps, checkpoints and validation every 4, a chat evaluation (1 item per task) at the end
RUN_FLAGS = ["--num-steps", "8", "--save-every", "4", "--eval-every", "4", "--chat-eval-every", "8",
             "--chat-eval-items", "1", "--chat-eval-tokens", "8"]


def losses(run_dir) -> dict:
    return {r["step"]: r["loss"] for r in read_log(run_dir / "log.jsonl") if "loss" in r}


@pytest.fixture(scope="module")
def reference_sft(base_run, tmp_path_factory, conversations, validation):
    "An uninterrupted SFT run (RUN_FLAGS)."
    run_dir = tmp_path_factory.mktemp("sft") / "run"
    summary = sft(sft_args(base_run, run_dir, *RUN_FLAGS), conversations, validation)
    return run_dir, summary


def test_sft_lowers_the_masked_loss(reference_sft, base_run):
    run_dir, summary = reference_sft
    val = [r["val_bpb"] for r in read_log(run_dir / "log.jsonl") if "val_bpb" in r]
    assert len(val) == 3 and val[-1] < val[0] - 0.05, val
    trained = losses(run_dir)
    assert sorted(trained) == list(range(1, 9)) and np.mean([trained[7], trained[8]]) < trained[1], trained
    assert checkpoint.steps(run_dir) == [4, 8] and (run_dir / "tokenizer").is_dir()
    chat = [r for r in read_log(run_dir / "log.jsonl") if "chat_eval" in r]
    assert [r["step"] for r in chat] == [8] and set(chat[0]["chat_eval"]) == set(tasks.EVAL_TASKS)
    assert -1 <= chat[0]["chatcore"] <= 1
    meta = checkpoint.read_meta(run_dir, 8)
    assert meta["base"] == {"folder": str(base_run), "step": 8} and meta["plan"]["final_lr_frac"] == 0.0


def test_interrupted_sft_resumes_exactly(reference_sft, base_run, tmp_path, conversations, validation, monkeypatch):
    reference_dir, _ = reference_sft
    record = SFTTrainer._record

    def record_then_stop(self, *args, **kwargs):
        out = record(self, *args, **kwargs)
        if self.state.step == 6:
            raise KeyboardInterrupt   # killed after step 6; the last checkpoint is step 4
        return out
    monkeypatch.setattr(SFTTrainer, "_record", record_then_stop)
    flags = RUN_FLAGS
    with pytest.raises(KeyboardInterrupt):
        sft(sft_args(base_run, tmp_path, *flags), conversations, validation)
    assert checkpoint.steps(tmp_path) == [4]
    monkeypatch.setattr(SFTTrainer, "_record", record)
    sft(sft_args(base_run, tmp_path, *flags, "--resume"), conversations, validation)
    assert losses(tmp_path) == losses(reference_dir)   # bit for bit
    resumed, reference = (torch.load(d / "model_000008.pt", weights_only=True) for d in (tmp_path, reference_dir))
    assert all(torch.equal(resumed[k], reference[k]) for k in reference)


def test_epochs_set_the_horizon(base_run, tmp_path, tokenizer, conversations, validation):
    summary = sft(sft_args(base_run, tmp_path / "run", "--dry-run", "--num-epochs", "1"), conversations, validation)
    plan = summary["plan"]
    steps, accum = plan["num_iterations"], plan["grad_accum_steps"]
    loader = SFTLoader(tokenizer, conversations, plan["device_batch_size"], SEQ)
    for _ in range((steps - 1) * accum):
        next(loader)
    assert loader.stats()["conversations"] + loader.stats()["skipped"] < len(conversations)   # not yet one epoch
    for _ in range(accum):
        next(loader)
    assert loader.stats()["conversations"] + loader.stats()["skipped"] >= len(conversations)
    assert plan["horizon"] == "1 epoch(s)" and not (tmp_path / "run").exists()


# ---- bad input --------------------------------------------------------------------------------------------
def test_no_base_run(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("NANOCHAT_HOME", str(tmp_path))
    assert_user_error(capsys, "No base model under", main, ["--num-steps", "2"])


def test_base_run_of_another_tokenizer(base_run, tmp_path, capsys):
    other = tmp_path / "other"
    shutil.copytree(base_run, other)
    shutil.rmtree(other / "tokenizer")
    Tokenizer({bytes([i]): i for i in range(256)}).save(other / "tokenizer")
    assert_user_error(capsys, "trained with another tokenizer", main, ["--base", str(other), "--num-steps", "2"])


def test_damaged_base_checkpoint(base_run, tmp_path, capsys, conversations, validation):
    damaged = tmp_path / "damaged"
    shutil.copytree(base_run, damaged)
    model_file = damaged / "model_000008.pt"
    model_file.write_bytes(model_file.read_bytes()[:1000])
    args = ["--base", str(damaged), "--num-steps", "2", "--run-dir", str(tmp_path / "run"), "--compile", "off",
            "--task-cap", "20", "--val-per-task", "10", "--eval-every", "-1", "--chat-eval-every", "-1"]
    assert_user_error(capsys, "model_000008.pt in", main, args)


def test_empty_mixture(base_run, tmp_path, validation):
    with pytest.raises(EmptyMixture, match="training mixture is empty"):
        sft(sft_args(base_run, tmp_path / "run", "--num-steps", "2"), [], validation)
