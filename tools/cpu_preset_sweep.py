"""The tuning sweep behind the `cpu` preset: shapes (vocabulary, depth) trained with the preset's other settings on
one FLOPs budget on this machine, each scored by validation bits per byte (comparable across vocabularies) and timed.

    python tools/cpu_preset_sweep.py [--flops 6e12] [--out outputs/cpu_preset_sweep.csv]

Each vocabulary is one isoFLOP `scaling.Sweep` (its runs resume from a CSV per vocabulary under
`<home>/cpu_preset_sweep/`); the table at `--out` joins them with a vocab_size column. The speedrun lesson shows it.
"""
import argparse
from pathlib import Path

from nanochat_nb import scaling
from nanochat_nb.common import load_preset, nanochat_home

REPO = Path(__file__).resolve().parent.parent
SHAPES = {32768: [4], 8192: [2, 4], 4096: [1, 2, 3, 4], 2048: [2]}  # vocabulary: depths; 32768 x d4 was the preset
FLAGS = ["--preset", "cpu", "--eval-every", "1000000", "--eval-tokens", "65536", "--sample-every", "-1"]
TABLE = ["vocab_size", "depth", "width", "params_scaling", "params_total", "iterations", "tokens", "flops", "val_bpb",
         "seconds"]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--flops", type=float, default=6e12, help="training FLOPs of every run")
    parser.add_argument("--out", type=Path, default=REPO / "outputs" / "cpu_preset_sweep.csv")
    args = parser.parse_args()
    home = nanochat_home() / "cpu_preset_sweep"
    table = []
    for vocab_size, depths in SHAPES.items():
        sweep = scaling.Sweep(depths, budgets=[args.flops], train_flags=FLAGS, vocab_size=vocab_size,
                              tokenizer_chars=int(load_preset("cpu")["max-chars"]))
        results = home / f"vocab_{vocab_size}.csv"
        scaling.run_sweep(sweep, results, runs_dir=home / f"vocab_{vocab_size}",
                          tokenizer_dir=scaling.sweep_tokenizer(sweep, home))
        table += [{**row, "vocab_size": vocab_size} for row in scaling.read_results(results)]
    args.out.unlink(missing_ok=True)  # the table is rebuilt from the per-vocabulary CSVs, which keep every run
    scaling.append_rows(args.out, [{k: row[k] for k in TABLE} for row in table], TABLE)
    print(f"{len(table)} shapes -> {args.out}")


if __name__ == "__main__":
    main()
