"""Inference speed of `nanochat_nb.engine.Engine`, side by side with nanochat's own `Engine` on the same weights.

Per depth: time to first token (TTFT) for a prompt of `--prompt` tokens and decode tokens/s at batch 1 (greedy,
temperature 0), then the throughput of `--batches` parallel samples drawn from that one prompt (temperature
`--temperature`, top-k `--top-k`, seeded), and the batch-max / batch-1 throughput ratio.

    python bench/engine.py                                        # ours only, d4 and d6
    python bench/engine.py --reference /tmp/nanochat              # side by side with a nanochat checkout
    python bench/engine.py --reference PATH --depths 4 --tokens 64 --repeat 3 --threads 1

How it is fair:
- Same weights: for each depth our GPT is built (`init_weights`, seed 0) and saved with `checkpoint.save` in
  nanochat's layout (`model_XXXXXX.pt` + `meta_XXXXXX.json`); ours loads it with `checkpoint.load_model`,
  nanochat's GPT is built from the same `model_config` and loads the same file with a strict state-dict load.
  Same dtype (ours' compute dtype, passed to nanochat through `NANOCHAT_DTYPE`), same device, same prompt
  (random ordinary token ids, fixed seed), same settings.
- Same number of tokens: both engines get a tokenizer adapter whose special tokens are all id -1, a token that
  never occurs, so no row stops early and no tool call starts; every row yields exactly `--tokens` tokens.
- Same clock: a step counts when its whole column (one token for every row) has been yielded; TTFT is the
  first column, decode tok/s is (tokens - 1) / (time of the last column - time of the first) and throughput is
  rows x tokens / (time of the last column - call), prefill included. The generator is closed after the last
  column, so nanochat's extra forward after its last token (it computes the logits of a token it never
  yields) is not counted against it.
- Same moment: both engines run in one process per depth, alternating (ours first on even repeats, nanochat
  first on odd ones) measurement by measurement, after a short warm-up of each; figures are medians over
  `--repeat`. On a shared machine compare the ratios, not the absolute figures.

`--threads` sets `torch.set_num_threads` (default 1: on a small CPU, the tiny matmuls of decoding run slower on
2 threads than on 1).
"""
import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

from _util import machine_line, run_child


class NoSpecialTokens:
    """The tokenizer both engines see: every special token is id -1, which never occurs (no early stop, no tool
    call), so both generate exactly the tokens asked for. It answers nanochat's calls (`encode_special`,
    `get_bos_token_id`) and ours (`id_of`)."""

    def id_of(self, name: str) -> int:
        return -1

    encode_special = id_of

    def get_bos_token_id(self) -> int:
        return -1

    def encode(self, text, *args, **kwargs):  # tool output: never reached with the ids above
        return []

    def decode(self, ids) -> str:
        return ""


def save_weights(args, folder: Path):
    "Build our GPT at `args.depth` (seed 0) and save it in nanochat's checkpoint layout; return the step."
    from nanochat_nb import checkpoint
    from nanochat_nb.gpt import GPT, GPTConfig
    torch.manual_seed(0)
    config = GPTConfig.from_depth(args.depth, vocab_size=args.vocab, sequence_len=args.seq)
    checkpoint.save(folder, 0, GPT(config).init_weights())
    return 0


def load_ours(folder: Path, device, dtype):
    from nanochat_nb.checkpoint import load_model
    from nanochat_nb.engine import Engine
    model, _ = load_model(folder, device=device, compute_dtype=dtype)
    return Engine(model, NoSpecialTokens())


def load_reference(path: str, folder: Path, step: int, device, dtype):
    "nanochat's GPT from its own config class and a strict load of the same file, and its Engine."
    from nanochat_nb.checkpoint import model_file, read_meta
    os.environ["NANOCHAT_DTYPE"] = str(dtype).removeprefix("torch.")  # nanochat reads it at import
    sys.path.insert(0, os.path.expanduser(path))
    from nanochat.engine import Engine as ReferenceEngine
    from nanochat.gpt import GPT as ReferenceGPT, GPTConfig as ReferenceConfig
    meta = read_meta(folder, step)
    state = torch.load(folder / model_file(step), map_location=device, weights_only=True)
    with torch.device("meta"):
        model = ReferenceGPT(ReferenceConfig(**meta["model_config"]))
    model.to_empty(device=device)
    model.init_weights()  # the rotary tables (buffers, not in the checkpoint), as nanochat's own loader does
    model.load_state_dict(state, strict=True, assign=True)
    return ReferenceEngine(model.eval(), NoSpecialTokens())


def columns(impl: str, engine, prompt, batch: int, **kwargs):
    "Yield once per generation step, when every row has its token (ours yields token by token)."
    if impl == "ours":
        for i, _ in enumerate(engine.stream(prompt, num_samples=batch, **kwargs), 1):
            if i % batch == 0:
                yield
    else:
        for column, _ in engine.generate(prompt, num_samples=batch, **kwargs):
            assert len(column) == batch
            yield


def timed_generation(impl, engine, prompt, batch, tokens, temperature, top_k, seed, device) -> dict:
    "Generate `tokens` tokens for each of `batch` rows; the times of the first and last column from the call."
    from _util import synchronize
    synchronize(device)
    start = time.perf_counter()
    stamps = []
    stream = columns(impl, engine, prompt, batch, max_tokens=tokens, temperature=temperature, top_k=top_k, seed=seed)
    for _ in stream:
        synchronize(device)
        stamps.append(time.perf_counter() - start)
        if len(stamps) == tokens:
            break
    stream.close()
    assert len(stamps) == tokens, f"{impl} yielded {len(stamps)} steps, not {tokens}"
    first, last = stamps[0], stamps[-1]
    return {"ttft_s": first, "decode_tok_s": (tokens - 1) / (last - first) if tokens > 1 else float("nan"),
            "tok_s": batch * tokens / last, "steady_tok_s": batch * (tokens - 1) / (last - first)}


def child(args) -> dict:
    "One depth, both engines in this process, alternating; medians over the repeats."
    from nanochat_nb.common import compute_dtype, nanochat_home
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = compute_dtype(device.type)
    folder = nanochat_home() / "bench" / f"engine_d{args.depth}_v{args.vocab}_s{args.seq}"
    step = save_weights(args, folder)
    engines = {"ours": load_ours(folder, device, dtype)}
    if args.reference:
        engines["reference"] = load_reference(args.reference, folder, step, device, dtype)
    params = sum(p.numel() for p in engines["ours"].model.parameters()) / 1e6
    prompt = torch.randint(0, args.vocab - 16, (args.prompt,), generator=torch.Generator().manual_seed(1)).tolist()
    settings = [("greedy", 1, 0.0, None)] + [("sampled", b, args.temperature, args.top_k) for b in args.batches]

    def measure(impl, kind, batch, temperature, top_k, tokens, seed):
        return timed_generation(impl, engines[impl], prompt, batch, tokens, temperature, top_k, seed, device)

    for impl in engines:  # warm-up: allocator, kernels, the first calls of everything
        for kind, batch, temperature, top_k in settings:
            measure(impl, kind, batch, temperature, top_k, min(4, args.tokens), 0)
    results = {impl: {f"{kind}{batch}": [] for kind, batch, _, _ in settings} for impl in engines}
    for r in range(args.repeat):
        for kind, batch, temperature, top_k in settings:
            for impl in (list(engines) if r % 2 == 0 else list(engines)[::-1]):
                results[impl][f"{kind}{batch}"].append(
                    measure(impl, kind, batch, temperature, top_k, args.tokens, 1000 + r))
    medians = {impl: {key: {m: statistics.median(run[m] for run in runs) for m in runs[0]}
                      for key, runs in by_key.items()} for impl, by_key in results.items()}
    return {"depth": args.depth, "params_m": params, "dtype": str(dtype).removeprefix("torch."),
            "threads": torch.get_num_threads(), "load_after": os.getloadavg()[0], "medians": medians}


def print_depth(r: dict, batches: list[int]) -> list[str]:
    "The table of one depth; returns the targets it misses."
    m, impls = r["medians"], list(r["medians"])
    both = len(impls) == 2
    print(f"\nd{r['depth']} ({r['params_m']:.1f}M parameters, {r['dtype']}, {r['threads']} thread(s); "
          f"load average {r['load_after']:.2f} at the end)")
    print(f"{'':<38}{'ours':>10}" + (f"{'nanochat':>10}{'ours/ref':>10}" if both else ""))
    misses = []

    def row(label, key, metric, scale=1.0, fmt="{:>10.1f}", target=False):
        values = [m[impl][key][metric] * scale for impl in impls]
        line = f"{label:<38}" + "".join(fmt.format(v) for v in values)
        if both:
            ratio = values[0] / values[1]
            line += f"{ratio:>9.2f}x"
            if target and ratio < 1:
                misses.append(f"d{r['depth']} {label.strip()}: {ratio:.2f}x the reference")
        print(line)

    row("time to first token (ms, lower wins)", "greedy1", "ttft_s", 1e3)
    row("decode tok/s, batch 1, greedy", "greedy1", "decode_tok_s", target=True)
    for b in batches:
        row(f"throughput tok/s, {b} sample(s)", f"sampled{b}", "tok_s", target=True)
    lo, hi = f"sampled{min(batches)}", f"sampled{max(batches)}"
    for label, metric in (("end to end", "tok_s"), ("decode steps only", "steady_tok_s")):
        ratios = [m[impl][hi][metric] / m[impl][lo][metric] for impl in impls]
        print(f"{f'batch {max(batches)} / batch {min(batches)}, {label}':<38}" + "".join(f"{x:>9.2f}x" for x in ratios))
    ours_ratio = m["ours"][hi]["tok_s"] / m["ours"][lo]["tok_s"]
    if (min(batches), max(batches)) == (1, 16) and ours_ratio < 8:
        misses.append(f"d{r['depth']} batch 16 / batch 1 throughput {ours_ratio:.2f}x < 8x")
    return misses


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reference", metavar="PATH", help="a nanochat checkout to time side by side")
    parser.add_argument("--depths", default="4,6", help="comma-separated depths")
    parser.add_argument("--vocab", type=int, default=32768)
    parser.add_argument("--seq", type=int, default=512, help="the model's sequence length (context)")
    parser.add_argument("--prompt", type=int, default=256, help="prompt tokens")
    parser.add_argument("--tokens", type=int, default=128, help="new tokens per row")
    parser.add_argument("--batches", default="1,4,16", help="parallel samples from the one prompt")
    parser.add_argument("--temperature", type=float, default=1.0, help="for the parallel samples (decode: 0)")
    parser.add_argument("--top-k", type=int, default=50, help="for the parallel samples")
    parser.add_argument("--repeat", type=int, default=3, help="timed runs per figure (the median is reported)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--depth", type=int, help=argparse.SUPPRESS)  # internal: one depth in a child process
    args = parser.parse_args(argv)
    args.batches = sorted(int(b) for b in args.batches.split(","))
    if args.prompt + args.tokens > args.seq:
        parser.error(f"--prompt + --tokens ({args.prompt + args.tokens}) must fit in --seq ({args.seq}).")
    if args.depth is not None:
        print(json.dumps(child(args)))
        return
    torch.set_num_threads(args.threads)
    print(machine_line(args.device))
    print(f"vocab {args.vocab}, seq {args.seq}, prompt {args.prompt} tokens, {args.tokens} new tokens per row, "
          f"samples at temperature {args.temperature} top-k {args.top_k}, median of {args.repeat} alternating runs"
          + (f", reference {args.reference}" if args.reference else ""))
    misses, failed = [], False
    for depth in (int(d) for d in args.depths.split(",")):
        argv = [__file__, "--depth", depth, "--vocab", args.vocab, "--seq", args.seq, "--prompt", args.prompt,
                "--tokens", args.tokens, "--batches", ",".join(map(str, args.batches)), "--temperature",
                args.temperature, "--top-k", args.top_k, "--repeat", args.repeat, "--threads", args.threads,
                "--device", args.device] + (["--reference", args.reference] if args.reference else [])
        r = run_child(argv)
        if isinstance(r, str):
            print(f"d{depth} failed:\n{r}")
            failed = True
            continue
        misses += print_depth(r, args.batches)
        sys.stdout.flush()
    if not failed:
        print("\ntargets (decode and throughput >= nanochat's at every point; batch 16 >= 8x batch 1): "
              + ("met" if not misses else "missed: " + "; ".join(misses)))
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
