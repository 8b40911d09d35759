"""Cost of one optimizer step on the GPT (depth 4, the `cpu` preset's model, by default): eager against
torch.compile, and how much of it is Polar Express, for each stack of matrices in the Gram form that
`polar_express` takes for wide matrices and in the direct form. Run under the exclusive lock:

    flock -x /tmp/cpu.lock python bench/optim.py [--depth 6]
"""
import argparse
import time

import torch

from nanochat_nb.gpt import GPT, GPTConfig
from nanochat_nb.common import keep_freed_memory
from nanochat_nb.optim import frobenius_norm, polar_express, polar_express_direct, setup_optimizer


def best_seconds(fn, *args, repeat: int = 5) -> float:
    "Best wall time of `fn(*args)` over `repeat` calls, after one warm-up call."
    fn(*args)
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        fn(*args)
        best = min(best, time.perf_counter() - start)
    return best


def step_time(optimizer, params) -> float:
    "Best wall time of `optimizer.step()` on fixed random gradients."
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    optimizer.step()  # the first step also creates the state
    return best_seconds(optimizer.step)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--depth", type=int, default=4)
    depth = parser.parse_args().depth
    keep_freed_memory()  # as in training
    torch.manual_seed(0)
    model = GPT(GPTConfig.from_depth(depth, vocab_size=32768, sequence_len=512)).init_weights()
    params = list(model.parameters())
    print(f"depth {depth}, {sum(p.numel() for p in params) / 1e6:.1f}M parameters, {torch.get_num_threads()} threads")
    eager = setup_optimizer(model, compile=False)
    t_eager = step_time(eager, params)
    print(f"eager step:     {t_eager * 1e3:7.1f} ms")
    pe = 0.0
    for group in eager.param_groups:
        if group["kind"] == "muon":
            stack = torch.randn(len(group["params"]), *group["params"][0].shape)
            wide = stack.mT if stack.size(-2) > stack.size(-1) else stack
            wide = wide / (frobenius_norm(wide) * 1.01)
            used, direct = best_seconds(polar_express, stack, repeat=3), best_seconds(polar_express_direct, wide, repeat=3)
            pe += used
            print(f"  Polar Express on {tuple(stack.shape)}: {used * 1e3:6.1f} ms (direct form {direct * 1e3:6.1f} ms)")
    print(f"  of which Polar Express: {pe * 1e3:7.1f} ms")
    start = time.perf_counter()
    compiled = setup_optimizer(model, compile=True)
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    compiled.step()
    print(f"compile (first step): {time.perf_counter() - start:7.1f} s")
    t_compiled = step_time(compiled, params)
    print(f"compiled step:  {t_compiled * 1e3:7.1f} ms  (speed-up {t_eager / t_compiled:.2f}x)")


if __name__ == "__main__":
    main()
