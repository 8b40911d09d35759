"""Supervised fine-tuning throughput (chapter 13).

Makes a depth-4 base run (one pretraining step on the real shards, sequence 512, with the benchmark tokenizer of
bench/_util.py), then fine-tunes it with `nanochat_nb.sft` on the default local mixture (capped per task) at
batch 8 x 512, total 4096 tokens per step: loader, forward/backward and optimizer all included. Prints the
tokens/s of the rows and how they split into trained targets (the assistant's tokens), masked context (user
text, special tokens, calculator output) and padding, and the trained tokens/s alone.

    python bench/sft.py                      # d4, 5 SFT steps, the first one not timed
    python bench/sft.py --depth 6 --steps 8 --compile on
"""
import argparse
import statistics
import tempfile
from pathlib import Path

from _util import bench_tokenizer_dir, machine_line, peak_memory_gb, timed

SEQ, DEVICE_BATCH, TOKENS_PER_STEP = 512, 8, 4096


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--steps", type=int, default=5, help="SFT steps")
    p.add_argument("--skip", type=int, default=1, help="first steps left out of the timing")
    p.add_argument("--task-cap", type=int, default=500, help="conversations per task of the mixture")
    p.add_argument("--compile", default="off", choices=["on", "off"])
    args = p.parse_args()
    from nanochat_nb.common import read_log
    from nanochat_nb.sft import SFTTrainer, build_parser
    from nanochat_nb.train import main as base_train

    tokenizer_dir = bench_tokenizer_dir()
    print(machine_line())
    with tempfile.TemporaryDirectory() as work:
        base = Path(work) / "base"
        base_train(["--depth", str(args.depth), "--max-seq-len", str(SEQ), "--device-batch-size", str(DEVICE_BATCH),
                    "--total-batch-size", str(TOKENS_PER_STEP), "--num-iterations", "1", "--eval-every", "-1",
                    "--sample-every", "-1", "--compile", "off", "--run-dir", str(base),
                    "--tokenizer-dir", str(tokenizer_dir), "--log-every", "1000000"])
        trainer = SFTTrainer(build_parser().parse_args([
            "--base", str(base), "--run-dir", str(Path(work) / "sft"), "--num-steps", str(args.steps),
            "--task-cap", str(args.task_cap), "--eval-every", "-1", "--chat-eval-every", "-1",
            "--compile", args.compile, "--log-every", "1000000"]))
        try:
            wall, _ = timed(lambda: trainer.setup().run())
            stats = trainer.batches.loaders[0].stats()
        finally:
            trainer.close()
        records = [r for r in read_log(trainer.run_dir / "log.jsonl") if "loss" in r]
    step = statistics.median(r["seconds"] for r in records[args.skip:])
    row_tokens = stats["rows"] * (SEQ + 1)
    shares = {"trained": stats["trained"] / row_tokens, "padding": stats["padding"] / row_tokens}
    shares["context"] = 1 - shares["trained"] - shares["padding"]
    print(f"d{args.depth} SFT, {args.steps} steps of {TOKENS_PER_STEP} tokens ({DEVICE_BATCH} x {SEQ}), compile "
          f"{args.compile}: {step:.2f} s/step (median of steps {args.skip + 1}..{args.steps}), {wall:.0f} s in all")
    print(f"  all row tokens  {TOKENS_PER_STEP / step:9,.0f} tok/s")
    for name in ("trained", "context", "padding"):
        print(f"  {name:<15} {shares[name] * TOKENS_PER_STEP / step:9,.0f} tok/s  ({shares[name]:.1%} of the rows)")
    print(f"  {stats['conversations']:,} conversations packed into {stats['rows']:,} rows, {stats['skipped']} skipped "
          f"(longer than {SEQ + 1} tokens); peak RSS {peak_memory_gb():.2f} GiB")


if __name__ == "__main__":
    main()
