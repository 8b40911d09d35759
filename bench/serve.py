"""Serving under load: `nanochat-serve` in its own process on 127.0.0.1, driven by concurrent streaming clients.

    python bench/serve.py                                  # a random-init d4 model with the bench tokenizer
    python bench/serve.py --checkpoint RUN_FOLDER          # a trained run folder instead
    python bench/serve.py --clients 32 --seconds 30 --max-tokens 32 --workers 1

Phase 1: `--clients` clients each send streaming chat requests back to back for `--seconds` (a short user message,
`--max-tokens` new tokens, temperature 1, top-k 50); the queue is large enough for all of them. Printed: requests
completed, time to first token (first content chunk) and total latency p50/p95, tokens/s served (content chunks
received by all clients / wall time), errors (anything but a complete 200 stream; must be 0) and the server's peak
RSS (VmHWM from /proc). Phase 2: the server restarted with `--queue-size 4` and the same clients: requests that
got 503 (with Retry-After) are counted apart from errors, and /health must answer after.
Without `--checkpoint` the model is a random-init d4 GPT with the course's bench tokenizer (32768 tokens), saved
as an SFT-style run folder under <NANOCHAT_HOME>/bench/serve_d4: the figures are about serving, not answers.
"""
import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _util import bench_tokenizer, machine_line  # noqa: E402

from nanochat_nb import checkpoint  # noqa: E402
from nanochat_nb.common import nanochat_home  # noqa: E402
from nanochat_nb.gpt import GPT, GPTConfig  # noqa: E402
from nanochat_nb.serve import free_port  # noqa: E402


def random_run_folder(depth: int) -> Path:
    folder = nanochat_home() / "bench" / f"serve_d{depth}" / "chatsft_checkpoints" / f"d{depth}"
    if checkpoint.latest(folder) is None:
        tokenizer = bench_tokenizer()
        config = GPTConfig.from_depth(depth, vocab_size=tokenizer.vocab_size, sequence_len=2048)
        model = GPT(config).init_weights()
        checkpoint.save(folder, 0, model, meta={"tokenizer": checkpoint.tokenizer_fingerprint(tokenizer)})
        tokenizer.save(folder / "tokenizer")
    return folder


def start_server(folder: Path, port: int, args, queue_size: int) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "nanochat_nb.serve", "--checkpoint", str(folder), "--port", str(port),
           "--workers", str(args.workers), "--queue-size", str(queue_size), "--mode", "chat"]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.stdout.read()
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200:
                return proc
        except httpx.TransportError:
            time.sleep(0.2)
    raise RuntimeError("the server did not start")


def peak_rss_gb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 2**20
    return float("nan")


async def client(url: str, i: int, until: float, args, results: dict):
    async with httpx.AsyncClient(timeout=120) as http:
        k = 0
        while time.monotonic() < until:
            body = {"messages": [{"role": "user", "content": f"Client {i}, request {k}: tell me a story."}],
                    "stream": True, "max_tokens": args.max_tokens, "temperature": 1.0, "top_k": 50, "seed": i * 1000 + k}
            k += 1
            begun, first, chunks = time.monotonic(), None, 0
            try:
                async with http.stream("POST", url + "/v1/chat/completions", json=body) as response:
                    if response.status_code == 503:
                        assert response.headers.get("retry-after")
                        results["rejected"] += 1
                        await response.aread()
                        await asyncio.sleep(0.2)
                        continue
                    if response.status_code != 200:
                        raise RuntimeError(f"status {response.status_code}")
                    done = False
                    async for line in response.aiter_lines():
                        if line == "data: [DONE]":
                            done = True
                        elif line.startswith("data: ") and '"content": "' in line and '"content": ""' not in line:
                            chunks += 1
                            first = first or time.monotonic()
                    if not done:
                        raise RuntimeError("stream ended without [DONE]")
            except Exception as error:  # counted, not raised: the figure is the count
                results["errors"].append(repr(error))
                continue
            results["ttft"].append((first or time.monotonic()) - begun)
            results["latency"].append(time.monotonic() - begun)
            results["chunks"] += chunks


def percentile(values, q):
    return statistics.quantiles(values, n=100)[q - 1] if len(values) >= 2 else float("nan")


def run_phase(name: str, folder: Path, args, queue_size: int):
    port = free_port()
    proc = start_server(folder, port, args, queue_size)
    url = f"http://127.0.0.1:{port}"
    results = {"ttft": [], "latency": [], "chunks": 0, "errors": [], "rejected": 0}
    try:
        begun = time.monotonic()
        until = begun + args.seconds

        async def everyone():
            await asyncio.gather(*(client(url, i, until, args, results) for i in range(args.clients)))
        asyncio.run(everyone())
        wall = time.monotonic() - begun
        healthy = httpx.get(url + "/health").json()["status"]
        stats = httpx.get(url + "/stats").json()
        rss = peak_rss_gb(proc.pid)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    done = len(results["latency"])
    print(f"{name}: {args.clients} streaming clients for {args.seconds:g} s (wall {wall:.1f} s), queue {queue_size}, "
          f"{args.workers} worker(s)")
    print(f"  requests completed {done}, errors {len(results['errors'])}, 503 (queue full) {results['rejected']}, "
          f"health after: {healthy}")
    if done:
        print(f"  TTFT p50 {percentile(results['ttft'], 50):.2f} s, p95 {percentile(results['ttft'], 95):.2f} s; "
              f"latency p50 {percentile(results['latency'], 50):.2f} s, p95 {percentile(results['latency'], 95):.2f} s")
    print(f"  tokens/s served {results['chunks'] / wall:.1f} (content chunks; server counted "
          f"{stats['tokens_generated']} tokens), server peak RSS {rss:.2f} GiB")
    for error in results["errors"][:3]:
        print("  error:", error)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", help="a run folder (default: a random-init model of --depth)")
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=30)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--threads", type=int, default=0, help="CPU threads for the server (0: all)")
    parser.add_argument("--overfill-queue", type=int, default=4, help="queue size of phase 2")
    args = parser.parse_args()
    print(machine_line("cpu"))
    folder = Path(args.checkpoint) if args.checkpoint else random_run_folder(args.depth)
    print(f"model: {folder}" + ("" if args.checkpoint else f" (random-init d{args.depth}, bench tokenizer: the "
                                "answers are noise; the figures are about serving)"))
    run_phase("phase 1, queue large enough", folder, args, queue_size=max(64, 2 * args.clients))
    run_phase("phase 2, queue overfilled", folder, args, queue_size=args.overfill_queue)


if __name__ == "__main__":
    main()
