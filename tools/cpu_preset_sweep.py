"""The tuning sweep behind the `cpu` preset: shapes (vocabulary, depth) trained with the preset's other settings,
each scored by validation bits per byte (comparable across vocabularies) and timed. A quick screen of many shapes
on a small budget (`--flops`), then the best vocabulary's depths at the budget of the preset's own run.

    python tools/cpu_preset_sweep.py [--flops 6e12] [--out outputs/cpu_preset_sweep.csv]

Each (vocabulary, budget) is one isoFLOP `scaling.Sweep` (runs resume from a CSV per vocabulary under
`<home>/cpu_preset_sweep/`); the table at `--out` joins them with a vocab_size column. The speedrun lesson shows it.
"""
import argparse
from pathlib import Path

from nanochat_nb import scaling, train
from nanochat_nb.common import load_preset, nanochat_home, parse_args_with_preset

REPO = Path(__file__).resolve().parent.parent
SCREEN = {32768: [4], 8192: [2, 4], 4096: [1, 2, 3, 4], 2048: [2]}  # vocabulary: depths; 32768 x d4 was the preset
FINALISTS = {4096: [1, 2]}  # at the preset's own budget (d3 would need about 17 minutes for it here)
FLAGS = ["--preset", "cpu", "--eval-every", "1000000", "--eval-tokens", "262144", "--sample-every", "-1"]
COUNTS = ["vocab_size", "depth", "width", "params_scaling", "params_total", "iterations", "tokens"]
TABLE = ["budget", *COUNTS, "flops", "val_bpb", "seconds"]


def preset_flops() -> float:
    "The training FLOPs of the `cpu` preset's own run, planned as `nanochat-base-train --preset cpu` plans it."
    args = parse_args_with_preset(train.build_parser(), ["--preset", "cpu"])
    return train.plan_from_args(args, int(load_preset("cpu")["vocab-size"]), world_size=1).total_flops


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--flops", type=float, default=6e12, help="training FLOPs of each screened shape")
    parser.add_argument("--out", type=Path, default=REPO / "outputs" / "cpu_preset_sweep.csv")
    args = parser.parse_args()
    home = nanochat_home() / "cpu_preset_sweep"
    tokenizer_chars = int(load_preset("cpu")["max-chars"])
    stages = [(SCREEN, float(f"{args.flops:.3g}")), (FINALISTS, float(f"{preset_flops():.3g}"))]
    for shapes, budget in stages:
        for vocab_size, depths in shapes.items():
            sweep = scaling.Sweep(depths, budgets=[budget], train_flags=FLAGS, vocab_size=vocab_size,
                                  tokenizer_chars=tokenizer_chars)
            results = home / f"vocab_{vocab_size}.csv"
            scaling.run_sweep(sweep, results, runs_dir=home / f"vocab_{vocab_size}",
                              tokenizer_dir=scaling.sweep_tokenizer(sweep, home))
    table = []
    for vocab_size in sorted({*SCREEN, *FINALISTS}, reverse=True):
        for row in scaling.read_results(home / f"vocab_{vocab_size}.csv"):
            row["vocab_size"] = vocab_size
            table.append({key: int(row[key]) if key in COUNTS else row[key] for key in TABLE})
    args.out.unlink(missing_ok=True)  # the table is rebuilt from the per-vocabulary CSVs, which keep every run
    scaling.append_rows(args.out, table, TABLE)
    print(f"{len(table)} shapes -> {args.out}")


if __name__ == "__main__":
    main()
