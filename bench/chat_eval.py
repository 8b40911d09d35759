"""Chat-evaluation speed: letter choice batched against one question at a time, and items/s per task type.

    python bench/chat_eval.py                         # d4, vocab 32768 (the bench tokenizer), 64 questions
    python bench/chat_eval.py --depth 4 --items 128 --batch-size 32 --threads 2

The model is a random-init GPT of `--depth` (its answers are noise; the figures are about the evaluator). Letter
choice (`choose_letters`) runs the same ARC-Easy and MMLU questions at batch 1 and at `--batch-size`, checks that
both give the same letters, and prints questions/s and the ratio (median of `--repeat`). Then `evaluate_task`
runs `--gen-items` items of each generative task (GSM8K, SpellingBee, HumanEval) at `--max-tokens` new tokens
each, greedy, and prints items/s.
"""
import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _util import bench_tokenizer, machine_line, measure  # noqa: E402

from nanochat_nb.chat_eval import choose_letters, evaluate_task  # noqa: E402
from nanochat_nb.engine import Engine  # noqa: E402
from nanochat_nb.gpt import GPT, GPTConfig  # noqa: E402
from nanochat_nb.tasks import ARC, GSM8K, MMLU, HumanEval, SpellingBee, spread_evenly  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--items", type=int, default=64, help="letter questions (half ARC-Easy, half MMLU)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--gen-items", type=int, default=8, help="items per generative task")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    tokenizer = bench_tokenizer()
    torch.manual_seed(0)
    model = GPT(GPTConfig.from_depth(args.depth, vocab_size=tokenizer.vocab_size, sequence_len=args.seq_len)).init_weights().eval()
    print(machine_line())
    print(f"d{args.depth}: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, vocab {tokenizer.vocab_size}")

    half = args.items // 2
    questions = list(spread_evenly(ARC("easy"), half)) + list(spread_evenly(MMLU("test"), args.items - half))
    tokens = sum(len(tokenizer.render_for_completion(c)) for c in questions)
    print(f"letter choice: {len(questions)} questions, {tokens / len(questions):.0f} prompt tokens on average")
    one = choose_letters(model, tokenizer, questions, batch_size=1)
    assert choose_letters(model, tokenizer, questions, batch_size=args.batch_size) == one, "batched answers differ"
    single = measure(choose_letters, model, tokenizer, questions, 1, repeat=args.repeat, warmup=0)
    batched = measure(choose_letters, model, tokenizer, questions, args.batch_size, repeat=args.repeat, warmup=0)
    print(f"  one at a time: {len(questions) / single.median:7.1f} questions/s  ({single})")
    print(f"  batch {args.batch_size:>3}:     {len(questions) / batched.median:7.1f} questions/s  ({batched})")
    print(f"  batched / one at a time: {single.median / batched.median:.2f}x")

    engine = Engine(model, tokenizer)
    for task in (GSM8K("test"), SpellingBee(args.gen_items, "test"), HumanEval()):
        result = evaluate_task(engine, task, max_items=args.gen_items, batch_size=args.gen_items, max_tokens=args.max_tokens)
        print(f"{task.name:>12}: {result['items_per_s']:.2f} items/s ({result['total']} items, up to {args.max_tokens} "
              f"new tokens each, {result['seconds']:.1f} s)")


if __name__ == "__main__":
    main()
