"""Cost of one optimizer step on the GPT (depth 4, the `cpu` preset's model, by default): eager against
torch.compile, and how much of it is Polar Express, for each stack of matrices in the Gram form that
`polar_express` takes for wide matrices and in the direct form.

    python bench/optim.py [--depth 6] [--repeat 5] [--no-compile]
"""
import argparse

import torch

from _util import machine_line, measure, timed
from nanochat_nb.common import keep_freed_memory
from nanochat_nb.gpt import GPT, GPTConfig
from nanochat_nb.optim import frobenius_norm, polar_express, polar_express_direct, setup_optimizer


def random_grads(params):
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--repeat", type=int, default=5, help="timed calls of each figure (the best is printed)")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True,
                        help="also time the compiled step")
    args = parser.parse_args()
    keep_freed_memory()  # as in training
    torch.manual_seed(0)
    model = GPT(GPTConfig.from_depth(args.depth, vocab_size=32768, sequence_len=512)).init_weights()
    params = list(model.parameters())
    print(machine_line())
    print(f"depth {args.depth}, {sum(p.numel() for p in params) / 1e6:.1f}M parameters; best of {args.repeat}")
    eager = setup_optimizer(model.param_groups(), model.config.n_embd, compile=False)
    random_grads(params)
    t_eager = measure(eager.step, repeat=args.repeat).best  # the warm-up step also creates the state
    print(f"eager step:     {t_eager * 1e3:7.1f} ms")
    pe = 0.0
    for group in eager.param_groups:
        if group["kind"] == "muon":
            stack = torch.randn(len(group["params"]), *group["params"][0].shape)
            wide = stack.mT if stack.size(-2) > stack.size(-1) else stack
            wide = wide / (frobenius_norm(wide) * 1.01)
            used = measure(polar_express, stack, repeat=args.repeat).best
            direct = measure(polar_express_direct, wide, repeat=args.repeat).best
            pe += used
            print(f"  Polar Express on {tuple(stack.shape)}: {used * 1e3:6.1f} ms (direct form {direct * 1e3:6.1f} ms)")
    print(f"  of which Polar Express: {pe * 1e3:7.1f} ms")
    if not args.compile:
        return
    compiled = setup_optimizer(model.param_groups(), model.config.n_embd, compile=True)
    random_grads(params)
    seconds, _ = timed(compiled.step)
    print(f"compile (first step): {seconds:7.1f} s")
    t_compiled = measure(compiled.step, repeat=args.repeat).best
    print(f"compiled step:  {t_compiled * 1e3:7.1f} ms  (speed-up {t_eager / t_compiled:.2f}x)")


if __name__ == "__main__":
    main()
