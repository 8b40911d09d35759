"""Benchmark: CORE on the 18 tasks of the shared bundle, 16 items each, depth-4 model (vocab 32768, sequence 512).

    flock -x /tmp/cpu.lock python bench/core_eval.py [--items 16] [--one-at-a-time]

Prints total seconds, peak RSS and items/s per task type. nanochat's reference on this 2-core CPU: 200 s, 4.4 GB.
The model has random weights (speed does not depend on them); the tokenizer (vocab 32768) is trained once on
10M characters of the training shards in a separate process and cached in <home>/bench/tokenizer_32k.
`--one-at-a-time` also times nanochat's way (one forward pass per item, all positions through lm_head) for
comparison.
"""
import argparse
import resource
import warnings
import subprocess
import sys
import time
from collections import defaultdict

import torch
import torch.nn.functional as F

from nanochat_nb.common import hardware_summary, nanochat_home, seed_everything
from nanochat_nb.core_eval import (crop_left, evaluate_core, load_core_tasks, load_task_data, render_prompts,
                                   sample_fewshot, scored_item, shuffled_items, verdict)
from nanochat_nb.gpt import GPT, GPTConfig
from nanochat_nb.tokenizer import Tokenizer

TRAIN_TOKENIZER = """
from nanochat_nb.dataset import iter_texts
from nanochat_nb.tokenizer import Tokenizer
Tokenizer.train(iter_texts("train", max_chars=10_000_000, doc_cap=10_000), 32768).save({folder!r})
"""


def bench_tokenizer() -> Tokenizer:
    folder = nanochat_home() / "bench" / "tokenizer_32k"
    if not (folder / "tokenizer.json").is_file():
        subprocess.run([sys.executable, "-c", TRAIN_TOKENIZER.format(folder=str(folder))], check=True)
    return Tokenizer.load(folder)


@torch.no_grad()
def one_at_a_time(model, tokenizer, max_per_task: int, max_seq_len: int) -> float:
    "nanochat's way, for comparison: one forward pass per item (its rows as a batch), logits at every position."
    start = time.perf_counter()
    for task in load_core_tasks():
        if not task.available:
            continue
        items = shuffled_items(load_task_data(task.path, task.task_type), max_per_task)
        for idx, item in enumerate(items):
            prompts = render_prompts(task.task_type, item, sample_fewshot(items, idx, task.num_fewshot), task.delimiter)
            rows = tokenizer.encode(prompts, prepend=tokenizer.bos_id)
            scored = crop_left(scored_item(task.task_type, rows, item.get("gold")), max_seq_len)
            width = max(map(len, scored.rows))
            inputs = torch.full((len(scored.rows), width), tokenizer.bos_id, dtype=torch.long)
            for b, row in enumerate(scored.rows):
                inputs[b, :len(row)] = torch.tensor(row)
            logits = model(inputs)
            losses = F.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)), inputs[:, 1:].reshape(-1),
                                     reduction="none").view(len(scored.rows), -1)
            means = [losses[b, s - 1:e - 1].mean().item() for b, (s, e) in enumerate(zip(scored.starts, scored.ends))]
            hits = [int((logits[b, s - 1:e - 1].argmax(-1) == inputs[b, s:e]).sum())
                    for b, (s, e) in enumerate(zip(scored.starts, scored.ends))]
            verdict(scored, means, hits)
    return time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--items", type=int, default=16, help="items per task")
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--batch-tokens", type=int, default=16384)
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"], help="compute dtype of the model")
    parser.add_argument("--one-at-a-time", action="store_true", help="also time the one-item-at-a-time evaluator")
    args = parser.parse_args()

    tokenizer = bench_tokenizer()
    seed_everything(0)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    model = GPT(GPTConfig.from_depth(args.depth, vocab_size=32768, sequence_len=args.seq_len), compute_dtype=dtype)
    model.init_weights()
    model.eval()
    hw = hardware_summary()
    print(f"{hw['device_name']} | {hw['torch_threads']} threads | {args.dtype} | torch {hw['torch']}")
    print(f"model d{args.depth}, vocab {tokenizer.vocab_size}, sequence {args.seq_len}; {args.items} items per task; "
          f"batch_tokens {args.batch_tokens}")

    warnings.simplefilter("ignore")  # the four tasks without data: counted in the summary line below
    start = time.perf_counter()
    result = evaluate_core(model, tokenizer, max_per_task=args.items, batch_tokens=args.batch_tokens, verbose=False)
    total = time.perf_counter() - start
    peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # Linux: KiB

    per_type = defaultdict(lambda: [0, 0.0])
    for r in result["tasks"].values():
        per_type[r["type"]][0] += r["items"]
        per_type[r["type"]][1] += r["seconds"]
    print(f"tasks: {result['tasks_used']} of {result['tasks_total']}; items cropped to {result['max_seq_len']} "
          f"tokens: {result['truncated']}; CORE (random weights) {result['core']:.4f}")
    for task_type, (items, seconds) in sorted(per_type.items()):
        print(f"  {task_type:18s} {items:4d} items {seconds:6.1f} s  {items / seconds:6.1f} items/s")
    print(f"CORE eval total: {total:.1f} s (nanochat: 200 s)   peak RSS: {peak_gb:.2f} GB (nanochat: 4.4 GB)")
    if args.one_at_a_time:
        print(f"one item at a time, all positions through lm_head: "
              f"{one_at_a_time(model, tokenizer, args.items, args.seq_len):.1f} s")


if __name__ == "__main__":
    main()
