"""What every benchmark in bench/ shares: a one-line description of the machine, timing, peak memory and the
cached benchmark tokenizer.

- `measure(fn)` runs `fn` after warm-up calls and returns the best and median of N timed calls, synchronising
  the GPU around each call on CUDA so that the figure is the work, not the launch.
- `peak_memory_gb(device)` is the process's peak resident set on a CPU (`resource.getrusage`) and
  `torch.cuda.max_memory_allocated` on a GPU. A figure per configuration needs a process per configuration
  (`run_child`), since the RSS peak never goes down.
- `bench_tokenizer()` is a 32768-token tokenizer trained once on 20M characters of the course's training shards
  (as the `cpu` preset trains its own), in a child process so that training leaves no trace in the caller's
  memory, and cached in `<NANOCHAT_HOME>/bench/`.
"""
from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from nanochat_nb.common import cpu_name, git_commit, nanochat_home

BENCH_VOCAB_SIZE, BENCH_TOKENIZER_CHARS, BENCH_DOC_CAP = 32768, 20_000_000, 10_000


def cpu_flags() -> str:
    "The vector extensions of this CPU that matter for matmuls (avx2, avx512*, amx*)."
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        return "?"
    wanted = [f for f in flags.split(":", 1)[1].split() if f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")]
    return " ".join(wanted) or "no avx2"


def machine_line(device: str | torch.device | None = None) -> str:
    "One line that says where a figure came from: device, cores, vector flags, threads, torch, commit, load."
    device = torch.device(device or "cpu")
    where = (torch.cuda.get_device_name(device) if device.type == "cuda"
             else f"{cpu_name()} ({cpu_flags()}), {os.cpu_count()} cores")
    return (f"{where}, {torch.get_num_threads()} torch threads, torch {torch.__version__}, commit {git_commit()}, "
            f"load average {os.getloadavg()[0]:.2f}")


def synchronize(device: str | torch.device | None = None):
    "Wait for queued GPU work (a no-op on the CPU)."
    device = torch.device(device or "cpu")
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class Timing:
    "Wall times of repeated calls, in seconds."
    times: list[float]

    @property
    def best(self) -> float:
        return min(self.times)

    @property
    def median(self) -> float:  # robust to a neighbour's burst on a shared machine
        return statistics.median(self.times)

    def __str__(self):
        return f"{self.best * 1e3:.1f} ms best, {self.median * 1e3:.1f} ms median of {len(self.times)}"


def measure(fn, *args, repeat: int = 5, warmup: int = 1, device=None) -> Timing:
    "Time `fn(*args)` `repeat` times after `warmup` untimed calls (synchronised on CUDA)."
    for _ in range(warmup):
        fn(*args)
    times = []
    for _ in range(repeat):
        synchronize(device)
        start = time.perf_counter()
        fn(*args)
        synchronize(device)
        times.append(time.perf_counter() - start)
    return Timing(times)


def timed(fn, device=None):
    "Run `fn()` once; return (seconds, its result)."
    synchronize(device)
    start = time.perf_counter()
    result = fn()
    synchronize(device)
    return time.perf_counter() - start, result


def peak_memory_gb(device=None) -> float:
    "Peak memory so far in GiB: allocated tensors on CUDA, the process's resident set on the CPU."
    device = torch.device(device or "cpu")
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return peak / (2**30 if sys.platform == "darwin" else 2**20)


def run_child(argv: list[str], env: dict | None = None) -> dict | str:
    """Run `python argv...` in a fresh process (its own peak memory) that prints a JSON line last; return that
    line parsed, or the tail of its error output as a string if it failed."""
    done = subprocess.run([sys.executable, *map(str, argv)], capture_output=True, text=True,
                          env={**os.environ, **(env or {})})
    if done.returncode != 0:
        return done.stderr[-3000:] or done.stdout[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


_TRAIN_TOKENIZER = """
from nanochat_nb.dataset import iter_texts
from nanochat_nb.tokenizer import Tokenizer
Tokenizer.train(iter_texts("train", max_chars={chars}, doc_cap={doc_cap}), {vocab}).save({folder!r})
"""


def bench_tokenizer_dir(vocab_size: int = BENCH_VOCAB_SIZE, chars: int = BENCH_TOKENIZER_CHARS) -> Path:
    "The folder of the benchmark tokenizer, trained on first use (in a child process) and cached."
    folder = nanochat_home() / "bench" / f"tokenizer_{vocab_size}_{chars // 1_000_000}M"
    if not (folder / "tokenizer.json").is_file():  # written last by Tokenizer.save: the save is complete
        print(f"training the benchmark tokenizer ({vocab_size} tokens, {chars:,} characters) into {folder}",
              file=sys.stderr, flush=True)
        code = _TRAIN_TOKENIZER.format(chars=chars, doc_cap=BENCH_DOC_CAP, vocab=vocab_size, folder=str(folder))
        subprocess.run([sys.executable, "-c", code], check=True)
    return folder


def bench_tokenizer(vocab_size: int = BENCH_VOCAB_SIZE, chars: int = BENCH_TOKENIZER_CHARS):
    "The benchmark tokenizer, loaded (see `bench_tokenizer_dir`)."
    from nanochat_nb.tokenizer import Tokenizer
    return Tokenizer.load(bench_tokenizer_dir(vocab_size, chars))
