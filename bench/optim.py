"""Cost of one optimizer step on the GPT at depth 4 (the `cpu` preset's model): eager against torch.compile,
and how much of it is Polar Express. Run under the exclusive lock:  flock -x /tmp/cpu.lock python bench/optim.py"""
import time

import torch

from nanochat_nb.gpt import GPT, GPTConfig
from nanochat_nb.optim import polar_express, setup_optimizer


def step_time(optimizer, params, repeat: int = 5) -> float:
    "Best wall time of `optimizer.step()` over `repeat` steps (after two warm-up steps)."
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    optimizer.step()
    optimizer.step()
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        optimizer.step()
        best = min(best, time.perf_counter() - start)
    return best


def main(depth: int = 4):
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
            polar_express(stack)
            start = time.perf_counter()
            polar_express(stack)
            pe += time.perf_counter() - start
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
