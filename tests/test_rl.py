"""Reinforcement learning (chapter 14): a toy policy learns, prompt and forced tokens carry no gradient, group
advantages, a real RL run of a tiny SFT model that resumes exactly, the command line at preset tiny, bad input."""
import pytest
import torch

from conftest import assert_user_error
from nanochat_nb import checkpoint, tasks
from nanochat_nb.common import read_log
from nanochat_nb.engine import Engine
from nanochat_nb.gpt import GPT, GPTConfig
from nanochat_nb.optim import setup_optimizer
from nanochat_nb.rl import (Group, RLTrainer, backward_policy_gradient, build_parser, group_advantages, group_rows,
                            main, pass_at_k, policy_gradient_loss, rl, sample_group, score_group, stack_rows)
from nanochat_nb.sft import build_parser as sft_parser, sft
from nanochat_nb.train import build_parser as base_parser, train

SEQ = 256


def tiny_gpt(vocab_size: int, seed: int = 0, sequence_len: int = SEQ) -> GPT:
    torch.manual_seed(seed)
    return GPT(GPTConfig(sequence_len=sequence_len, vocab_size=vocab_size, n_layer=2, n_head=2, n_kv_head=2,
                         n_embd=64)).init_weights()


class FirstTokenIsDigit(tasks.Task):
    "One question; an answer is right when it starts with a digit (about one token in twenty of the test vocabulary)."
    eval_type = "generative"

    def num_examples(self):
        return 1

    def example(self, index):
        return {"messages": [{"role": "user", "content": "Say a number."}, {"role": "assistant", "content": "7"}]}

    def evaluate(self, conversation, completion):
        return completion[:1].isdigit()


# ---- a toy policy learns ----------------------------------------------------------------------------------
def test_a_few_rl_steps_raise_the_reward_of_a_toy_policy(tokenizer, one_thread):
    task = FirstTokenIsDigit()
    prompt = tokenizer.render_for_completion(task[0])
    digits = torch.tensor([tokenizer.decode([i])[:1].isdigit() for i in range(tokenizer.vocab_size)])

    def expected_reward(model) -> float:   # exact: the probability of a first token that starts with a digit
        with torch.no_grad():
            return float(model(torch.tensor([prompt]))[0, -1].softmax(-1)[digits].sum())

    starts, ends, sampled = [], [], []
    for seed in range(3):
        model = tiny_gpt(tokenizer.vocab_size, seed, 64)
        optimizer = setup_optimizer(model.param_groups(), model.config.n_embd, lr_scale=1.0)
        engine = Engine(model, tokenizer)
        starts.append(expected_reward(model))
        for step in range(12):
            model.eval()
            groups = [score_group(sample_group(engine, prompt, 8, max_tokens=1, top_k=None, seed=1000 * step + 8 * q),
                                  task, task[0], engine) for q in range(4)]
            sampled.append(sum(sum(g.rewards) for g in groups) / 32)
            model.train()
            backward_policy_gradient(model, groups, sum(g.num_sampled for g in groups), 32, tokenizer.bos_id)
            optimizer.step()
            model.zero_grad(set_to_none=True)
        ends.append(expected_reward(model))
    print(f"expected reward {starts} -> {ends}")
    assert sum(ends) / 3 > sum(starts) / 3 + 0.1, (starts, ends)
    assert all(end > start for start, end in zip(starts, ends)), (starts, ends)
    # the sampled rewards rise too: the first two steps of each seed against its last two
    first = [sampled[12 * s] for s in range(3)] + [sampled[12 * s + 1] for s in range(3)]
    last = [sampled[12 * s + 11] for s in range(3)] + [sampled[12 * s + 10] for s in range(3)]
    assert sum(last) > sum(first), sampled


# ---- the loss and its gradient ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def forced_group(tokenizer):
    "Four answers to a GSM8K question that each start with a calculator call: the engine forces its output."
    conversation = tasks.GSM8K("test")[0]
    prompt = tokenizer.render_for_completion(conversation)
    engine = Engine(tiny_gpt(tokenizer.vocab_size, 1), tokenizer)
    call = [tokenizer.id_of("<|python_start|>"), *tokenizer.encode("12*7"), tokenizer.id_of("<|python_end|>")]
    answers, flags = [[] for _ in range(4)], [[] for _ in range(4)]
    for token in engine.stream(prompt, 4, max_tokens=20, seed=3, force=call):
        answers[token.row].append(token.id)
        flags[token.row].append(int(token.sampled))
    group = Group(prompt, answers, flags, [1.0, 0.0, 0.0, 1.0])
    output = tokenizer.encode("84")
    assert all(a[len(call):len(call) + len(output) + 2] == [tokenizer.id_of("<|output_start|>"), *output,
                                                            tokenizer.id_of("<|output_end|>")] for a in answers)
    return engine.model, group


def test_prompt_and_forced_tokens_get_exactly_zero_gradient(forced_group, tokenizer):
    model, group = forced_group
    inputs, targets, weights = stack_rows(group_rows(group), tokenizer.bos_id)
    advantages = group_advantages(torch.tensor(group.rewards))
    for r, (answer, flags) in enumerate(zip(group.answers, group.sampled)):
        start = len(group.prompt) - 1   # the target of position start is the answer's first token
        assert (weights[r, :start] == 0).all() and (targets[r, :start] == -1).all()          # the prompt
        expected = torch.tensor([float(advantages[r]) * f for f in flags])
        assert torch.equal(weights[r, start:start + len(answer)], expected)
        forced = torch.tensor(flags) == 0
        assert forced.sum() >= 6 and (targets[r, start:start + len(answer)][forced] == -1).all()
        assert (weights[r, start + len(answer):] == 0).all()                                  # padding
    model.train().zero_grad(set_to_none=True)
    logits = model(inputs)
    logits.retain_grad()
    logprobs = torch.log_softmax(logits, -1).gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1) * (targets >= 0)
    policy_gradient_loss(logprobs, weights, group.num_sampled).backward()
    per_position = logits.grad.abs().sum(-1)
    assert torch.equal(per_position[weights == 0], torch.zeros(int((weights == 0).sum())))
    assert (per_position[weights != 0] > 0).all()
    by_logits = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    loss = backward_policy_gradient(model, [group], group.num_sampled, batch_size=3, pad=tokenizer.bos_id)
    assert loss != 0
    for name, p in model.named_parameters():
        assert torch.allclose(p.grad, by_logits[name], rtol=1e-4, atol=1e-7), name


def test_advantages_sum_to_zero_and_a_uniform_group_gives_no_gradient(forced_group, tokenizer):
    generator = torch.Generator().manual_seed(0)
    for size in (2, 5, 16):
        rewards = torch.randint(0, 2, (size,), generator=generator).double()
        assert abs(float(group_advantages(rewards).sum())) < 1e-12
        assert float(group_advantages(torch.rand(size, generator=generator, dtype=torch.float64)).sum()) == pytest.approx(0, abs=1e-12)
    model, group = forced_group
    model.train()
    uniform = Group(group.prompt, group.answers, group.sampled, [1.0] * 4)
    for rewards in ([0.0] * 4, [1.0] * 4):
        uniform.rewards = rewards
        inputs, targets, weights = stack_rows(group_rows(uniform), tokenizer.bos_id)
        model.zero_grad(set_to_none=True)
        policy_gradient_loss(-model(inputs, targets, loss_reduction="none"), weights, uniform.num_sampled).backward()
        assert all(torch.equal(p.grad, torch.zeros_like(p)) for p in model.parameters())   # computed: exactly 0
        model.zero_grad(set_to_none=True)
        assert backward_policy_gradient(model, [uniform], 100, 4, tokenizer.bos_id) == 0
        assert all(p.grad is None for p in model.parameters())                              # skipped: nothing run
    # next to a contested group, a uniform one changes nothing
    def grads(groups):
        model.zero_grad(set_to_none=True)
        backward_policy_gradient(model, groups, 200, 4, tokenizer.bos_id)
        return [p.grad.clone() for p in model.parameters()]
    assert all(torch.equal(a, b) for a, b in zip(grads([group]), grads([group, uniform])))


def test_pass_at_k():
    assert pass_at_k(8, 0, 1) == 0 and pass_at_k(8, 8, 8) == 1 and pass_at_k(8, 2, 1) == 0.25
    assert pass_at_k(4, 1, 2) == pytest.approx(0.5) and pass_at_k(8, 1, 8) == 1


# ---- a real run ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def sft_run(tokenizer, tmp_path_factory):
    "A depth-2 base run (8 steps) fine-tuned for 6 steps on GSM8K train, as in the SFT tests."
    root = tmp_path_factory.mktemp("rl")
    fast = ["--matrix-lr", "0.2", "--embedding-lr", "3", "--unembedding-lr", "0.08", "--value-embedding-lr", "1.5"]
    train(base_parser().parse_args([
        "--depth", "2", "--max-seq-len", str(SEQ), "--device-batch-size", "2", "--total-batch-size", "1024",
        "--num-iterations", "8", "--warmup-steps", "2", "--eval-every", "-1", "--sample-every", "-1",
        "--compile", "off", "--tokenizer-dir", str(tokenizer.folder), "--run-dir", str(root / "base"), *fast]))
    sft(sft_parser().parse_args(["--base", str(root / "base"), "--run-dir", str(root / "sft"), "--num-steps", "6",
                                 "--compile", "off", "--eval-every", "-1", "--chat-eval-every", "-1"]),
        tasks.GSM8K("train", stop=200), tasks.GSM8K("test", stop=20))
    return root / "sft"


class AnswerHasDigit(tasks.Task):
    """GSM8K train questions, rewarded when the answer's first 12 characters hold a digit: a reward a tiny SFT model
    earns about half the time, so that the groups have contrast (on GSM8K proper every reward of it is 0)."""
    eval_type = "generative"

    def __init__(self, split="train"):
        super().__init__()
        self.questions = tasks.GSM8K(split, stop=64)

    def num_examples(self):
        return len(self.questions)

    def example(self, index):
        return self.questions[index]

    def evaluate(self, conversation, completion):
        return any(c.isdigit() for c in completion[:12])


RUN = ["--rl-steps", "4", "--save-every", "2", "--examples-per-step", "2", "--num-samples", "4",
       "--max-new-tokens", "16", "--rl-eval-every", "2", "--rl-eval-examples", "3", "--pass-k", "4",
       "--device-batch-size", "3", "--compile", "off"]


def rl_args(sft_dir, run_dir, *extra):
    return build_parser().parse_args(["--base", str(sft_dir), "--run-dir", str(run_dir), *RUN, *extra])


def history(run_dir) -> dict:
    records = read_log(run_dir / "log.jsonl")
    return {"loss": {r["step"]: r["loss"] for r in records if "loss" in r},
            "reward": {r["step"]: r["reward"] for r in records if "reward" in r},
            "pass": {r["step"]: (r["pass_at_1"], r["pass_at_k"]) for r in records if "pass_at_1" in r}}


@pytest.fixture(scope="module")
def reference_rl(sft_run, tmp_path_factory, one_thread):
    run_dir = tmp_path_factory.mktemp("rl_ref") / "run"
    summary = rl(rl_args(sft_run, run_dir), AnswerHasDigit("train"), AnswerHasDigit("test"))
    return run_dir, summary


def test_rl_run_learns_from_contested_groups(reference_rl, sft_run):
    run_dir, summary = reference_rl
    seen = history(run_dir)
    assert sorted(seen["loss"]) == [1, 2, 3, 4] and sorted(seen["pass"]) == [0, 2, 4]
    assert 0 < sum(seen["reward"].values()) < 4 and any(loss != 0 for loss in seen["loss"].values())
    assert checkpoint.steps(run_dir) == [2, 4] and summary["step"] == 4 and summary["k"] == 4
    meta = checkpoint.read_meta(run_dir, 4)
    assert meta["base"] == {"folder": str(sft_run), "step": 6}
    sft_lrs = checkpoint.read_meta(sft_run, 6)["plan"]["lrs"]
    assert meta["plan"]["lrs"] == pytest.approx({name: 0.05 / 0.8 * lr for name, lr in sft_lrs.items()})
    rl_weights, sft_weights = (torch.load(d / f"model_{s:06d}.pt", weights_only=True) for d, s in ((run_dir, 4), (sft_run, 6)))
    assert any(not torch.equal(rl_weights[k], sft_weights[k]) for k in sft_weights)


def test_interrupted_rl_run_resumes_exactly(reference_rl, sft_run, tmp_path, monkeypatch, one_thread):
    reference_dir, _ = reference_rl
    record = RLTrainer._record

    def record_then_stop(self, *args, **metrics):
        out = record(self, *args, **metrics)
        if self.state.step == 3:
            raise KeyboardInterrupt   # killed after step 3; the last checkpoint is step 2
        return out
    monkeypatch.setattr(RLTrainer, "_record", record_then_stop)
    with pytest.raises(KeyboardInterrupt):
        rl(rl_args(sft_run, tmp_path), AnswerHasDigit("train"), AnswerHasDigit("test"))
    assert checkpoint.steps(tmp_path) == [2]
    monkeypatch.setattr(RLTrainer, "_record", record)
    rl(rl_args(sft_run, tmp_path, "--resume"), AnswerHasDigit("train"), AnswerHasDigit("test"))
    resumed, reference = history(tmp_path), history(reference_dir)
    assert resumed == reference, (resumed, reference)   # bit for bit: losses, rewards, pass@k
    weights = [torch.load(d / "model_000004.pt", weights_only=True) for d in (tmp_path, reference_dir)]
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[1])


def test_command_line_at_preset_tiny(sft_run, tmp_path, capsys, one_thread):
    main(["--preset", "tiny", "--base", str(sft_run), "--run-dir", str(tmp_path / "run")])
    out = capsys.readouterr().out
    assert "done: step" in out and "pass@1" in out
    records = read_log(tmp_path / "run" / "log.jsonl")
    assert [r["step"] for r in records if "pass_at_1" in r][0] == 0 and checkpoint.steps(tmp_path / "run")


# ---- bad input ----------------------------------------------------------------------------------------------
def test_no_sft_run(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("NANOCHAT_HOME", str(tmp_path))
    assert_user_error(capsys, "No SFT model under", main, ["--rl-steps", "2"])


@pytest.mark.parametrize("flags, message", [
    (["--num-samples", "1"], "--num-samples must be at least 2"),
    (["--examples-per-step", "0"], "--examples-per-step must be at least 1"),
    (["--temperature", "0"], "--temperature must be above 0"),
    (["--preset", "nope"], "Unknown preset 'nope'"),
    (["--max-new-tokens", "1000"], "leaves no room for a question"),
])
def test_bad_options(sft_run, tmp_path, capsys, flags, message):
    assert_user_error(capsys, message, main, ["--base", str(sft_run), "--run-dir", str(tmp_path / "run"),
                                              "--rl-steps", "2", "--compile", "off", *flags])


def test_resume_without_checkpoints(sft_run, tmp_path, capsys):
    assert_user_error(capsys, "no checkpoint in", main, ["--base", str(sft_run), "--run-dir", str(tmp_path / "run"),
                                                         "--rl-steps", "2", "--max-new-tokens", "16", "--resume",
                                                         "--compile", "off"])
