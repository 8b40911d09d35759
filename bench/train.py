"""End-to-end base-training throughput and peak memory (chapter 6).

Trains real models on the real shards through `nanochat_nb.train` (data loading, forward/backward, optimizer,
all included) at sequence 512, batch 8 x 512, total batch 4096, with the benchmark tokenizer (bench/_util.py),
and prints tokens/s, MFU and peak resident memory per setting. Every setting runs in its own process so that its
peak memory is its own.

    python bench/train.py                                  # d4 and d6, compiled and eager
    python bench/train.py --depths 4 --compile on --steps 20
    NANOCHAT_DTYPE=bf16 python bench/train.py --depths 4   # compute in bf16
"""
import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

from _util import bench_tokenizer_dir, machine_line, peak_memory_gb, run_child, timed

TOKENS_PER_STEP = 4096


def child(args):
    "Train one setting and print one JSON line with its figures."
    from nanochat_nb.common import compute_dtype, read_log
    from nanochat_nb.train import main
    with tempfile.TemporaryDirectory() as run_dir:
        wall, _ = timed(lambda: main([
            "--depth", str(args.depth), "--max-seq-len", "512", "--device-batch-size", "8",
            "--total-batch-size", str(TOKENS_PER_STEP), "--num-iterations", str(args.steps), "--eval-every", "-1",
            "--sample-every", "-1", "--compile", args.compile, "--run-dir", run_dir,
            "--tokenizer-dir", str(args.tokenizer_dir), "--log-every", "1000000"]))
        records = [r for r in read_log(Path(run_dir) / "log.jsonl") if "loss" in r]
        flops_per_token = json.loads((Path(run_dir) / "plan.json").read_text())["flops_per_token"]
    step = statistics.median(r["seconds"] for r in records[args.skip:])
    print(json.dumps({"depth": args.depth, "compile": args.compile,
                      "dtype": str(compute_dtype("cpu")).removeprefix("torch."),
                      "tok_per_s": TOKENS_PER_STEP / step, "gflops": flops_per_token * TOKENS_PER_STEP / step / 1e9,
                      "first_steps_s": [round(r["seconds"], 2) for r in records[:args.skip]],
                      "peak_gb": peak_memory_gb(), "wall_s": wall, "final_loss": records[-1]["loss"]}))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--depths", default="4,6")
    parser.add_argument("--compile", default="on,off", help="on, off or both (on,off)")
    parser.add_argument("--steps", type=int, default=16, help="optimizer steps per setting")
    parser.add_argument("--skip", type=int, default=4, help="first steps left out of the timing (compilation, warm-up)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--depth", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--tokenizer-dir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args)
    tokenizer_dir = bench_tokenizer_dir()
    from nanochat_nb.common import compute_dtype, measure_matmul_flops
    print(machine_line())
    # MFU against one peak measured here (a per-process figure wobbles on a noisy machine)
    peak = measure_matmul_flops(compute_dtype("cpu"))
    print(f"matmul peak {peak / 1e9:.1f} GFLOP/s measured now; median step time after the first {args.skip} steps",
          flush=True)
    failed = False
    print(f"{'depth':>5} {'compile':>7} {'dtype':>8} {'tok/s':>7} {'MFU':>6} {'peak RSS':>9} {'first steps (s)':>16}")
    for depth in map(int, args.depths.split(",")):
        for compile_ in args.compile.split(","):
            r = run_child([__file__, "--child", "--depth", depth, "--compile", compile_, "--steps", args.steps,
                           "--skip", args.skip, "--tokenizer-dir", tokenizer_dir])
            if isinstance(r, str):
                print(f"d{depth} compile={compile_} failed:\n{r}")
                failed = True
                continue
            print(f"{depth:>5} {compile_:>7} {r['dtype']:>8} {r['tok_per_s']:>7,.0f} {r['gflops'] * 1e9 / peak:>6.1%} "
                  f"{r['peak_gb']:>6.2f}GiB {str(r['first_steps_s']):>16}", flush=True)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
