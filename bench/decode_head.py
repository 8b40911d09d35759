"""The head of a decoding step on a CPU: `nn.Linear`'s product against `gpt.DecodingHead`, for 1 to 32 rows.

A decoding step multiplies a few rows (one per sequence being sampled) by the (vocab, n_embd) head weight; at small
depths this product is most of the step. This prints, per row count, the time of the plain product
`F.linear(x, W)` and of `DecodingHead` (a (n_embd, vocab) copy for one row, oneDNN with the weight packed for
several), measured alternately on the same inputs, median of `--repeat` rounds, and their ratio.

    python bench/decode_head.py                  # d4: n_embd 256
    python bench/decode_head.py --channels 384   # d6
"""
import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from _util import machine_line
from nanochat_nb.gpt import DecodingHead


def seconds(fn, calls: int = 10) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--channels", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=32768)
    parser.add_argument("--rows", default="1,2,4,8,16,32")
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    weight = torch.randn(args.vocab, args.channels) * 0.02
    head = DecodingHead()
    print(machine_line())
    print(f"head {args.vocab} x {args.channels} fp32, {args.threads} thread(s), median of {args.repeat}")
    print(f"{'rows':>5} {'F.linear ms':>12} {'DecodingHead ms':>16} {'speed-up':>9}")
    with torch.inference_mode():
        for rows in map(int, args.rows.split(",")):
            x = torch.randn(rows, args.channels)
            torch.testing.assert_close(head(x, weight), F.linear(x, weight), atol=1e-4, rtol=1e-4)
            plain, ours = [], []
            for _ in range(args.repeat):
                plain.append(seconds(lambda: F.linear(x, weight)))
                ours.append(seconds(lambda: head(x, weight)))
            p, o = statistics.median(plain) * 1e3, statistics.median(ours) * 1e3
            print(f"{rows:>5} {p:>12.2f} {o:>16.2f} {p / o:>8.2f}x")


if __name__ == "__main__":
    main()
