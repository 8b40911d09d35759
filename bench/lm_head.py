"""The lm_head + softcap cross-entropy of one training step, in both layouts of the logits (chapter 4b).

At vocab 32768, C channels and N tokens per step, the head is three skinny matmuls (logits, d/dx, d/dW) of
2·N·C·V FLOPs each, plus the softcap cross-entropy sweeps over the N x V logits. This prints the time and
GFLOP/s of each matmul with the logits token-major (N, V) = x·Wᵀ and vocab-major (V, N) = W·xᵀ (the layout
`fused_head.softcap_cross_entropy` uses), the time of the C kernel's sweeps, and the whole fused forward + backward.

    python bench/lm_head.py                  # d4: C = 256, N = 4096
    python bench/lm_head.py --channels 384   # d6
"""
import argparse

import torch

from _util import machine_line, measure
from nanochat_nb.common import keep_freed_memory
from nanochat_nb.fused_head import native_softcap_ce, softcap_ce_, softcap_cross_entropy


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--channels", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=32768)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    keep_freed_memory()  # as in training: no page faults for the 512 MB buffers
    N, C, V = args.tokens, args.channels, args.vocab
    torch.manual_seed(0)
    x, w = torch.randn(N, C), torch.randn(V, C) * 0.02
    targets = torch.randint(0, V, (N,))
    rows, cols = torch.empty(N, V), torch.randn(V, N) * 0.1
    flops = 2 * N * C * V
    print(machine_line())
    print(f"N={N} tokens, C={C}, V={V}, {torch.get_num_threads()} threads; each matmul {flops / 1e9:.1f} GFLOP; "
          f"best of {args.repeat}")
    cases = {
        "token-major (N, V)": {"logits  x @ W.t()": lambda: torch.mm(x, w.t(), out=rows),
                               "d/dx    G @ W": lambda: rows @ w,
                               "d/dW    G.t() @ x": lambda: rows.t() @ x},
        "vocab-major (V, N)": {"logits  W @ x.t()": lambda: torch.mm(w, x.t(), out=cols),
                               "d/dx    G.t() @ W": lambda: cols.t() @ w,
                               "d/dW    G @ x": lambda: cols @ x},
    }
    for layout, matmuls in cases.items():
        total = 0.0
        for name, fn in matmuls.items():
            seconds = measure(fn, repeat=args.repeat).best
            total += seconds
            print(f"  {layout}  {name:20} {seconds * 1e3:7.1f} ms  {flops / seconds / 1e9:6.1f} GFLOP/s")
        print(f"  {layout}  {'three matmuls':20} {total * 1e3:7.1f} ms")
    losses, logits = torch.empty(N), torch.randn(V, N) * 2
    scratch = logits.clone()

    def sweeps():
        scratch.copy_(logits)
        softcap_ce_(scratch, targets, losses)
    copy = measure(lambda: scratch.copy_(logits), repeat=args.repeat).best
    kernel = "C kernel" if native_softcap_ce() is not None else "PyTorch ops (no C compiler)"
    print(f"softcap cross-entropy sweeps ({kernel}): {(measure(sweeps, repeat=args.repeat).best - copy) * 1e3:.1f} ms")
    xg, wg = x.clone().requires_grad_(), w.clone().requires_grad_()

    def fused():
        softcap_cross_entropy(xg, wg, targets).backward()
    print(f"fused lm_head + loss, forward + backward: {measure(fused, repeat=args.repeat).best * 1e3:.1f} ms")


if __name__ == "__main__":
    main()
