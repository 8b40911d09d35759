"""The GPU check: everything that needs a CUDA GPU, in one command of at most about 8 minutes on one H100/H200.

    make gpu-check [OUT=outputs/gpu_check] [REFERENCE=path/to/nanochat]
    python bench/gpu_check.py --out DIR [--reference PATH] [--dry-run]

Four parts, run in order; each one's figures go to OUT/gpu_check.json (rewritten after every part) and everything
printed to OUT/gpu_check.log:

1. wheels: the packages the GPU machine's python lacks (rustbpe, tqdm, papermill, ipykernel, ...: the folder
   `.gpu_wheels/` that `make gpu-check` fills here, where there is a network) are installed without a network
   into OUT/site, which every later part finds on PYTHONPATH.
2. tests: `pytest -m gpu tests/test_gpu.py` (bf16, the fused head, FA3 or SDPA, torch.compile, the KV cache,
   fp8, NCCL with 2+ GPUs).
3. steps: bench/model.py at the d12 and d24 shapes (device batch 16, sequence 2048, compiled, with the
   optimizer): tok/s and MFU against the GPU's dense bf16 peak (common.GPU_PEAK_BF16_FLOPS), side by side with
   nanochat when --reference is given.
4. training: a short gpu1-shaped run (d12, sequence 2048; 100 base steps, 20 SFT steps, a small chat eval) through
   the speedrun lesson under papermill (when papermill and ipykernel import), else through the stage commands;
   its home folder is OUT/home and the executed lesson OUT/speedrun_gpu_check.ipynb. Pretraining shards come
   from NANOCHAT_DATA (no downloads).

`--dry-run` runs the same four parts on the CPU at tiny shapes (a minute; the training through the stage commands,
since tests/test_lessons.py runs the lesson itself), so that the check is known to work before a GPU is there;
tests/test_gpu_check.py runs it.
"""
import argparse
import configparser
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from nanochat_nb.common import atomic_write, data_dir, settings_path  # noqa: E402

# part -> (real, dry run) settings
STEP_SHAPES = {False: ["--depths", "12", "24", "--batch", "16", "--seq", "2048", "--steps", "5", "--warmup", "2"],
               True: ["--depths", "2", "--batch", "2", "--seq", "128", "--vocab", "512", "--steps", "1", "--warmup",
                      "1", "--no-compile"]}
TRAINING = {  # the preset the short run starts from, and what it changes
    False: ("gpu1", {"max-chars": "20000000", "num-iterations": "100", "total-batch-size": "131072",
                     "eval-every": "50", "eval-tokens": "1048576", "sample-every": "-1", "save-every": "-1",
                     "max-per-task": "16", "num-steps": "20", "task-cap": "2000", "chat-eval-every": "-1",
                     "max-items": "32", "max-tokens": "128"}),
    True: ("tiny", {"vocab-size": "512", "max-chars": "200000", "depth": "2", "num-iterations": "4",
                    "eval-every": "2", "eval-tokens": "2048", "max-per-task": "1", "core-max-seq-len": "128"}),
}
PRESET = "gpu-check"


class Log:
    "Print to the terminal and append to OUT/gpu_check.log."

    def __init__(self, path: Path):
        self.file = open(path, "a")

    def __call__(self, text: str):
        print(text, flush=True)
        self.file.write(text + "\n")
        self.file.flush()

    def run(self, command: list[str], env: dict, timeout: float) -> int:
        "Run `command`, its output streamed into the log; its exit code (124 when it ran past `timeout` seconds)."
        self("$ " + " ".join(map(str, command)))
        process = subprocess.Popen(list(map(str, command)), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                   text=True, env=env, cwd=REPO)
        deadline = time.monotonic() + timeout
        for line in process.stdout:
            self(line.rstrip("\n"))
            if time.monotonic() > deadline:
                process.kill()
                self(f"(stopped after {timeout:.0f} s)")
                return 124
        return process.wait()


def install_wheels(args, env: dict, log: Log) -> dict:
    "pip install --no-index the wheels folder into OUT/site, and put it first on PYTHONPATH."
    wheels = sorted(Path(args.wheels).glob("*.whl"))
    if not wheels:
        return {"installed": 0, "note": f"no wheels in {args.wheels}: this python's own packages are used"}
    site = args.out / "site"
    code = log.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                    "--upgrade", "--target", site, *wheels], env, 300)
    if code != 0:
        raise RuntimeError(f"pip install of {len(wheels)} wheels failed (exit {code})")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(site), env.get("PYTHONPATH")]))
    return {"installed": len(wheels), "site": str(site)}


def gpu_tests(args, env: dict, log: Log) -> dict:
    "The CUDA-only tests; on a CPU they are all skipped, with the reason."
    report = args.out / "pytest_gpu.xml"
    code = log.run([sys.executable, "-m", "pytest", "-m", "gpu", "tests/test_gpu.py", "-q", "-rs", "-p",
                    "no:cacheprovider", f"--junitxml={report}"], env, 240)
    import xml.etree.ElementTree as ElementTree
    suite = ElementTree.parse(report).getroot()
    suite = suite if suite.tag == "testsuite" else suite[0]
    counts = {key: int(suite.get(key, 0)) for key in ("tests", "failures", "errors", "skipped")}
    if code != 0:
        raise RuntimeError(f"pytest -m gpu exited {code}: {counts}")
    return counts


def training_steps(args, env: dict, log: Log) -> dict:
    "bench/model.py at the d12 and d24 shapes (tiny ones in a dry run), side by side with --reference."
    figures = args.out / "steps.json"
    command = [sys.executable, "bench/model.py", *STEP_SHAPES[args.dry_run], "--json", figures]
    if args.dry_run:
        command += ["--device", "cpu"]
    if args.reference:
        command += ["--reference", args.reference]
    code = log.run(command, env, 300)
    if code != 0:
        raise RuntimeError(f"bench/model.py exited {code}")
    runs = json.loads(figures.read_text())["runs"]
    table = {f"{r['impl']} d{r['depth']}": {k: r[k] for k in ("tok_per_s", "mfu", "step_s", "peak_gb")} for r in runs}
    for depth in {r["depth"] for r in runs}:
        ours, ref = (table.get(f"{impl} d{depth}") for impl in ("ours", "reference"))
        if ours and ref:
            table[f"ratio d{depth}"] = ours["tok_per_s"] / ref["tok_per_s"]
    return table


def check_settings(args) -> Path:
    "A settings.ini with every preset of the course's plus `gpu-check`: the short run, on the shards there are."
    presets = configparser.ConfigParser()
    presets.read(settings_path())
    base, changes = TRAINING[args.dry_run]
    shards = len(list(data_dir("pretrain").glob("shard_*.parquet")))
    presets[PRESET] = {**presets[base], **changes, "num-shards": str(min(shards, int(presets[base]["num-shards"])))}
    path = args.out / "settings.ini"
    with open(path, "w") as f:
        presets.write(f)
    return path


def short_training(args, env: dict, log: Log) -> dict:
    "The speedrun lesson on the `gpu-check` preset under papermill if it imports, else the stage commands."
    env = {**env, "NANOCHAT_SETTINGS": str(check_settings(args)), "NANOCHAT_HOME": str(args.out / "home")}
    # the dry run takes the stage commands: tests/test_lessons.py already runs the lesson itself at `tiny`
    lesson = not args.dry_run and log.run([sys.executable, "-c", "import papermill, ipykernel"], env, 60) == 0
    if lesson:
        executed = args.out / "speedrun_gpu_check.ipynb"
        command = [[sys.executable, "-m", "papermill", "lessons/speedrun.ipynb", executed, "-p", "preset", PRESET,
                    "-k", "python3", "--log-output"]]
    else:
        stage = [sys.executable, "-m"]
        command = [stage + ["nanochat_nb.tokenizer", "train", "--preset", PRESET, "--no-progress"],
                   stage + ["nanochat_nb.train", "--preset", PRESET]]
    for part in command:
        code = log.run(part, env, 420)
        if code != 0:
            raise RuntimeError(f"{part[2]} exited {code}")
    log_file = next((args.out / "home" / "base_checkpoints").glob("d*/log.jsonl"))
    records = [json.loads(line) for line in log_file.read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    timed = steps[1:] or steps  # the first step compiles
    return {"via": "lesson (papermill)" if lesson else "stage commands", "steps": len(steps),
            "final_loss": steps[-1]["loss"], "val_bpb": [r["val_bpb"] for r in records if "val_bpb" in r][-1],
            "tok_per_s": statistics.median(r["tok_per_s"] for r in timed),
            "mfu": statistics.median(r["mfu"] for r in timed)}


PARTS = {"wheels": install_wheels, "tests": gpu_tests, "steps": training_steps, "training": short_training}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=REPO / "outputs" / "gpu_check", help="folder for everything")
    parser.add_argument("--reference", metavar="PATH", help="a nanochat checkout to time the steps beside")
    parser.add_argument("--wheels", default=str(REPO / ".gpu_wheels"), help="wheels to install without a network")
    parser.add_argument("--dry-run", action="store_true", help="the same parts on the CPU at tiny shapes")
    parser.add_argument("--parts", default=",".join(PARTS), help="a subset of " + ",".join(PARTS))
    args = parser.parse_args(argv)
    args.out = args.out.resolve()
    args.out.mkdir(parents=True, exist_ok=True)
    log = Log(args.out / "gpu_check.log")
    import torch
    from _util import machine_line
    device = "cuda" if torch.cuda.is_available() and not args.dry_run else "cpu"
    results = {"machine": machine_line(device), "dry_run": args.dry_run, "reference": args.reference, "parts": {}}
    log(f"gpu check{' (dry run)' if args.dry_run else ''} on {results['machine']}")
    env = {**os.environ, "PYTHONUNBUFFERED": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    for name in args.parts.split(","):
        started = time.perf_counter()
        try:
            outcome = {"ok": True, **PARTS[name](args, env, log)}
        except Exception as error:  # record it and go on: one failing part must not hide the others' figures
            outcome = {"ok": False, "error": f"{type(error).__name__}: {error}"}
        outcome["seconds"] = round(time.perf_counter() - started, 1)
        results["parts"][name] = outcome
        log(f"== {name}: {json.dumps(outcome)}")
        atomic_write(args.out / "gpu_check.json", json.dumps(results, indent=1))
    failed = [name for name, outcome in results["parts"].items() if not outcome["ok"]]
    log(f"gpu check {'failed: ' + ', '.join(failed) if failed else 'passed'}; figures in {args.out / 'gpu_check.json'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
