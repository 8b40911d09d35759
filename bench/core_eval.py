"""CORE evaluation speed: seconds, items/s per task type and peak memory of `core_eval.evaluate_core` on the
bundle's tasks, a fixed number of items each, with a randomly initialised model (speed does not depend on the
weights) and the benchmark tokenizer (bench/_util.py).

    python bench/core_eval.py [--items 16] [--depth 4] [--seq-len 512] [--dtype fp32|bf16] [--one-at-a-time]

`--one-at-a-time` also times nanochat's way of scoring (one forward pass per item, every position through the
lm_head) for comparison.
"""
import argparse
import time
import warnings
from collections import defaultdict

import torch
import torch.nn.functional as F

from _util import bench_tokenizer, machine_line, peak_memory_gb, timed
from nanochat_nb.common import seed_everything
from nanochat_nb.core_eval import (crop_left, evaluate_core, load_core_tasks, load_task_data, render_prompts,
                                   sample_fewshot, scored_item, shuffled_items, verdict)
from nanochat_nb.gpt import GPT, GPTConfig


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
            spans = list(zip(scored.starts, scored.ends))
            means = [losses[b, s - 1:e - 1].mean().item() for b, (s, e) in enumerate(spans)]
            hits = [int((logits[b, s - 1:e - 1].argmax(-1) == inputs[b, s:e]).sum()) for b, (s, e) in enumerate(spans)]
            verdict(scored, means, hits)
    return time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
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
    model = GPT(GPTConfig.from_depth(args.depth, vocab_size=tokenizer.vocab_size, sequence_len=args.seq_len),
                compute_dtype=dtype)
    model.init_weights()
    model.eval()
    print(machine_line())
    print(f"model d{args.depth} ({args.dtype}), vocab {tokenizer.vocab_size}, sequence {args.seq_len}; "
          f"{args.items} items per task; batch_tokens {args.batch_tokens}")

    warnings.simplefilter("ignore")  # tasks without data: counted in the summary line below
    total, result = timed(lambda: evaluate_core(model, tokenizer, max_per_task=args.items,
                                                batch_tokens=args.batch_tokens, verbose=False))
    per_type = defaultdict(lambda: [0, 0.0])
    for r in result["tasks"].values():
        per_type[r["type"]][0] += r["items"]
        per_type[r["type"]][1] += r["seconds"]
    print(f"tasks: {result['tasks_used']} of {result['tasks_total']}; items cropped to {result['max_seq_len']} "
          f"tokens: {result['truncated']}; CORE (random weights) {result['core']:.4f}")
    for task_type, (items, seconds) in sorted(per_type.items()):
        print(f"  {task_type:18s} {items:4d} items {seconds:6.1f} s  {items / seconds:6.1f} items/s")
    print(f"CORE eval total: {total:.1f} s   peak RSS: {peak_memory_gb():.2f} GiB")
    if args.one_at_a_time:
        print(f"one item at a time, all positions through lm_head: "
              f"{one_at_a_time(model, tokenizer, args.items, args.seq_len):.1f} s")


if __name__ == "__main__":
    main()
