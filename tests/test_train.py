"""Base training (chapter 6): the depth dial, a tiny real run, exact resume after SIGKILL, atomic checkpoints,
torchrun, divergence and bad input."""
import math
import shutil
from pathlib import Path

import pytest
import torch

from conftest import REPO, assert_user_error, run_python
from nanochat_nb.checkpoint import load as load_checkpoint, steps as checkpoint_steps
from nanochat_nb.common import read_log
from nanochat_nb.train import BASE_LRS, REF_BATCH, Trainer, build_model, build_optimizer, derive_plan, main

STEPS, SAVE_EVERY = 24, 8
# At a 1K-token batch the sqrt(B/B_ref) rule gives learning rates ~23x below the reference; 10x them so that
# a couple of dozen steps visibly learn.
FAST_LRS = [flag for name, lr in BASE_LRS.items() if name != "smear"
            for flag in (f"--{name.replace('_', '-')}-lr", str(10 * lr))]
TINY = ["--depth", "2", "--max-seq-len", "128", "--device-batch-size", "4", "--total-batch-size", "1024",
        "--num-iterations", str(STEPS), "--warmup-steps", "4", "--compile", "off", "--sample-every", "-1",
        "--eval-tokens", "4096", *FAST_LRS]


def tiny_flags(tokenizer, run_dir, *extra):
    return [*TINY, "--tokenizer-dir", str(tokenizer.folder), "--run-dir", str(run_dir), *extra]


def train_process(*args, check=True):
    done = run_python(*args, env={"OMP_NUM_THREADS": "1"} if "torch.distributed.run" in args else None)
    if check:
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    return done


def losses(run_dir: Path) -> dict:
    "step -> training loss; a step trained twice (killed, then resumed) counts with its last record."
    return {r["step"]: r["loss"] for r in read_log(run_dir / "log.jsonl") if "loss" in r}


def final_weights(run_dir: Path) -> dict:
    return torch.load(run_dir / f"model_{STEPS:06d}.pt", weights_only=True)


@pytest.fixture(scope="module")
def reference_run(tokenizer, tmp_path_factory):
    "An uninterrupted tiny run on the real shards, with checkpoints every 8 steps and evaluations."
    run_dir = tmp_path_factory.mktemp("reference")
    train_process("-m", "nanochat_nb.train", *tiny_flags(tokenizer, run_dir, "--save-every", str(SAVE_EVERY),
                                                         "--eval-every", str(SAVE_EVERY), "--sample-every", "12"))
    return run_dir


# ---- the depth dial ---------------------------------------------------------------------------------------
def test_dial_reproduces_the_reference_table():
    expected = {12: (2**19, 2520, 0.28), 20: (2**20, 4980, 0.1002), 24: (2**20, 8352, 0.0597)}
    for depth, (batch, steps, decay) in expected.items():
        plan = derive_plan(depth, world_size=8)
        assert (plan.total_batch_size, plan.num_iterations) == (batch, steps)
        assert plan.weight_decay == pytest.approx(decay, abs=1e-4)
        assert plan.grad_accum_steps == batch // (32 * 2048 * 8)
    assert derive_plan(12).n_embd == 768 and derive_plan(24).n_head == 12
    assert derive_plan(12).num_scaling_params == 84_935_088 + 25_165_824   # matrices + head, 32K vocab
    assert derive_plan(8).num_scaling_params == 25_166_016 + 16_777_216


def test_dial_horizons_and_scaling():
    plan = derive_plan(4, total_batch_size=4096, device_batch_size=8, max_seq_len=512, num_iterations=120)
    assert (plan.num_iterations, plan.grad_accum_steps, plan.horizon) == (120, 1, "num_iterations")
    assert plan.lr_scale == pytest.approx(math.sqrt(4096 / REF_BATCH))
    assert plan.lrs["wte"] == pytest.approx(0.3 * plan.lr_scale * (256 / 768) ** -0.5)
    assert plan.lrs["smear"] == 0.2 and plan.lrs["muon 256x256"] == pytest.approx(0.02 * plan.lr_scale)
    assert plan.lrs["muon 1024x256"] == pytest.approx(2 * 0.02 * plan.lr_scale)   # Muon's shape factor, sqrt(4)
    budget = derive_plan(6, target_flops=1e15)
    assert budget.horizon == "target_flops"
    assert budget.num_iterations == round(1e15 / (budget.flops_per_token * budget.total_batch_size))


def test_dial_counts_match_the_model():
    from nanochat_nb.gpt import GPT, GPTConfig
    for depth in (1, 2, 4, 6, 12):
        plan = derive_plan(depth, 2048, max_seq_len=512, total_batch_size=2**19)
        assert plan.model_config() == {k: v for k, v in vars(GPTConfig.from_depth(
            depth, vocab_size=2048, sequence_len=512)).items() if k in plan.model_config()}
        with torch.device("meta"):
            model = GPT(GPTConfig(**plan.model_config()))
        assert plan.num_scaling_params == model.num_scaling_params()
        # the model's FLOPs: every linear weight, the 24-weight smear gate included (SPEC; nanochat leaves it out)
        assert plan.flops_per_token == model.estimate_flops()


def test_the_printed_learning_rates_are_the_optimizers():
    plan = derive_plan(4, total_batch_size=4096, device_batch_size=8, max_seq_len=512, num_iterations=120,
                       base_lrs={"matrix": 0.03})
    optimizer = build_optimizer(plan, build_model(plan, torch.device("cpu")), world_size=1)
    assert {g["name"]: g["lr"] for g in optimizer.param_groups} == plan.lrs


def test_schedules():
    plan = derive_plan(12, num_iterations=1000)
    assert plan.lr_multiplier(0) == pytest.approx(1 / 40) and plan.lr_multiplier(39) == 1.0
    assert plan.lr_multiplier(350) == 1.0 and plan.lr_multiplier(1000) == pytest.approx(0.05)
    assert plan.muon_momentum(0) == 0.85 and plan.muon_momentum(1000) == pytest.approx(0.90)
    assert plan.muon_weight_decay(500) == pytest.approx(plan.weight_decay / 2)


# ---- bad input: a clear error before any work -------------------------------------------------------------
@pytest.mark.parametrize("flags, message", [
    (["--depth", "0"], "--depth must be a positive"),
    (["--total-batch-size", "1000"], "not a multiple of device batch"),
    (["--tokenizer-dir", "MISSING"], "nanochat-tok-train"),
    (["--depth", "1", "--aspect-ratio", "16", "--head-dim", "16"], "at least 24 channels"),
])
def test_bad_input_fails_before_any_work(tokenizer, tmp_path, capsys, flags, message):
    run_dir = tmp_path / "run"
    argv = tiny_flags(tokenizer, run_dir, *flags)
    if "MISSING" in flags:
        argv[argv.index("MISSING")] = str(tmp_path / "no_tokenizer")
    assert_user_error(capsys, message, main, argv)
    assert not run_dir.exists()



def test_dry_run_prints_the_plan_and_an_estimate(tokenizer, tmp_path, capsys):
    main(tiny_flags(tokenizer, tmp_path / "run", "--dry-run"))
    out = capsys.readouterr().out
    assert "24 steps" in out and "estimate" in out and "tok/s" in out
    assert not (tmp_path / "run").exists()


# ---- real training ----------------------------------------------------------------------------------------
def test_tiny_run_learns(reference_run, tokenizer):
    trained = losses(reference_run)
    assert sorted(trained) == list(range(1, STEPS + 1))
    uniform = math.log(tokenizer.vocab_size)   # the loss of a model that knows nothing
    assert trained[1] == pytest.approx(uniform, abs=0.2)
    last = [trained[step] for step in range(STEPS - 7, STEPS + 1)]
    assert sum(last) / len(last) < uniform - 1.5, trained
    val = [r["val_bpb"] for r in read_log(reference_run / "log.jsonl") if "val_bpb" in r]
    assert val[-1] < 0.8 * val[0], val
    assert checkpoint_steps(reference_run) == [8, 16, 24]
    assert (reference_run / "tokenizer").is_dir() and (reference_run / "plan.json").is_file()
    records = read_log(reference_run / "log.jsonl")
    assert any("samples" in r for r in records)


def test_exact_resume_after_sigkill(reference_run, tokenizer, tmp_path):
    killed = train_process(str(REPO / "tests" / "train_kill.py"), "after-step", "11", "--",
                           *tiny_flags(tokenizer, tmp_path, "--save-every", str(SAVE_EVERY),
                                       "--eval-every", str(SAVE_EVERY), "--sample-every", "12"), check=False)
    assert killed.returncode == -9, killed.stderr[-3000:]
    assert checkpoint_steps(tmp_path) == [8] and max(losses(tmp_path)) == 11
    train_process("-m", "nanochat_nb.train", *tiny_flags(tokenizer, tmp_path, "--save-every", str(SAVE_EVERY),
                  "--eval-every", str(SAVE_EVERY), "--sample-every", "12", "--resume"))
    assert losses(tmp_path) == losses(reference_run)   # bitwise: the same floats
    resumed, reference = final_weights(tmp_path), final_weights(reference_run)
    assert all(torch.equal(resumed[k], reference[k]) for k in reference)


def test_kill_while_writing_a_checkpoint_keeps_the_previous_one(reference_run, tokenizer, tmp_path):
    flags = tiny_flags(tokenizer, tmp_path, "--save-every", str(SAVE_EVERY), "--eval-every", "-1")
    killed = train_process(str(REPO / "tests" / "train_kill.py"), "mid-write", "16", "--", *flags, check=False)
    assert killed.returncode == -9, killed.stderr[-3000:]
    assert checkpoint_steps(tmp_path) == [8]
    assert list(tmp_path.glob(".model_000016.pt.tmp*")), "the half-written file should be there, unnamed"
    model_state, optim_state, meta = load_checkpoint(tmp_path)
    assert meta["step"] == 8 and optim_state is not None
    train_process("-m", "nanochat_nb.train", *flags, "--resume")
    assert losses(tmp_path) == losses(reference_run)
    assert not list(tmp_path.glob(".*.tmp*"))


def test_refuses_a_checkpoint_of_another_depth_and_never_overwrites(reference_run, tokenizer, capsys):
    assert_user_error(capsys, "depth 2 with vocab 2048, but this run is depth 3", main,
                      tiny_flags(tokenizer, reference_run, "--depth", "3", "--resume"))
    assert_user_error(capsys, "already holds checkpoints", main, tiny_flags(tokenizer, reference_run))
    assert checkpoint_steps(reference_run) == [8, 16, 24]


def test_divergence_stops_with_a_clear_message_and_keeps_the_last_checkpoint(tokenizer, tmp_path, monkeypatch,
                                                                             capsys):
    step = Trainer._optimizer_step

    def poisoned_step(self):
        step(self)
        if self.state.step == 5:   # after the update of step 6, the weights are NaN
            next(self.model.parameters()).data.fill_(float("nan"))
    monkeypatch.setattr(Trainer, "_optimizer_step", poisoned_step)
    err = assert_user_error(capsys, "loss became nan at step 7", main,
                            tiny_flags(tokenizer, tmp_path, "--save-every", "4", "--eval-every", "-1"))
    assert "last good checkpoint is step 4" in err
    assert checkpoint_steps(tmp_path) == [4]


def test_torchrun_two_processes_match_one_with_twice_the_accumulation(tokenizer, tmp_path):
    # the reference learning rates (not 10x): fp32 rounding differences then grow slowly enough to compare
    base_lrs = [flag for name, lr in BASE_LRS.items() for flag in (f"--{name.replace('_', '-')}-lr", str(lr))]
    flags = ["--num-iterations", "6", "--eval-every", "-1", *base_lrs]
    train_process("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "nanochat_nb.train",
                  *tiny_flags(tokenizer, tmp_path / "two", *flags))
    train_process("-m", "nanochat_nb.train", *tiny_flags(tokenizer, tmp_path / "one", *flags, "--emulate-ranks", "2"))
    two, one = losses(tmp_path / "two"), losses(tmp_path / "one")
    assert sorted(two) == sorted(one) == list(range(1, 7))
    assert two[1] == one[1]   # the same data and weights: the first loss is the same float
    for step in two:
        assert two[step] == pytest.approx(one[step], rel=1e-5), (step, two[step], one[step])


@pytest.mark.parametrize("launcher", ["compiled", "torchrun"])
def test_exact_resume_compiled_and_under_torchrun(tokenizer, tmp_path, launcher):
    "Resuming from step 4 in a fresh run replays steps 5-8 bit for bit, with torch.compile on or on 2 processes."
    prefix = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"] if launcher == "torchrun" else []
    extra = ["--compile", "on"] if launcher == "compiled" else []
    run = lambda folder, *more: train_process(*prefix, "-m", "nanochat_nb.train", *tiny_flags(
        tokenizer, folder, "--num-iterations", "8", "--save-every", "4", "--eval-every", "-1", *extra, *more))
    run(tmp_path / "whole")
    shutil.copytree(tmp_path / "whole", tmp_path / "resumed")
    run(tmp_path / "resumed", "--resume-step", "4")
    whole, resumed = losses(tmp_path / "whole"), losses(tmp_path / "resumed")
    assert sorted(whole) == list(range(1, 9)) and all(resumed[s] == whole[s] for s in range(5, 9)), (whole, resumed)
    final = [torch.load(folder / "model_000008.pt", weights_only=True) for folder in (tmp_path / "whole", tmp_path / "resumed")]
    assert all(torch.equal(final[0][k], final[1][k]) for k in final[0])


def test_a_step_faster_than_the_measured_peak_remeasures_it():
    "A peak measured while the machine was busy comes out low: MFU never reads above 100%, it re-measures instead."
    import math
    from types import SimpleNamespace

    from nanochat_nb.train import Trainer, format_mfu
    run = SimpleNamespace(peak_flops=1.0, device=torch.device("cpu"), dtype=torch.float32,
                          dist=SimpleNamespace(world_size=1))
    share = Trainer.mfu(run, 1e6)  # 1 MFLOP/s against the 1 FLOP/s a disturbed start "measured"
    assert run.peak_flops > 1e8 and share == pytest.approx(1e6 / run.peak_flops)
    unknown = Trainer.mfu(run, 1e16)  # above any fresh measurement of this CPU: no figure at all
    assert math.isnan(unknown) and format_mfu(unknown) == "?" and format_mfu(share) == f"{100 * share:.1f}%"
