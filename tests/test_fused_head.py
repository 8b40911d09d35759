"""The fused head: softcap cross-entropy == F.cross_entropy (values and gradients), C kernel == PyTorch ops,
NaN and infinite logits, and a kernel that leaves the process's floating-point state alone."""
import pytest
import torch
import torch.nn.functional as F

from conftest import run_python
from nanochat_nb.fused_head import (_softcap_ce_torch, native_softcap_ce, softcap_ce_, softcap_cross_entropy,
                                    softcap_logits)


pytestmark = pytest.mark.usefixtures("one_thread")   # tiny problems: one thread is fastest


@pytest.mark.parametrize("native", [True, False])
def test_softcap_cross_entropy_paths_agree(native, monkeypatch):
    monkeypatch.setenv("NANOCHAT_NATIVE_KERNELS", "1" if native else "0")
    native_softcap_ce.cache_clear()
    try:
        if native and native_softcap_ce() is None:
            pytest.skip("no C compiler on this machine")
        g = torch.Generator().manual_seed(4)
        x = (torch.randn(1100, 48, generator=g) * 3).requires_grad_()
        w = torch.randn(700, 48, generator=g).requires_grad_()
        t = torch.randint(0, 700, (1100,), generator=g)
        t[::9] = -1
        for reduction in ("mean", "sum"):
            ref = F.cross_entropy(softcap_logits(x @ w.t()), t, ignore_index=-1, reduction=reduction)
            out = softcap_cross_entropy(x, w, t, reduction=reduction)
            torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-4)
            for a, b in zip(torch.autograd.grad(out, (x, w)), torch.autograd.grad(ref, (x, w))):
                torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-3)
        with torch.no_grad():
            per_token = softcap_cross_entropy(x, w, t, reduction="none")
        torch.testing.assert_close(per_token, F.cross_entropy(softcap_logits(x @ w.t()), t, ignore_index=-1,
                                                              reduction="none"), atol=1e-4, rtol=1e-5)
    finally:
        native_softcap_ce.cache_clear()


def test_native_kernel_matches_torch():
    if native_softcap_ce() is None:
        pytest.skip("no C compiler on this machine")
    logits = torch.randn(3000, 16) * 40  # vocab-major (V, N), saturating logits too
    targets = torch.randint(0, 3000, (16,))
    for token, row, value in [(0, 5, 1e4), (1, 6, -1e4), (2, 7, float("inf")), (5, 9, float("-inf"))]:
        logits[row, token] = value  # far past the cap: tanh is ±1, and the token's target is that logit
        targets[token] = row
    logits[8, 4] = float("nan")  # a diverged model: its loss must say so
    targets[3] = -1
    a, b, la, lb = logits.clone(), logits.clone(), torch.empty(16), torch.empty(16)
    softcap_ce_(a, targets, la, scale=0.25)
    _softcap_ce_torch(b, targets, lb, 15.0, 0.25)
    torch.testing.assert_close(a, b, atol=1e-7, rtol=1e-4, equal_nan=True)
    torch.testing.assert_close(la, lb, atol=1e-4, rtol=1e-5, equal_nan=True)
    assert la.isnan().tolist() == [i == 4 for i in range(16)], "only the token with a NaN logit has a NaN loss"
    assert la[torch.arange(16) != 4].isfinite().all(), "±1e4 and ±inf logits give finite losses"
    assert (a[:, 3] == 0).all() and la[3] == 0, "an ignored target gets no loss and no gradient"


SUBNORMALS_AFTER_THE_KERNEL = """
import torch
from nanochat_nb.fused_head import native_softcap_ce, softcap_ce_

tiny32 = torch.tensor(torch.finfo(torch.float32).tiny / 2)  # a float32 subnormal


def subnormals_survive() -> bool:
    "False once flush-to-zero / denormals-are-zero is on: -ffast-math's crtfastmath.o turns both on at load."
    return 5e-324 * 1.0 != 0.0 and (tiny32 * 1.0).item() != 0.0


before = subnormals_survive()
if native_softcap_ce() is None:
    print("no kernel")
else:
    loaded = subnormals_survive()
    losses = torch.empty(8)
    softcap_ce_(torch.randn(300, 8), torch.zeros(8, dtype=torch.long), losses)
    assert losses.isfinite().all()
    print(before, loaded, subnormals_survive())
"""


def test_kernel_leaves_the_floating_point_state_alone(tmp_path):
    "In a fresh process with an empty home, so that the kernel is compiled, loaded and run there."
    done = run_python("-c", SUBNORMALS_AFTER_THE_KERNEL,
                      env={"NANOCHAT_HOME": str(tmp_path), "NANOCHAT_NATIVE_KERNELS": "1"}, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    if done.stdout.strip() == "no kernel":
        pytest.skip("no C compiler on this machine")
    assert list((tmp_path / "kernels").glob("softcap_ce_*.so")), "the kernel was built in this process"
    before, loaded, ran = done.stdout.split()
    assert before == "True", "subnormals work in a plain process"
    assert (loaded, ran) == ("True", "True"), "loading or running the kernel flushed subnormals to zero"


def test_native_kernel_gives_the_same_bits_on_every_run():
    "The threads' partial sums are combined in thread order, so more threads than cores still repeat exactly."
    if native_softcap_ce() is None:
        pytest.fail("the C kernel did not build on this machine")
    threads = torch.get_num_threads()
    torch.set_num_threads(4)
    try:
        gen = torch.Generator().manual_seed(0)
        logits, targets = torch.randn(8192, 512, generator=gen) * 5, torch.randint(8192, (512,), generator=gen)
        runs = []
        for _ in range(6):
            grad, losses = logits.clone(), torch.empty(512)
            softcap_ce_(grad, targets, losses)
            runs.append((grad, losses))
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(runs[0][0], g) and torch.equal(runs[0][1], l) for g, l in runs[1:])
