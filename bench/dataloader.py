"""Benchmark of the pretraining dataloader (chapter 3): packed tokens per second per rank, tokenization included,
and the share of document tokens cropped by BOS-aligned best-fit packing.

    flock -x /tmp/cpu.lock python bench/dataloader.py [--tokenizer-dir DIR] [--batch-size 16] [--seconds 20]

Uses the course's shards (NANOCHAT_DATA/pretrain) and a 32768-token tokenizer: --tokenizer-dir, else one trained
here on 20M characters of the training split (as the `cpu` preset does)."""
import argparse
import os
import time

import torch

from nanochat_nb.common import hardware_summary
from nanochat_nb.dataloader import BestFitLoader
from nanochat_nb.dataset import iter_texts
from nanochat_nb.tokenizer import Tokenizer


def get_tokenizer(folder):
    if folder:
        return Tokenizer.load(folder)
    start = time.perf_counter()
    tokenizer = Tokenizer.train(iter_texts("train", max_chars=20_000_000, doc_cap=10_000), vocab_size=32768)
    print(f"trained a {tokenizer.vocab_size}-token tokenizer on 20M characters in {time.perf_counter() - start:.1f} s")
    return tokenizer


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
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokenizer-dir", default=None)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--threads", type=int, default=None, help="tokenizer threads (default: min(8, cores))")
    args = parser.parse_args()
    info = hardware_summary()
    print(f"{info['device_name']}, {info['cpu_cores']} cores, torch {info['torch']}, commit {info['git_commit']}")
    tokenizer = get_tokenizer(args.tokenizer_dir)
    threads = args.threads or min(8, os.cpu_count() or 1)
    steady, overall, first = throughput(tokenizer, args.batch_size, 2048, args.seconds, threads)
    print(f"T=2048 B={args.batch_size}, {threads} tokenizer threads: {steady:,.0f} packed tok/s per rank in steady "
          f"state ({overall:,.0f} incl. start-up; first batch after {first:.2f} s)")
    for seq_len in (512, 2048):
        stats = cropped_fraction(tokenizer, seq_len, args.batch_size, threads)
        print(f"T={seq_len}: cropped fraction {stats['cropped_fraction']:.1%} in steady state (2nd epoch of the training "
              f"split: {stats['rows']:,} rows, {stats['docs']:,} documents placed, {stats['cropped_docs']:,} of them "
              f"cropped; the 1st epoch alone: {stats['first_pass_fraction']:.1%}) [{stats['seconds']:.0f} s]")


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
