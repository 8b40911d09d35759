"""Pretraining dataloader speed (chapter 3): packed tokens per second per rank, tokenization included, and the
share of document tokens that BOS-aligned best-fit packing crops.

    python bench/dataloader.py [--tokenizer-dir DIR] [--batch-size 16] [--seconds 20] [--crop-seq-lens 512,2048]

Reads the course's shards (NANOCHAT_DATA/pretrain) with the benchmark tokenizer (bench/_util.py) or the one in
--tokenizer-dir. The cropped share is counted over a whole second pass of the training split (`--crop-seq-lens ''`
skips it)."""
import argparse
import os
import time

import torch

from _util import bench_tokenizer, machine_line
from nanochat_nb.dataloader import BestFitLoader
from nanochat_nb.tokenizer import Tokenizer


def throughput(tokenizer, batch_size, seq_len, seconds, threads):
    "Packed tokens per second seen by the training loop (start-up included, and in steady state)."
    loader = BestFitLoader(tokenizer, batch_size, seq_len, tokenizer_threads=threads)
    start = time.perf_counter()
    next(loader)
    first = time.perf_counter() - start
    steady, batches = time.perf_counter(), 0
    while time.perf_counter() - steady < seconds:
        next(loader)
        batches += 1
    elapsed = time.perf_counter() - steady
    loader.close()
    tokens = batches * batch_size * seq_len
    return tokens / elapsed, (tokens + batch_size * seq_len) / (elapsed + first), first


def cropped_fraction(tokenizer, seq_len, batch_size, threads):
    """The cropped share of document tokens in steady state: counted over the second pass (epoch) of the training
    split, once the buffer holds the mix of documents that best fit leaves behind (the first pass flatters: the long
    documents pile up in the buffer and are not counted)."""
    loader = BestFitLoader(tokenizer, batch_size, seq_len, tokenizer_threads=threads)
    start = time.perf_counter()
    while loader.stats["epoch"] == 0:
        next(loader)
    before = loader.stats
    while loader.stats["epoch"] == 1:
        next(loader)
    after = loader.stats
    loader.close()
    delta = {key: after[key] - before[key] for key in ("rows", "docs", "cropped_docs", "tokens", "cropped_tokens")}
    delta["cropped_fraction"] = delta["cropped_tokens"] / (delta["tokens"] + delta["cropped_tokens"])
    delta["first_pass_fraction"], delta["seconds"] = before["cropped_fraction"], time.perf_counter() - start
    return delta


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokenizer-dir", default=None, help="a saved tokenizer (default: the benchmark tokenizer)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=2048, help="row length of the throughput figure")
    parser.add_argument("--seconds", type=float, default=20, help="how long to time the steady state")
    parser.add_argument("--crop-seq-lens", default="512,2048", help="row lengths to count the cropped share at")
    parser.add_argument("--threads", type=int, default=None, help="tokenizer threads (default: min(8, cores))")
    args = parser.parse_args()
    print(machine_line())
    tokenizer = Tokenizer.load(args.tokenizer_dir) if args.tokenizer_dir else bench_tokenizer()
    threads = args.threads or min(8, os.cpu_count() or 1)
    steady, overall, first = throughput(tokenizer, args.batch_size, args.seq_len, args.seconds, threads)
    print(f"T={args.seq_len} B={args.batch_size}, {threads} tokenizer threads: {steady:,.0f} packed tok/s per rank in "
          f"steady state ({overall:,.0f} incl. start-up; first batch after {first:.2f} s)")
    for seq_len in [int(s) for s in args.crop_seq_lens.split(",") if s]:
        stats = cropped_fraction(tokenizer, seq_len, args.batch_size, threads)
        print(f"T={seq_len}: cropped fraction {stats['cropped_fraction']:.1%} in steady state (2nd epoch of the training "
              f"split: {stats['rows']:,} rows, {stats['docs']:,} documents placed, {stats['cropped_docs']:,} of them "
              f"cropped; the 1st epoch alone: {stats['first_pass_fraction']:.1%}) [{stats['seconds']:.0f} s]")


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
