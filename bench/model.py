"""Training-step speed of the GPT on this machine: forward + backward + optimizer step.

For each depth: tokens/s, achieved GFLOP/s (from GPT.estimate_flops), MFU against the measured matmul peak
(nanochat_nb.common.peak_flops) and the peak resident memory of the process. Each configuration runs in
its own subprocess so that peak RSS is its own. Run it alone on the machine:

    flock -x /tmp/cpu.lock python bench/model.py                       # d4 and d6, seq 512, batch 8
    NANOCHAT_DTYPE=bf16 flock -x /tmp/cpu.lock python bench/model.py   # compute in bf16
    flock -x /tmp/cpu.lock python bench/model.py --no-compile --depths 4 --no-optimizer

nanochat itself on this machine (its model and MuonAdamW, fp32, torch.compile, seq 512, batch 8; timed
2026-11-21 with a copy outside this repository): d4 about 800 tok/s, d6 about 540 (1,170 and 625 with
MALLOC_MMAP_THRESHOLD_/MALLOC_TRIM_THRESHOLD_ set, the equivalent of common.keep_freed_memory). SPEC.md's
1440/760 were measured on a CPU with AVX-512; this one has AVX2 only.
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import time

import torch


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2


def run_one(args) -> dict:
    from nanochat_nb.common import compute_dtype, keep_freed_memory, peak_flops
    from nanochat_nb.fused_head import native_softcap_ce
    from nanochat_nb.gpt import GPT, GPTConfig

    if args.keep_freed_memory:  # as training does (common.init_distributed)
        keep_freed_memory()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device("cpu")
    config = GPTConfig.from_depth(args.depth, vocab_size=args.vocab, sequence_len=args.seq)
    model = GPT(config).init_weights()
    optimizer = None
    if args.optimizer:
        try:
            from nanochat_nb.optim import setup_optimizer
            optimizer = setup_optimizer(model, world_size=1, compile=args.compile)
        except ImportError as e:
            print(f"(no optimizer: {e}; timing forward + backward only)", file=sys.stderr)
    step_model = torch.compile(model, dynamic=False) if args.compile else model
    generator = torch.Generator().manual_seed(0)
    data = torch.randint(0, args.vocab, (args.steps + args.warmup, args.batch, args.seq + 1), generator=generator)

    def train_step(i):
        batch = data[i]
        loss = step_model(batch[:, :-1], targets=batch[:, 1:])
        loss.backward()
        if optimizer is not None:
            optimizer.step()
        model.zero_grad(set_to_none=True)
        return loss

    start = time.perf_counter()
    for i in range(args.warmup):
        train_step(i)
    warmup_s = time.perf_counter() - start
    times = []
    for i in range(args.warmup, args.warmup + args.steps):
        t0 = time.perf_counter()
        train_step(i)
        times.append(time.perf_counter() - t0)
    dtype = compute_dtype("cpu")
    step_s = sorted(times)[len(times) // 2]  # median: robust to a neighbour's burst
    tokens = args.batch * args.seq
    flops = model.estimate_flops() * tokens / step_s
    return {
        "depth": args.depth, "dtype": str(dtype).removeprefix("torch."), "compile": args.compile,
        "optimizer": optimizer is not None, "threads": torch.get_num_threads(),
        "native_ce": native_softcap_ce() is not None,
        "tok_per_s": tokens / step_s, "best_tok_per_s": tokens / min(times), "step_s": step_s,
        "gflops": flops / 1e9, "mfu": flops / (args.peak or peak_flops(device, dtype)), "peak_rss_gb": peak_rss_gb(),
        "warmup_s": warmup_s, "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--depths", type=int, nargs="+", default=[4, 6])
    parser.add_argument("--depth", type=int, help=argparse.SUPPRESS)  # internal: one configuration
    parser.add_argument("--peak", type=float, default=0.0, help=argparse.SUPPRESS)  # internal: FLOP/s for MFU
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=32768)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: PyTorch's default)")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--optimizer", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--keep-freed-memory", action=argparse.BooleanOptionalAction, default=True,
                        help="malloc keeps freed blocks (as in training); --no-keep-freed-memory: glibc's defaults")
    args = parser.parse_args(argv)
    if args.depth is not None:
        print(json.dumps(run_one(args)))
        return
    from nanochat_nb.common import compute_dtype, measure_matmul_flops, print_hardware_summary
    print_hardware_summary()
    if args.threads:
        torch.set_num_threads(args.threads)
    # MFU is against the matmul peak measured now, on an otherwise idle machine
    dtype = compute_dtype("cpu")
    args.peak = measure_matmul_flops(dtype)
    print(f"matmul peak ({dtype}, {torch.get_num_threads()} threads): {args.peak / 1e9:.1f} GFLOP/s measured now")
    print(f"seq {args.seq}, batch {args.batch}, vocab {args.vocab}, compile {args.compile}, "
          f"optimizer {args.optimizer}, keep freed memory {args.keep_freed_memory}, "
          f"{args.steps} timed steps after {args.warmup} warm-up")
    header = f"{'depth':>5} {'dtype':>8} {'tok/s':>8} {'best':>8} {'step s':>7} {'GFLOP/s':>8} {'MFU':>6} {'peak RSS':>9} {'warm-up':>8}"
    print(header)
    for depth in args.depths:
        cmd = [sys.executable, __file__, "--depth", str(depth), "--seq", str(args.seq), "--batch", str(args.batch),
               "--vocab", str(args.vocab), "--steps", str(args.steps), "--warmup", str(args.warmup),
               "--threads", str(args.threads), "--peak", str(args.peak), "--compile" if args.compile else "--no-compile",
               "--optimizer" if args.optimizer else "--no-optimizer",
               "--keep-freed-memory" if args.keep_freed_memory else "--no-keep-freed-memory"]
        out = subprocess.run(cmd, capture_output=True, text=True, env=os.environ)
        if out.returncode != 0:
            print(f"depth {depth} failed:\n{out.stderr[-3000:]}")
            continue
        r = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"{r['depth']:>5} {r['dtype']:>8} {r['tok_per_s']:>8.0f} {r['best_tok_per_s']:>8.0f} {r['step_s']:>7.3f} "
              f"{r['gflops']:>8.1f} {r['mfu']:>6.1%} {r['peak_rss_gb']:>7.2f}GB {r['warmup_s']:>7.1f}s"
              + ("" if r["optimizer"] else "  (no optimizer step)"), flush=True)


if __name__ == "__main__":
    main()
