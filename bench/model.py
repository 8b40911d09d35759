"""Training-step speed of the GPT: forward + backward + optimizer step on random tokens.

For each depth: tokens/s, achieved GFLOP/s (from the model's `estimate_flops`), MFU (against the matmul peak
measured at the start on a CPU, the bf16 table value on a GPU) and peak memory. Each configuration runs in its
own process so that its peak memory is its own.

    python bench/model.py                                  # d4 and d6, seq 512, batch 8, compiled
    NANOCHAT_DTYPE=bf16 python bench/model.py              # compute in bf16
    python bench/model.py --no-compile --depths 4 --no-optimizer
    python bench/model.py --reference ~/src/nanochat       # side by side with a nanochat checkout

`--reference PATH` times nanochat's own GPT and MuonAdamW (imported from that checkout) on the same shapes, dtype
and data, alternating with ours depth by depth, and prints the ratio: on a shared machine a speed claim is a
ratio measured side by side, not an absolute figure.
"""
import argparse
import itertools
import json
import os
import sys
from dataclasses import asdict
from pathlib import Path

import torch

from _util import machine_line, measure, peak_memory_gb, run_child, timed

NANOCHAT_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


def build(args, device, dtype):
    "Our GPT and optimizer, or nanochat's from the checkout in `args.reference` (with `args.impl == 'reference'`)."
    from nanochat_nb.gpt import GPT, GPTConfig
    from nanochat_nb.optim import setup_optimizer
    config = GPTConfig.from_depth(args.depth, vocab_size=args.vocab, sequence_len=args.seq)
    if args.impl == "ours":
        model = GPT(config).to(device).init_weights()
        if not args.optimizer:
            return model, None
        return model, setup_optimizer(model.param_groups(), config.n_embd, world_size=1, compile=args.compile)
    os.environ["NANOCHAT_DTYPE"] = NANOCHAT_DTYPE_NAMES[dtype]  # nanochat reads it at import
    sys.path.insert(0, os.path.expanduser(args.reference))
    from nanochat.gpt import GPT as ReferenceGPT, GPTConfig as ReferenceConfig
    with torch.device("meta"):
        model = ReferenceGPT(ReferenceConfig(**asdict(config)))
    model.to_empty(device=device)
    model.init_weights()
    return model, model.setup_optimizer() if args.optimizer else None  # its steps are always compiled


def run_one(args) -> dict:
    "Time one configuration in this process."
    from nanochat_nb.common import compute_dtype, keep_freed_memory, peak_flops
    if args.keep_freed_memory:  # as training does (common.init_distributed)
        keep_freed_memory()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = compute_dtype(device.type)
    torch.manual_seed(0)
    model, optimizer = build(args, device, dtype)
    step_model = torch.compile(model, dynamic=False) if args.compile else model
    generator = torch.Generator().manual_seed(0)
    data = torch.randint(0, args.vocab, (args.steps + args.warmup + 1, args.batch, args.seq + 1), generator=generator)
    batches = itertools.cycle([(row[:, :-1].contiguous().to(device), row[:, 1:].contiguous().to(device)) for row in data])

    def train_step():
        inputs, targets = next(batches)  # contiguous, as a loader gives them (nanochat's loss views the targets)
        step_model(inputs, targets=targets).backward()
        if optimizer is not None:
            optimizer.step()
        model.zero_grad(set_to_none=True)

    warmup_s, _ = timed(lambda: [train_step() for _ in range(args.warmup)], device)
    timing = measure(train_step, repeat=args.steps, warmup=0, device=device)
    tokens = args.batch * args.seq
    flops = model.estimate_flops() * tokens / timing.median
    return {"impl": args.impl, "depth": args.depth, "dtype": str(dtype).removeprefix("torch."),
            "optimizer": optimizer is not None, "tok_per_s": tokens / timing.median,
            "best_tok_per_s": tokens / timing.best, "step_s": timing.median, "gflops": flops / 1e9,
            "mfu": flops / (args.peak or peak_flops(device, dtype)), "peak_gb": peak_memory_gb(device),
            "warmup_s": warmup_s, "params_m": sum(p.numel() for p in model.parameters()) / 1e6}


def child_argv(args, depth: int, impl: str) -> list[str]:
    argv = [__file__, "--depth", depth, "--impl", impl, "--device", args.device, "--seq", args.seq,
            "--batch", args.batch, "--vocab", args.vocab, "--steps", args.steps, "--warmup", args.warmup,
            "--threads", args.threads, "--peak", args.peak, "--compile" if args.compile else "--no-compile",
            "--optimizer" if args.optimizer else "--no-optimizer",
            "--keep-freed-memory" if args.keep_freed_memory else "--no-keep-freed-memory"]
    return argv + (["--reference", args.reference] if args.reference else [])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--depths", type=int, nargs="+", default=[4, 6])
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=32768)
    parser.add_argument("--steps", type=int, default=6, help="timed steps (the median is reported)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first (compilation)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: PyTorch's default)")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--optimizer", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--keep-freed-memory", action=argparse.BooleanOptionalAction, default=True,
                        help="malloc keeps freed blocks (as in training); --no-keep-freed-memory: glibc's defaults")
    parser.add_argument("--reference", metavar="PATH", help="a nanochat checkout to time side by side")
    parser.add_argument("--json", metavar="PATH", help="also write the figures (one record per run) to this file")
    parser.add_argument("--depth", type=int, help=argparse.SUPPRESS)  # internal: one configuration
    parser.add_argument("--impl", default="ours", choices=["ours", "reference"], help=argparse.SUPPRESS)
    parser.add_argument("--peak", type=float, default=0.0, help=argparse.SUPPRESS)  # internal: FLOP/s for MFU
    args = parser.parse_args(argv)
    if args.depth is not None:
        print(json.dumps(run_one(args)))
        return
    from nanochat_nb.common import compute_dtype, measure_matmul_flops
    if args.threads:
        torch.set_num_threads(args.threads)
    print(machine_line(args.device))
    if args.device == "cpu":  # MFU against the matmul peak measured now, once for every configuration
        args.peak = measure_matmul_flops(compute_dtype("cpu"))
        print(f"matmul peak ({compute_dtype('cpu')}, {torch.get_num_threads()} threads): {args.peak / 1e9:.1f} GFLOP/s")
    print(f"seq {args.seq}, batch {args.batch}, vocab {args.vocab}, compile {args.compile}, "
          f"optimizer {args.optimizer}, keep freed memory {args.keep_freed_memory}, "
          f"median of {args.steps} timed steps after {args.warmup} warm-up")
    print(f"{'impl':>9} {'depth':>5} {'dtype':>8} {'tok/s':>8} {'best':>8} {'step s':>7} {'GFLOP/s':>8} {'MFU':>6} "
          f"{'peak mem':>9} {'warm-up':>8}")
    impls = ["ours", "reference"] if args.reference else ["ours"]
    failed, rows = False, []
    for depth in args.depths:
        results = {}
        for impl in impls:
            r = run_child(child_argv(args, depth, impl))
            if isinstance(r, str):
                print(f"{impl} d{depth} failed:\n{r}")
                failed = True
                continue
            results[impl] = r
            rows.append(r)
            print(f"{impl:>9} {depth:>5} {r['dtype']:>8} {r['tok_per_s']:>8.0f} {r['best_tok_per_s']:>8.0f} "
                  f"{r['step_s']:>7.3f} {r['gflops']:>8.1f} {r['mfu']:>6.1%} {r['peak_gb']:>6.2f}GiB "
                  f"{r['warmup_s']:>7.1f}s" + ("" if r["optimizer"] else "  (no optimizer step)"), flush=True)
        if len(results) == 2:
            print(f"{'':>9} d{depth}: ours / nanochat = {results['ours']['tok_per_s'] / results['reference']['tok_per_s']:.2f}x")
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": machine_line(args.device), "runs": rows}, indent=1))
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
