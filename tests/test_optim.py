"""The optimizer: Polar Express orthogonalises, the groups get the depth dial's learning rates, and the
distributed optimizer (two real processes under torchrun) matches the single-process one and resumes exactly."""
import math
import sys

import pytest
import torch
from torch import nn

from conftest import REPO, run_python
from nanochat_nb.gpt import GPT, GPTConfig
from nanochat_nb.optim import MuonAdamW, adamw_step_, polar_express, row_equilibrate, setup_optimizer

sys.path.insert(0, str(REPO / "tests"))
from dist_optim_worker import new_optimizer, tiny_gpt  # noqa: E402


@pytest.mark.parametrize("shape", [(64, 256), (256, 64), (300, 200), (200, 300), (96, 1024), (1024, 96), (2, 12)])
def test_polar_express_is_nearly_orthogonal(shape):
    torch.manual_seed(0)
    G = torch.randn(*shape) * 1e-3
    s = torch.linalg.svdvals(polar_express(G))
    assert 1 - 0.141 - 1e-3 < s.min() and s.max() < 1 + 0.141 + 1e-3, (s.min(), s.max())
    O = polar_express(G)
    m, n = shape
    gram = O @ O.T if m <= n else O.T @ O  # the small Gram matrix is close to the identity
    assert (gram - torch.eye(min(m, n))).abs().max() < 0.31


def test_polar_express_on_a_stack_and_after_row_equilibration():
    torch.manual_seed(0)
    stack = torch.randn(4, 128, 384)
    out = polar_express(row_equilibrate(stack))
    for i in range(4):
        s = torch.linalg.svdvals(out[i])
        assert 0.85 < s.min() and s.max() < 1.15
        assert torch.allclose(out[i], polar_express(row_equilibrate(stack[i])), atol=1e-5)
    rows = row_equilibrate(stack).norm(dim=-1)
    assert torch.allclose(rows, rows.mean(dim=-1, keepdim=True), rtol=1e-4)


def test_adamw_matches_pytorch():
    torch.manual_seed(0)
    ours = torch.randn(16, 8)
    ref = nn.Parameter(ours.clone())
    opt = torch.optim.AdamW([ref], lr=0.02, betas=(0.8, 0.95), eps=1e-10, weight_decay=0.05)
    m, v = torch.zeros_like(ours), torch.zeros_like(ours)
    for step in range(1, 8):
        grad = torch.randn(16, 8)
        adamw_step_(ours, grad, m, v, step=step, lr=0.02, beta1=0.8, beta2=0.95, eps=1e-10, weight_decay=0.05)
        ref.grad = grad
        opt.step()
    assert torch.allclose(ours, ref.detach(), atol=1e-6)


@pytest.mark.parametrize("depth, lr_scale", [(2, 1.0), (4, 0.125)])
def test_group_learning_rates_follow_the_spec(depth, lr_scale):
    with torch.device("meta"):
        model = GPT(GPTConfig.from_depth(depth, vocab_size=512, sequence_len=64))
    dim = model.transformer.wte.weight.shape[1]
    opt = setup_optimizer(model.param_groups(), dim, lr_scale=lr_scale, weight_decay=0.2)
    width = (dim / 768) ** -0.5
    groups = {g["name"]: g for g in opt.param_groups}
    expected = {"lm_head": 0.008 * width * lr_scale, "wte": 0.3 * width * lr_scale,
                "value_embeds": 0.15 * width * lr_scale, "resid_lambdas": 0.005 * lr_scale,
                "x0_lambdas": 0.5 * lr_scale, "smear": 0.2}
    for name, lr in expected.items():
        assert groups[name]["kind"] == "adamw"
        assert math.isclose(groups[name]["lr"], lr) and groups[name]["initial_lr"] == groups[name]["lr"], name
    decays = {"lm_head": 0.01, "wte": 0.001, "value_embeds": 0.01, "resid_lambdas": 0.05, "x0_lambdas": 0.0, "smear": 0.0}
    assert {name: groups[name]["weight_decay"] for name in decays} == decays
    muon = [g for g in opt.param_groups if g["kind"] == "muon"]
    for g in muon:
        rows, cols = g["params"][0].shape
        assert all(p.shape == (rows, cols) for p in g["params"])
        assert math.isclose(g["lr"], 0.02 * lr_scale * max(1, rows / cols) ** 0.5)
        assert g["weight_decay"] == 0.2 and g["momentum"] == 0.95 and g["initial_lr"] == g["lr"]
    assert {(4 * dim, dim), (dim, 4 * dim)} <= {tuple(g["params"][0].shape) for g in muon}
    # every parameter in exactly one group; the block matrices (ve_gate included) in Muon, smear_gate in AdamW
    grouped = [p for g in opt.param_groups for p in g["params"]]
    assert len(grouped) == len({id(p) for p in grouped}) == len(list(model.parameters()))
    muon_ids = {id(p) for g in muon for p in g["params"]}
    for name, p in model.named_parameters():
        assert (id(p) in muon_ids) == name.startswith("transformer.h."), name
    named = model.param_groups()
    assert any(p is model.transformer.h[1].attn.ve_gate.weight for p in named["matrices"])
    assert any(p is model.smear_gate.weight for p in named["smear"])


def test_unknown_parameters_and_bad_groups_are_refused():
    with torch.device("meta"):
        model = GPT(GPTConfig.from_depth(1, vocab_size=64, sequence_len=16))
    model.mystery = nn.Parameter(torch.zeros(3))
    with pytest.raises(ValueError, match="'mystery'"):
        model.param_groups()
    with pytest.raises(ValueError, match="'mystery'"):
        setup_optimizer({"mystery": [model.mystery]}, 8)
    with pytest.raises(ValueError, match="one shape"):
        MuonAdamW([dict(kind="muon", lr=0.02, params=[nn.Parameter(torch.zeros(4, 4)), nn.Parameter(torch.zeros(4, 8))])])
    with pytest.raises(ValueError, match="kind"):
        MuonAdamW([dict(lr=0.1, params=[nn.Parameter(torch.zeros(3))])])


def test_muon_adamw_fits_a_batch_of_real_text():
    from dist_optim_worker import real_batches
    inputs, targets = real_batches(1)[0]
    model = tiny_gpt()
    opt = setup_optimizer(model.param_groups(), model.config.n_embd, lr_scale=0.5)
    losses = []
    for _ in range(4):
        loss = model(inputs, targets)
        loss.backward()
        opt.step()
        model.zero_grad(set_to_none=True)
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.3, losses


def test_distributed_optimizer_matches_single_process_and_resumes(tmp_path):
    worker = str(REPO / "tests" / "dist_optim_worker.py")
    single = run_python(worker, str(tmp_path), timeout=300)
    assert single.returncode == 0, single.stderr[-3000:]
    done = run_python("-m", "torch.distributed.run", "--nproc_per_node=2", worker, str(tmp_path), timeout=300,
                      env={"OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    one, two = torch.load(tmp_path / "params_world1.pt"), torch.load(tmp_path / "params_world2.pt")
    start = tiny_gpt().state_dict()
    assert one.keys() == two.keys()
    for name in one:
        assert not torch.equal(one[name], start[name]), f"{name} never moved"
        torch.testing.assert_close(two[name], one[name], rtol=1e-5, atol=1e-6, msg=name)
    # each rank saved its own shard of the optimizer state, and resuming from them changes nothing
    shards = [torch.load(tmp_path / f"optim_world2_rank{r}.pt") for r in range(2)]
    sizes = [sum(t.numel() for s in shard["state"].values() for t in s.values() if torch.is_tensor(t)) for shard in shards]
    whole = torch.load(tmp_path / "optim_world1_rank0.pt")
    whole_size = sum(t.numel() for s in whole["state"].values() for t in s.values() if torch.is_tensor(t))
    assert max(sizes) < 0.75 * whole_size, (sizes, whole_size)
    for world in (1, 2):
        resumed = torch.load(tmp_path / f"resumed_world{world}.pt")
        reference = one if world == 1 else two
        for name in reference:
            assert torch.equal(resumed[name], reference[name]), (world, name)
    # a rank's shard does not fit a run with another number of processes: a clear error, not a wrong run
    optimizer = new_optimizer(tiny_gpt())
    with pytest.raises(ValueError, match="another number of processes"):
        optimizer.load_state_dict(shards[0])
