"""End-to-end base-training throughput and peak memory (chapter 6).

Trains real models on the real shards through `nanochat_nb.train` (data loading, forward/backward, optimizer,
all included) at sequence 512, batch 8 x 512, total batch 4096, and prints tokens/s and peak RSS per setting.
Every setting runs in its own process so that its peak RSS is its own. Reference ("vs ref", SPEC.md: nanochat on
a 2-core CPU, fp32, torch.compile): d4 ~1440 tok/s with 2.5 GB peak RSS, d6 ~760 tok/s; target >= 1.2x.

    flock -x /tmp/cpu.lock python bench/train.py                 # d4 and d6, compiled and eager, fp32
    flock -x /tmp/cpu.lock python bench/train.py --depths 4 --compile on --steps 20
    NANOCHAT_DTYPE=bf16 python bench/train.py ...                 # compare with nanochat's bf16 figures

nanochat itself on this machine (its model and MuonAdamW, fp32, torch.compile, seq 512, batch 8; timed
2026-11-21 with a copy outside this repository): d4 about 800 tok/s, d6 about 540 (1,170 and 625 with
MALLOC_MMAP_THRESHOLD_/MALLOC_TRIM_THRESHOLD_ set, the equivalent of common.keep_freed_memory). SPEC.md's
1440/760 were measured on a CPU with AVX-512; this one has AVX2 only.
"""
import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REFERENCE = {("float32", 4): 1440, ("float32", 6): 760, ("bfloat16", 4): 2390, ("bfloat16", 6): 1395}


def bench_tokenizer(vocab_size: int = 32768, chars: int = 20_000_000) -> Path:
    "A 32K tokenizer trained once on 20M characters of the training shards, cached in the home folder."
    from nanochat_nb.common import nanochat_home
    from nanochat_nb.dataset import iter_texts
    from nanochat_nb.tokenizer import Tokenizer
    folder = nanochat_home() / "bench" / f"tokenizer_{vocab_size}"
    if not (folder / "meta.json").exists() and not any(folder.glob("*.json")):
        Tokenizer.train(iter_texts("train", max_chars=chars), vocab_size).save(folder)
    return folder


def child(args):
    "Train one setting and print one JSON line with its figures."
    from nanochat_nb.common import compute_dtype, read_log
    from nanochat_nb.train import main
    with tempfile.TemporaryDirectory() as run_dir:
        start = time.perf_counter()
        main(["--depth", str(args.depth), "--max-seq-len", "512", "--device-batch-size", "8",
              "--total-batch-size", "4096", "--num-iterations", str(args.steps), "--eval-every", "-1",
              "--sample-every", "-1", "--compile", args.compile, "--run-dir", run_dir,
              "--tokenizer-dir", str(args.tokenizer_dir), "--log-every", "1000000"])
        wall = time.perf_counter() - start
        records = [r for r in read_log(Path(run_dir) / "log.jsonl") if "loss" in r]
        flops_per_token = json.loads((Path(run_dir) / "plan.json").read_text())["flops_per_token"]
    timed = [r["seconds"] for r in records[args.skip:]]
    step = statistics.median(timed)
    print(json.dumps({"depth": args.depth, "compile": args.compile, "dtype": str(compute_dtype("cpu")).removeprefix("torch."),
                      "tok_per_s": 4096 / step, "tok_per_s_mean": 4096 / statistics.mean(timed),
                      "first_steps_s": [round(r["seconds"], 2) for r in records[:args.skip]],
                      "gflops": flops_per_token * 4096 / step / 1e9,
                      "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
                      "wall_s": wall, "final_loss": records[-1]["loss"]}))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
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
    tokenizer_dir = bench_tokenizer()
    from nanochat_nb.common import compute_dtype, measure_matmul_flops
    # MFU against one peak measured here, on the idle machine (a per-process figure wobbles on a noisy VM)
    peak = measure_matmul_flops(compute_dtype("cpu"))
    print(f"matmul peak {peak / 1e9:.1f} GFLOP/s measured now", flush=True)
    print(f"torch threads {os.environ.get('OMP_NUM_THREADS', 'default')}, tokenizer {tokenizer_dir}", flush=True)
    print(f"{'depth':>5} {'compile':>7} {'dtype':>8} {'tok/s':>7} {'vs ref':>6} {'MFU':>6} {'peak RSS':>9} {'first steps (s)':>16}")
    for depth in map(int, args.depths.split(",")):
        for compile_ in args.compile.split(","):
            done = subprocess.run([sys.executable, __file__, "--child", "--depth", str(depth), "--compile", compile_,
                                   "--steps", str(args.steps), "--skip", str(args.skip), "--tokenizer-dir", str(tokenizer_dir)],
                                  capture_output=True, text=True)
            if done.returncode != 0:
                print(f"d{depth} compile={compile_} failed:\n{done.stderr[-3000:]}")
                continue
            r = json.loads(done.stdout.strip().splitlines()[-1])
            ref = REFERENCE.get((r["dtype"], depth))
            ratio = f"{r['tok_per_s'] / ref:.2f}x" if ref else "-"
            print(f"{depth:>5} {compile_:>7} {r['dtype']:>8} {r['tok_per_s']:>7,.0f} {ratio:>6} {r['gflops'] * 1e9 / peak:>6.1%} "
                  f"{r['peak_rss_gb']:>7.2f}GB {str(r['first_steps_s']):>16}", flush=True)


if __name__ == "__main__":
    main()
