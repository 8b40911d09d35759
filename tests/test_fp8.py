"""fp8 linear layers: the arithmetic (torch._scaled_mm also runs on a CPU, slowly), the swap in a GPT, and the
refusal of --fp8 where there are no fp8 tensor cores. The same on a Hopper GPU: tests/test_gpu.py."""
import pytest
import torch

from conftest import one_line_error, run_python
from nanochat_nb.fp8 import Fp8Linear, Fp8Matmul, Fp8Unavailable, convert_to_fp8, require_fp8, to_fp8
from nanochat_nb.gpt import GPT, GPTConfig


def relative_error(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def test_to_fp8_scales_to_the_format_top():
    x = torch.randn(256, 64) * 1e-3  # far below e4m3's normal range unscaled
    for fp8_dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
        q, inverse = to_fp8(x, fp8_dtype)
        assert q.dtype == fp8_dtype and q.float().abs().max() == torch.finfo(fp8_dtype).max
        assert relative_error(q.float() * inverse, x) < 0.08
    assert to_fp8(torch.zeros(4, 4), torch.float8_e4m3fn)[0].float().abs().max() == 0  # no division by zero


def test_fp8_matmul_agrees_with_full_precision():
    torch.manual_seed(0)
    x = torch.randn(256, 128, requires_grad=True)
    weight = (torch.randn(192, 128) / 12).requires_grad_()
    grad = torch.randn(256, 192)
    out = Fp8Matmul.apply(x, weight)
    out.backward(grad)
    fp8_grads = x.grad, weight.grad
    x.grad = weight.grad = None
    (x @ weight.t()).backward(grad)
    assert fp8_grads[1].dtype == weight.dtype
    for ours, exact in [(out, x @ weight.t()), (fp8_grads[0], x.grad), (fp8_grads[1], weight.grad)]:
        assert 0 < relative_error(ours, exact) < 0.1


def test_converted_gpt_keeps_its_parameters_and_evaluates_unchanged():
    torch.manual_seed(0)
    model = GPT(GPTConfig.from_depth(2, vocab_size=256, sequence_len=32), compute_dtype=torch.float32).init_weights()
    torch.nn.init.normal_(model.transformer.h[1].mlp.c_proj.weight, std=0.02)
    reference = GPT(model.config, compute_dtype=torch.float32)
    reference.load_state_dict(model.state_dict())
    params = [id(p) for p in model.parameters()]
    convert_to_fp8(model)
    fp8_layers = [name for name, m in model.named_modules() if isinstance(m, Fp8Linear)]
    assert len(fp8_layers) == 12 and not any("ve_gate" in name or "lm_head" in name for name in fp8_layers)
    assert [id(p) for p in model.parameters()] == params and model.state_dict().keys() == reference.state_dict().keys()
    idx = torch.randint(0, 256, (2, 32))
    model.eval(), reference.eval()
    assert torch.equal(model(idx), reference(idx))
    model.train(), reference.train()
    loss, exact = model(idx, idx), reference(idx, idx)
    loss.backward(), exact.backward()
    assert 0 < abs(loss.item() - exact.item()) < 0.01
    grad, exact_grad = model.transformer.h[1].mlp.c_fc.weight.grad, reference.transformer.h[1].mlp.c_fc.weight.grad
    assert 0 < relative_error(grad, exact_grad) < 0.15


def test_require_fp8_refuses_the_cpu():
    with pytest.raises(Fp8Unavailable, match="needs a Hopper GPU.*on the cpu: drop --fp8"):
        require_fp8("cpu")


def test_train_cli_refuses_fp8_on_cpu_in_one_line(tmp_path):
    done = run_python("-m", "nanochat_nb.train", "--depth", "2", "--fp8", "--device-type", "cpu",
                      "--run-dir", str(tmp_path / "run"), timeout=120)
    message = one_line_error(done, "nanochat-base-train")
    assert "--fp8 needs a Hopper GPU" in message and not (tmp_path / "run").exists()
