"""What only a CUDA GPU can check (run by `make gpu-check`, bench/gpu_check.py): the bf16 path, the fused head on
CUDA against the plain math, FA3 (where it imports) or SDPA against the reference attention, torch.compile, the KV
cache in bf16, fp8 against bf16 on Hopper, and the distributed optimizer over NCCL with 2+ GPUs. Skipped, with the
reason, where there is no GPU."""
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from conftest import REPO

CUDA = torch.cuda.is_available()
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU (run by make gpu-check)")]
HOPPER = CUDA and torch.cuda.get_device_capability()[0] >= 9


def relative_error(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def tiny_gpt(dtype=torch.bfloat16, depth=2, seq=256, vocab=1024):
    from nanochat_nb.gpt import GPT, GPTConfig
    torch.manual_seed(0)
    model = GPT(GPTConfig.from_depth(depth, vocab_size=vocab, sequence_len=seq), compute_dtype=dtype)
    model.to("cuda").init_weights()
    for block in model.transformer.h:  # the zero-initialised projections would hide half the blocks' work
        torch.nn.init.normal_(block.attn.c_proj.weight, std=0.02)
        torch.nn.init.normal_(block.mlp.c_proj.weight, std=0.02)
    return model


def test_compute_dtype_is_bf16_on_ampere_and_newer(monkeypatch):
    from nanochat_nb.common import compute_dtype_choice
    monkeypatch.delenv("NANOCHAT_DTYPE", raising=False)
    dtype, reason = compute_dtype_choice("cuda")
    assert (dtype == torch.bfloat16) == (torch.cuda.get_device_capability()[0] >= 8), reason


def test_bf16_forward_backward_tracks_fp32():
    idx = torch.randint(0, 1024, (4, 256), device="cuda")
    losses = {}
    for dtype in (torch.float32, torch.bfloat16):
        model = tiny_gpt(dtype)
        losses[dtype] = model(idx, idx)
        losses[dtype].backward()
        assert all(p.grad is None or torch.isfinite(p.grad).all() for p in model.parameters())
    assert abs(losses[torch.bfloat16].item() - losses[torch.float32].item()) < 0.02


def test_fused_head_on_cuda_matches_the_plain_math():
    from nanochat_nb.fused_head import SOFTCAP, softcap_cross_entropy
    torch.manual_seed(0)
    x = torch.randn(2048, 256, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    weight = (torch.randn(4096, 256, device="cuda") * 0.05).requires_grad_()
    targets = torch.randint(0, 4096, (2048,), device="cuda")
    targets[::7] = -1
    loss = softcap_cross_entropy(x, weight, targets)
    loss.backward()
    grads = x.grad.clone(), weight.grad.clone()
    x.grad = weight.grad = None
    logits = (x.float() @ weight.t())
    plain = F.cross_entropy(SOFTCAP * torch.tanh(logits / SOFTCAP), targets, ignore_index=-1)
    plain.backward()
    assert abs(loss.item() - plain.item()) < 1e-3
    assert relative_error(grads[0], x.grad) < 2e-2 and relative_error(grads[1], weight.grad) < 2e-2


@pytest.mark.parametrize("window", [2048, 128])
def test_attention_on_cuda_matches_the_masked_reference(window):
    from nanochat_nb.gpt import attention, flash_attention_3, window_mask
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 512, 4, 128, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    out = attention(q, k, v, window)
    mask = window_mask(512, 512, window, device="cuda")
    expected = F.scaled_dot_product_attention(*(t.transpose(1, 2).float() for t in (q, k, v)), attn_mask=mask)
    print("FA3" if flash_attention_3() is not None else "SDPA (no FA3 importable)")
    assert relative_error(out, expected.transpose(1, 2)) < 2e-2


def test_compiled_training_step_matches_eager():
    from nanochat_nb.optim import setup_optimizer
    idx = torch.randint(0, 1024, (4, 256), device="cuda")
    losses = []
    for compiled in (False, True):
        model = tiny_gpt()
        optimizer = setup_optimizer(model.param_groups(), model.config.n_embd, world_size=1, compile=compiled)
        step_model = torch.compile(model, dynamic=False) if compiled else model
        run = []
        for _ in range(3):
            loss = step_model(idx, idx)
            loss.backward()
            optimizer.step()
            model.zero_grad(set_to_none=True)
            run.append(loss.item())
        losses.append(run)
    assert losses[1][-1] < losses[1][0] and max(abs(a - b) for a, b in zip(*losses)) < 0.05


@torch.no_grad()
def test_kv_cache_decode_equals_full_forward_in_bf16():
    from nanochat_nb.gpt import KVCache
    model = tiny_gpt(seq=512).eval()
    idx = torch.randint(0, 1024, (1, 300), device="cuda")
    full = model(idx)[:, -20:].float()
    cache = KVCache(model, batch_size=1, max_len=300)
    model(idx[:, :280], kv_cache=cache)
    stepped = torch.cat([model(idx[:, t:t + 1], kv_cache=cache) for t in range(280, 300)], dim=1).float()
    assert (full.argmax(-1) == stepped.argmax(-1)).float().mean() > 0.95
    assert relative_error(stepped, full) < 3e-2


@pytest.mark.skipif(not HOPPER, reason="fp8 needs a Hopper GPU (compute capability 9.0+)")
def test_fp8_training_agrees_with_bf16():
    from nanochat_nb.fp8 import Fp8Linear, convert_to_fp8, require_fp8
    require_fp8("cuda")
    idx = torch.randint(0, 1024, (8, 256), device="cuda")
    bf16, fp8 = tiny_gpt(), convert_to_fp8(tiny_gpt())
    assert sum(isinstance(m, Fp8Linear) for m in fp8.modules()) == 12
    losses = [m(idx, idx) for m in (bf16, fp8)]
    for loss in losses:
        loss.backward()
    assert abs(losses[0].item() - losses[1].item()) < 0.02
    grads = [m.transformer.h[1].mlp.c_fc.weight.grad for m in (bf16, fp8)]
    assert 0 < relative_error(grads[1], grads[0]) < 0.15
    compiled = torch.compile(fp8, dynamic=False)
    assert abs(compiled(idx, idx).item() - losses[1].item()) < 0.02


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="the NCCL optimizer test needs 2+ GPUs")
def test_distributed_optimizer_over_nccl_matches_one_gpu(tmp_path):
    worker = str(REPO / "tests" / "dist_nccl_worker.py")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    for launcher in ([], ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]):
        done = subprocess.run([sys.executable, *launcher, worker, str(tmp_path)], capture_output=True, text=True,
                              timeout=300, cwd=REPO, env=env)
        assert done.returncode == 0, done.stderr[-3000:]
    one, two = torch.load(tmp_path / "params_world1.pt"), torch.load(tmp_path / "params_world2.pt")
    for name in one:  # bf16 sums in another order: close, not equal
        torch.testing.assert_close(two[name], one[name], rtol=2e-2, atol=2e-3, msg=name)
