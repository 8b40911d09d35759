"""CORE evaluation speed: seconds, items/s per task type and peak memory of `core_eval.evaluate_core` on the
bundle's tasks, a fixed number of items each, with a randomly initialised model (speed does not depend on the
weights) and the benchmark tokenizer (bench/_util.py).

    python bench/core_eval.py [--items 16] [--depth 4] [--seq-len 512] [--dtype fp32|bf16]
    python bench/core_eval.py --reference ~/src/nanochat [--repeat 2]   # side by side with a nanochat checkout
    python bench/core_eval.py --checkpoint RUN_DIR --reference PATH     # a trained model: the scores must agree

`--reference PATH` loads the same weights into nanochat's GPT and times its `core_eval.evaluate_task` (one forward
pass per item, every position through the lm_head) on the same items, alternating with ours, and prints the ratio
and whether both scored every task the same.
"""
import argparse
import json
import os
import statistics
import sys
import time
import warnings
from collections import defaultdict
from dataclasses import asdict

import torch

from _util import bench_tokenizer, machine_line, peak_memory_gb, timed
from nanochat_nb.checkpoint import load_checkpoint_tokenizer, load_model
from nanochat_nb.common import seed_everything
from nanochat_nb.core_eval import evaluate_core, load_core_tasks, shuffled_items
from nanochat_nb.gpt import GPT, GPTConfig


class ReferenceTokenizer:
    "Our tokenizer with the two calls nanochat's evaluator makes."
    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def __call__(self, texts, prepend=None):
        return self.tokenizer.encode(texts, prepend=prepend)

    def get_bos_token_id(self):
        return self.tokenizer.bos_id


def reference_model(path: str, model: GPT, dtype: torch.dtype, max_seq_len: int):
    "nanochat's GPT holding our model's weights (a strict load), cropping items as ours does."
    os.environ["NANOCHAT_DTYPE"] = {torch.float32: "float32", torch.bfloat16: "bfloat16"}[dtype]  # read at import
    sys.path.insert(0, os.path.expanduser(path))
    from nanochat.gpt import GPT as ReferenceGPT, GPTConfig as ReferenceConfig
    with torch.device("meta"):
        reference = ReferenceGPT(ReferenceConfig(**asdict(model.config)))
    reference.to_empty(device="cpu")
    reference.init_weights()  # its rotary tables (buffers, not in the state dict)
    reference.load_state_dict(model.state_dict(), strict=True)
    reference.max_seq_len = max_seq_len  # nanochat crops an item to the left when its model has this attribute
    return reference.eval()


def reference_core(reference, tokenizer, max_per_task: int) -> dict:
    "nanochat's evaluate_task on the same tasks and items as ours: {label: accuracy}."
    from nanochat.core_eval import evaluate_task
    accuracies = {}
    for task in load_core_tasks():
        if not task.available:
            continue
        with open(task.path, encoding="utf-8") as f:
            data = shuffled_items([json.loads(line) for line in f if line.strip()], max_per_task)
        meta = {"task_type": task.task_type, "num_fewshot": task.num_fewshot,
                "continuation_delimiter": task.delimiter}
        accuracies[task.label] = evaluate_task(reference, ReferenceTokenizer(tokenizer), data, "cpu", meta)
    return accuracies


def side_by_side(args, model, tokenizer, dtype):
    "Ours and nanochat's evaluator, alternating `args.repeat` times; medians, ratio, agreement of the accuracies."
    reference = reference_model(args.reference, model, dtype, model.config.sequence_len)
    times = defaultdict(list)
    for _ in range(args.repeat):
        seconds, ours = timed(lambda: evaluate_core(model, tokenizer, max_per_task=args.items,
                                                    batch_tokens=args.batch_tokens, verbose=False))
        times["ours"].append(seconds)
        seconds, theirs = timed(lambda: reference_core(reference, tokenizer, args.items))
        times["reference"].append(seconds)
    ours_s, theirs_s = statistics.median(times["ours"]), statistics.median(times["reference"])
    differ = [label for label, accuracy in theirs.items() if abs(ours["tasks"][label]["accuracy"] - accuracy) > 1e-9]
    print(f"side by side, median of {args.repeat}: ours {ours_s:.1f} s, nanochat {theirs_s:.1f} s: "
          f"ours is {theirs_s / ours_s:.2f}x the reference")
    print("accuracies: " + (f"differ on {', '.join(differ)} (ties or rounding in near-equal losses)" if differ
                            else f"identical on all {len(theirs)} tasks"))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--items", type=int, default=16, help="items per task")
    parser.add_argument("--depth", type=int, default=4, help="of the random-init model")
    parser.add_argument("--checkpoint", metavar="RUN_DIR", help="a trained base run instead of a random model")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--batch-tokens", type=int, default=16384)
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"], help="compute dtype of the model")
    parser.add_argument("--reference", metavar="PATH", help="a nanochat checkout to time side by side")
    parser.add_argument("--repeat", type=int, default=2, help="alternating rounds with --reference")
    args = parser.parse_args()
    fewshot = max(task.num_fewshot for task in load_core_tasks())
    if args.reference and args.items <= fewshot:
        parser.error(f"--reference needs --items above {fewshot}: nanochat draws each item's {fewshot} few-shot "
                     "examples from the other items of the task.")

    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    if args.checkpoint:  # a trained model: its scores mean something, so the two evaluators must agree on them
        model, meta = load_model(args.checkpoint, compute_dtype=dtype)
        tokenizer = load_checkpoint_tokenizer(args.checkpoint, meta)
        what = f"{args.checkpoint} (d{model.config.n_layer}, trained)"
    else:
        tokenizer = bench_tokenizer()
        seed_everything(0)
        model = GPT(GPTConfig.from_depth(args.depth, vocab_size=tokenizer.vocab_size, sequence_len=args.seq_len),
                    compute_dtype=dtype)
        model.init_weights()
        model.eval()
        what = f"d{args.depth}, random weights"
    print(machine_line())
    print(f"model {what} ({args.dtype}), vocab {tokenizer.vocab_size}, context {model.config.sequence_len}; "
          f"{args.items} items per task; batch_tokens {args.batch_tokens}")

    warnings.simplefilter("ignore")  # tasks without data: counted in the summary line below
    total, result = timed(lambda: evaluate_core(model, tokenizer, max_per_task=args.items,
                                                batch_tokens=args.batch_tokens, verbose=False))
    per_type = defaultdict(lambda: [0, 0.0])
    for r in result["tasks"].values():
        per_type[r["type"]][0] += r["items"]
        per_type[r["type"]][1] += r["seconds"]
    print(f"tasks: {result['tasks_used']} of {result['tasks_total']}; items cropped to {result['max_seq_len']} "
          f"tokens: {result['truncated']}; CORE {result['core']:.4f}")
    for task_type, (items, seconds) in sorted(per_type.items()):
        print(f"  {task_type:18s} {items:4d} items {seconds:6.1f} s  {items / seconds:6.1f} items/s")
    print(f"CORE eval total: {total:.1f} s   peak RSS: {peak_memory_gb():.2f} GiB")
    if args.reference:
        side_by_side(args, model, tokenizer, dtype)


if __name__ == "__main__":
    main()
