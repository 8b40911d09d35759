"""Tokenizer speed: training (ours vs rustbpe directly), batch encoding, and the from-scratch trainer.

    python bench/tokenizer.py [--chars 20000000] [--vocab-size 32768] [--repeats 3] [--threads 2]

Prints three figures:
  1. training a 32K vocabulary on 20M characters of the pretraining shards with `Tokenizer.train`, against
     calling rustbpe directly on the same texts (target: within 10%);
  2. encoding the same characters with `Tokenizer.encode(texts, num_threads=2)` in MB/s of UTF-8
     (target: >= 20 MB/s), with tiktoken's own batch encoder beside it;
  3. the plain-Python trainer (`train_bpe`): vocabulary 1024 on 1 MB of text (target: < 60 s).
"""
import argparse

import rustbpe

from _util import Timing, machine_line, timed
from nanochat_nb.dataset import iter_texts
from nanochat_nb.tokenizer import SPECIAL_TOKENS, SPLIT_PATTERN, Tokenizer, train_bpe


def rustbpe_direct(texts, num_ranks):
    trainer = rustbpe.Tokenizer()
    trainer.train_from_iterator(iter(texts), num_ranks, pattern=SPLIT_PATTERN)
    return trainer


def first_bytes(texts, budget):
    "Whole documents (the last one cut) until `budget` UTF-8 bytes."
    out = []
    for text in texts:
        raw = text.encode("utf-8")
        if len(raw) >= budget:
            out.append(raw[:budget].decode("utf-8", "ignore"))
            break
        out.append(text)
        budget -= len(raw)
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--chars", type=int, default=20_000_000)
    parser.add_argument("--vocab-size", type=int, default=32768)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    print(machine_line())

    texts = list(iter_texts("train", max_chars=args.chars))
    num_bytes = sum(len(t.encode("utf-8")) for t in texts)
    print(f"text: {len(texts):,} documents, {sum(map(len, texts)):,} characters, {num_bytes / 1e6:.1f} MB")

    # 1. training: ours against rustbpe directly, interleaved so that load changes hit both alike
    ours, direct = [], []
    for _ in range(args.repeats):
        direct.append(timed(lambda: rustbpe_direct(texts, args.vocab_size - len(SPECIAL_TOKENS)))[0])
        seconds, tokenizer = timed(lambda: Tokenizer.train(iter(texts), args.vocab_size))
        ours.append(seconds)
    ours, direct = Timing(ours), Timing(direct)
    print(f"[1] train {args.vocab_size:,} vocab on {args.chars / 1e6:g}M chars: Tokenizer.train {ours.best:.2f}s, "
          f"rustbpe directly {direct.best:.2f}s (best of {args.repeats}; medians {ours.median:.2f}s / "
          f"{direct.median:.2f}s): overhead {100 * (ours.best / direct.best - 1):+.1f}%")

    # 2. batch encoding on `threads` threads
    encode_ours, encode_tiktoken = [], []
    for _ in range(args.repeats):
        encode_ours.append(timed(lambda: tokenizer.encode(texts, num_threads=args.threads))[0])
        encode_tiktoken.append(timed(lambda: tokenizer.enc.encode_ordinary_batch(texts, num_threads=args.threads))[0])
    ids = tokenizer.encode(texts, num_threads=args.threads)
    print(f"[2] encode {num_bytes / 1e6:.1f} MB on {args.threads} threads: Tokenizer.encode "
          f"{num_bytes / min(encode_ours) / 1e6:.1f} MB/s, tiktoken encode_ordinary_batch "
          f"{num_bytes / min(encode_tiktoken) / 1e6:.1f} MB/s ({sum(map(len, ids)):,} tokens, "
          f"{num_bytes / sum(map(len, ids)):.2f} bytes/token)")

    # 3. the from-scratch trainer
    megabyte = first_bytes(texts, 1_000_000)
    seconds, ranks = timed(lambda: train_bpe(megabyte, 1024))
    same = ranks == {bytes(k): v for k, v in rustbpe_direct(megabyte, 1024).get_mergeable_ranks()}
    print(f"[3] from-scratch train_bpe: vocab 1024 on 1 MB in {seconds:.1f}s (ranks identical to rustbpe: {same})")


if __name__ == "__main__":
    main()
