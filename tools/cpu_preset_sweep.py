"""The tuning sweep behind the `cpu` preset: a few shapes (vocabulary, depth) trained on the same FLOPs budget on
this machine, each scored by validation bits per byte (comparable across vocabularies) and timed.

    python tools/cpu_preset_sweep.py [--flops 6e12] [--out outputs/cpu_preset_sweep.csv]

Rows already in the CSV are kept (a sweep resumes); the speedrun lesson shows the table.
"""
import argparse
import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SHAPES = [(32768, 4), (8192, 4), (8192, 2), (4096, 4), (4096, 2)]  # (vocabulary, depth); 32768 x d4 was the preset
FIELDS = ["vocab_size", "depth", "flops_budget", "params_scaling", "steps", "tokens", "val_bpb", "seconds", "tok_per_s"]


def run(*args):
    done = subprocess.run([sys.executable, "-m", *args], cwd=REPO)
    if done.returncode != 0:
        sys.exit(f"{' '.join(args[:2])} failed (exit {done.returncode}); the sweep stops here, rows so far are kept.")


def tokenizer_dir(home: Path, vocab_size: int) -> Path:
    folder = home / f"tokenizer_{vocab_size}"
    if not (folder / "tokenizer.json").is_file():
        run("nanochat_nb.tokenizer", "train", "--preset", "cpu", "--vocab-size", str(vocab_size),
            "--output", str(folder), "--no-progress")
    return folder


def train(home: Path, vocab_size: int, depth: int, flops: float) -> dict:
    run_dir = home / f"v{vocab_size}_d{depth}"
    start = time.perf_counter()
    run("nanochat_nb.train", "--preset", "cpu", "--depth", str(depth), "--num-iterations", "-1",
        "--target-flops", str(flops), "--tokenizer-dir", str(tokenizer_dir(home, vocab_size)),
        "--run-dir", str(run_dir), "--eval-every", "1000000", "--eval-tokens", "65536", "--sample-every", "-1")
    seconds = time.perf_counter() - start
    plan = json.loads((run_dir / "plan.json").read_text())
    log = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    final = [r for r in log if "val_bpb" in r][-1]
    steps = [r for r in log if "tok_per_s" in r]
    return {"vocab_size": vocab_size, "depth": depth, "flops_budget": f"{flops:.3g}",
            "params_scaling": plan["num_scaling_params"], "steps": final["step"], "tokens": final["tokens"],
            "val_bpb": f"{final['val_bpb']:.4f}", "seconds": f"{seconds:.0f}",
            "tok_per_s": f"{sum(r['tok_per_s'] for r in steps) / len(steps):.0f}"}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--flops", type=float, default=6e12, help="training FLOPs of every run")
    parser.add_argument("--out", type=Path, default=REPO / "outputs" / "cpu_preset_sweep.csv")
    parser.add_argument("--home", type=Path, default=None, help="where tokenizers and runs go (default: NANOCHAT_HOME/sweep)")
    args = parser.parse_args()
    home = args.home or Path(os.environ.get("NANOCHAT_HOME", Path.home() / ".cache" / "nanochat_nb")) / "cpu_sweep"
    done = {(int(r["vocab_size"]), int(r["depth"])) for r in csv.DictReader(args.out.open())} if args.out.exists() else set()
    for vocab_size, depth in SHAPES:
        if (vocab_size, depth) in done:
            continue
        row = train(home, vocab_size, depth, args.flops)
        new = not args.out.exists()
        with args.out.open("a", newline="") as f:
            writer = csv.DictWriter(f, FIELDS)
            if new:
                writer.writeheader()
            writer.writerow(row)
        print(row, flush=True)


if __name__ == "__main__":
    main()
