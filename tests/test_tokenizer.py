"""The tokenizer: scratch and fast trainers agree, round trips, special tokens, chat masks, save/load, CLIs."""
import json
import random
import sys
from pathlib import Path

import pytest
import torch

from conftest import one_line_error, run_python
from nanochat_nb.common import UserError
from nanochat_nb.dataset import iter_texts
from nanochat_nb.tokenizer import (EVAL_SAMPLES, META_FILE, RANKS_FILE, SPECIAL_TOKENS, TOKEN_BYTES_FILE,
                                   ConversationError, Tokenizer, bpe_encode, load_token_bytes, load_tokenizer,
                                   TokenizerError, train_bpe, train_ranks_fast)

NASTY = [
    "Emoji: 😀😀😀 🎉🎉 👍🏽👍🏽 👨‍👩‍👧 family 🦊🦊",
    "Digits 1234567890 3.14159 2026-11-21 1,000,000 007 ٣٤٥ ४५६",
    "Whitespace   runs\t\t\tand\n\n\n  \r\n\r\n    indented\u00a0\u2003\u3000 x  \x0b\x0c end   ",
    "Русский текст, Ελληνικά, עברית, العربية, 日本語のテキスト, 한국어 문장, हिन्दी",
    "Contractions: don't WE'LL they're I'M you've SHE'D it's",
    "Control chars \x1c\x1d\x1e\x1f and zero\u200bwidth and combining e\u0301",
]


@pytest.fixture(scope="module")
def mixed_text(data_root):
    "Real Wikipedia text (40 documents, cut to 3,000 characters) with the nasty strings mixed in."
    rng = random.Random(0)
    texts = list(iter_texts("train", max_chars=120_000, doc_cap=3_000))[-40:]
    return texts + [rng.choice(NASTY) * rng.randint(1, 4) for _ in range(150)]


@pytest.mark.parametrize("vocab_size", [257, 300, 700, 1500])
def test_scratch_and_fast_trainers_give_identical_ranks(mixed_text, vocab_size):
    scratch = train_bpe(mixed_text, vocab_size)
    fast = train_ranks_fast(mixed_text, vocab_size)
    assert len(scratch) == vocab_size
    assert scratch == fast


def test_trainers_agree_on_half_a_megabyte_of_validation_text():
    texts = list(iter_texts("val", max_chars=500_000))
    assert train_bpe(texts, 2048) == train_ranks_fast(texts, 2048)


def test_trainers_agree_on_ties_and_early_stop():
    for texts in (["cdab"], ["xy cd"], ["aaaaaaa"], ["a b c d"], NASTY[:1]):
        assert train_bpe(texts, 400) == train_ranks_fast(texts, 400)  # tiny texts: many ties, stops early
    assert train_bpe(["cdab"], 257)[b"ab"] == 256  # ties go to the smallest pair, not the first seen


def test_fast_encoder_matches_python_reference(tokenizer):
    for text in NASTY + [EVAL_SAMPLES["code"], EVAL_SAMPLES["non-English"]]:
        assert tokenizer.encode(text) == bpe_encode(text, tokenizer.ranks)


def test_round_trip_text_and_batches(tokenizer):
    docs = list(iter_texts("val", max_chars=300_000))
    batch = tokenizer.encode(docs, num_threads=2)
    assert batch == [tokenizer.encode(d) for d in docs]
    assert [tokenizer.decode(ids) for ids in batch] == docs
    for text in NASTY:
        assert tokenizer.decode(tokenizer.encode(text)) == text


def test_round_trip_arbitrary_bytes(tokenizer):
    rng = random.Random(1)
    real = next(iter_texts("val", max_chars=5_000)).encode("utf-8")
    samples = [bytes(rng.randrange(256) for _ in range(2_000)),
               real[:1000] + b"\xff\xfe\xc3" + real[1000:2000] + b"\xe2\x82" + real[2000:3000] + b"\xf0\x9f",
               real[1:501],  # starts in the middle of whatever
               b"\x80" * 7, b"", "é".encode()[:1]]
    for data in samples:
        assert tokenizer.decode_bytes(tokenizer.encode_bytes(data)) == data
        text = data.decode("utf-8", "surrogateescape")  # how a file with invalid UTF-8 reads with that handler
        ids = tokenizer.encode(text)
        assert tokenizer.decode_bytes(ids) == data
        assert tokenizer.decode(ids, errors="surrogateescape") == text
        assert not set(ids) & set(tokenizer.special_ids.values())


def test_special_tokens_only_when_allowed(tokenizer):
    spelled = "Text that spells " + " and ".join(SPECIAL_TOKENS) + "."
    specials = set(tokenizer.special_ids.values())
    assert not set(tokenizer.encode(spelled)) & specials
    assert not set(tokenizer.encode([spelled, spelled])[1]) & specials
    assert tokenizer.decode(tokenizer.encode(spelled)) == spelled
    only_bos = tokenizer.encode(spelled, allowed_special={"<|bos|>"})
    assert set(only_bos) & specials == {tokenizer.bos_id}
    assert set(tokenizer.encode(spelled, allowed_special="all")) & specials == specials
    with pytest.raises(ValueError, match="Unknown special"):
        tokenizer.encode(spelled, allowed_special={"<|eos|>"})
    ids = tokenizer.encode("hello", prepend="<|bos|>", append=tokenizer.id_of("<|assistant_end|>"))
    assert ids == [tokenizer.bos_id, *tokenizer.encode("hello"), tokenizer.vocab_size - 5]
    assert tokenizer.id_of("<|bos|>") == tokenizer.bos_id == tokenizer.vocab_size - len(SPECIAL_TOKENS)
    with pytest.raises(KeyError, match="not a special token"):
        tokenizer.id_of("<|eos|>")
    with pytest.raises(ValueError, match="prepend/append"):
        tokenizer.encode("x", prepend=10**6)
    with pytest.raises(ValueError, match="not in this tokenizer's vocabulary"):
        tokenizer.decode([tokenizer.vocab_size])
    with pytest.raises(TypeError, match="integer token ids"):
        tokenizer.decode([1.5])
    ids = tokenizer.encode("tensors decode too")
    assert tokenizer.decode(torch.tensor(ids)) == tokenizer.decode(torch.tensor(ids).numpy()) == "tensors decode too"


def test_render_conversation_worked_example(tokenizer):
    t = tokenizer
    conversation = {"messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is 7 * 6?"},
        {"role": "assistant", "content": [{"type": "text", "text": "Computing: "},
                                          {"type": "python", "text": "7 * 6"},
                                          {"type": "python_output", "text": "42"},
                                          {"type": "text", "text": "It is 42."}]},
        {"role": "user", "content": "Thanks"},
        {"role": "assistant", "content": "Bye."},
    ]}
    expected = [(t.bos_id, 0), (t.id_of("<|user_start|>"), 0)]
    expected += [(i, 0) for i in t.encode("Be brief.\n\nWhat is 7 * 6?")]
    expected += [(t.id_of("<|user_end|>"), 0), (t.id_of("<|assistant_start|>"), 0)]
    expected += [(i, 1) for i in t.encode("Computing: ")]
    expected += [(t.id_of("<|python_start|>"), 1), *[(i, 1) for i in t.encode("7 * 6")], (t.id_of("<|python_end|>"), 1)]
    expected += [(t.id_of("<|output_start|>"), 0), *[(i, 0) for i in t.encode("42")], (t.id_of("<|output_end|>"), 0)]
    expected += [(i, 1) for i in t.encode("It is 42.")] + [(t.id_of("<|assistant_end|>"), 1)]
    expected += [(t.id_of("<|user_start|>"), 0), *[(i, 0) for i in t.encode("Thanks")], (t.id_of("<|user_end|>"), 0)]
    expected += [(t.id_of("<|assistant_start|>"), 0), *[(i, 1) for i in t.encode("Bye.")], (t.id_of("<|assistant_end|>"), 1)]
    ids, mask = t.render_conversation(conversation)
    assert list(zip(ids, mask)) == expected
    assert t.render_conversation(conversation["messages"]) == (ids, mask)  # a bare list works too
    short_ids, short_mask = t.render_conversation(conversation, max_tokens=10)
    assert (short_ids, short_mask) == (ids[:10], mask[:10])
    prompt = t.render_for_completion(conversation)  # drops the final assistant answer
    assert prompt == ids[:len(ids) - len(t.encode("Bye.")) - 1]
    assert prompt[-1] == t.id_of("<|assistant_start|>")
    assert t.render_for_completion(conversation["messages"][:-1]) == prompt  # ends with the user: same prompt


def test_render_real_sft_conversation(tokenizer, data_root):
    path = data_root / "chat" / "sft" / "identity_conversations.jsonl"
    conversation = json.loads(path.read_text().splitlines()[0])
    ids, mask = tokenizer.render_conversation(conversation, max_tokens=100_000)
    assert len(ids) == len(mask) and set(mask) == {0, 1}
    trained = tokenizer.decode([i for i, m in zip(ids, mask) if m])
    answers = [m["content"] for m in conversation if m["role"] == "assistant"]
    assert trained == "".join(a + "<|assistant_end|>" for a in answers)


@pytest.mark.parametrize("conversation, message", [
    ([], "non-empty list"),
    ({"messages": "hi"}, "non-empty list"),
    ([{"role": "assistant", "content": "hi"}], "should be from 'user'"),
    ([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], "Message 1 is from 'user'"),
    ([{"role": "user", "content": "a"}, {"role": "bot", "content": "b"}], "unknown role 'bot'"),
    ([{"role": "user", "content": "   "}], "empty"),
    ([{"role": "user", "content": "a"}, {"role": "assistant", "content": []}], "non-empty"),
    ([{"role": "user", "content": "a"}, {"role": "assistant", "content": [{"type": "sql", "text": "x"}]}], "part 0"),
    ([{"role": "user", "content": "a"}, {"role": "assistant", "content": [{"type": "text", "text": ""}]}], "empty"),
    ([{"role": "user", "content": ["a"]}], "must be a string"),
    ([{"role": "system", "content": "s"}], "followed by a user"),
    ([{"role": "user", "content": "a"}, {"role": "system", "content": "s"}], "should be from 'assistant'"),
    (["hello"], "must be a dict"),
])
def test_malformed_conversations(tokenizer, conversation, message):
    with pytest.raises(ConversationError, match=message):
        tokenizer.render_conversation(conversation)


def test_save_load_round_trip(tokenizer):
    folder = tokenizer.folder
    assert sorted(p.name for p in folder.iterdir()) == sorted([META_FILE, RANKS_FILE, TOKEN_BYTES_FILE])
    loaded = Tokenizer.load(folder)
    assert loaded.ranks == tokenizer.ranks and loaded.special_ids == tokenizer.special_ids
    assert loaded.vocab_size == tokenizer.vocab_size == 2048
    text = EVAL_SAMPLES["news"]
    assert loaded.encode(text) == tokenizer.encode(text)
    assert load_tokenizer(folder).ranks == tokenizer.ranks
    assert torch.equal(load_token_bytes(folder), tokenizer.token_bytes())


def _copy(src, dst):
    dst.mkdir()
    for p in src.iterdir():
        (dst / p.name).write_bytes(p.read_bytes())
    return dst


def test_load_errors(tokenizer, tmp_path, monkeypatch):
    monkeypatch.setenv("NANOCHAT_HOME", str(tmp_path / "home"))
    with pytest.raises(FileNotFoundError, match="nanochat-tok-train"):
        load_tokenizer()
    with pytest.raises(FileNotFoundError, match="No tokenizer folder"):
        Tokenizer.load(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="holds no saved tokenizer"):
        Tokenizer.load(tmp_path / "empty")
    foreign = tmp_path / "nanochat"
    foreign.mkdir()
    (foreign / "tokenizer.pkl").write_bytes(b"\x80\x04not really")
    with pytest.raises(FileNotFoundError, match="nanochat's pickled format"):
        Tokenizer.load(foreign)

    truncated = _copy(tokenizer.folder, tmp_path / "truncated")
    ranks = (truncated / RANKS_FILE).read_bytes()
    (truncated / RANKS_FILE).write_bytes(ranks[: len(ranks) // 2])
    with pytest.raises(ValueError, match="truncated or was modified"):
        Tokenizer.load(truncated)
    assert (truncated / RANKS_FILE).read_bytes() == ranks[: len(ranks) // 2]  # a failed load changes nothing

    no_ranks = _copy(tokenizer.folder, tmp_path / "no_ranks")
    (no_ranks / RANKS_FILE).unlink()
    with pytest.raises(FileNotFoundError, match="incomplete"):
        Tokenizer.load(no_ranks)

    bad_json = _copy(tokenizer.folder, tmp_path / "bad_json")
    (bad_json / META_FILE).write_text('{"format": "nanochat-nb-tok')
    with pytest.raises(ValueError, match="not valid JSON"):
        Tokenizer.load(bad_json)

    other = _copy(tokenizer.folder, tmp_path / "other")
    (other / META_FILE).write_text(json.dumps({"model_type": "BPE", "vocab": {}}))
    with pytest.raises(ValueError, match="not a nanochat-nb tokenizer"):
        Tokenizer.load(other)


def test_train_errors():
    with pytest.raises(ValueError, match="at least 265"):
        Tokenizer.train(iter(["some text"]), 264)
    with pytest.raises(ValueError, match="only has enough distinct pairs"):
        Tokenizer.train(iter(["tiny text"]), 1000)
    with pytest.raises(TypeError, match="not a str"):
        Tokenizer.train(iter(["ok", b"bytes"]), 300)


def test_token_bytes(tokenizer):
    lengths = tokenizer.token_bytes()
    assert lengths.dtype == torch.int32 and lengths.shape == (tokenizer.vocab_size,)
    assert lengths[tokenizer.bos_id:].tolist() == [0] * len(SPECIAL_TOKENS)
    assert lengths[:256].tolist() == [1] * 256 and lengths[256:tokenizer.bos_id].min() >= 2
    docs = list(iter_texts("val", max_chars=200_000)) + NASTY
    for doc, ids in zip(docs, tokenizer.encode(docs, prepend="<|bos|>", append="<|assistant_end|>")):
        assert lengths[ids].sum().item() == len(tokenizer.decode(ids[1:-1]).encode("utf-8")) == len(doc.encode("utf-8"))
    assert torch.equal(torch.load(tokenizer.folder / TOKEN_BYTES_FILE, weights_only=True), lengths)


def test_cli_train_and_eval(tmp_path):
    out = tmp_path / "tok"
    done = run_python("-m", "nanochat_nb.tokenizer", "train", "--preset", "tiny", "--max-chars", "300000",
                      "--output", str(out), "--no-progress", timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "bytes/token" in done.stdout and "trained in" in done.stdout
    tok = Tokenizer.load(out)
    assert tok.vocab_size == 2048  # from the tiny preset

    script = Path(sys.executable).parent / "nanochat-tok-eval"  # the console script (exit status 0 on success)
    done = run_python(str(script), "--tokenizer", str(out), "--eval-chars", "100000",
                      env={"NANOCHAT_TIKTOKEN_DIR": str(tmp_path / "none"), "TIKTOKEN_CACHE_DIR": str(tmp_path / "none")})
    assert done.returncode == 0 and not done.stderr.strip(), done.stderr[-3000:]
    for kind in ["train", "val", *EVAL_SAMPLES]:
        assert kind in done.stdout
    assert "gpt2: not compared" in done.stdout and "gpt4: not compared" in done.stdout

    # a reference file in the folder named by --reference-dir is picked up (here: our own ranks, as gpt2)
    refs = tmp_path / "refs"
    refs.mkdir()
    (refs / "gpt2.tiktoken").write_bytes((out / RANKS_FILE).read_bytes())
    done = run_python("-m", "nanochat_nb.tokenizer", "eval", "--tokenizer", str(out), "--eval-chars", "100000",
                      "--reference-dir", str(refs), env={"TIKTOKEN_CACHE_DIR": str(tmp_path / "none")})
    assert done.returncode == 0, done.stderr[-3000:]
    assert "gpt2: 2,039 tokens" in done.stdout and "vs gpt2" in done.stdout


def test_cli_errors(tokenizer, tmp_path):
    done = run_python("-m", "nanochat_nb.tokenizer", "eval", "--tokenizer", str(tmp_path / "nope"))
    assert "No tokenizer folder" in one_line_error(done, "nanochat-tok-eval")
    (tmp_path / "file").write_text("not a folder")
    done = run_python("-m", "nanochat_nb.tokenizer", "train", "--preset", "tiny", "--output", str(tmp_path / "file"))
    assert "is a file, not a folder" in one_line_error(done, "nanochat-tok-train")
    assert (tmp_path / "file").read_text() == "not a folder"
    done = run_python("-m", "nanochat_nb.tokenizer", "frobnicate")
    assert "'frobnicate' is not a command: use {train,eval}" in one_line_error(done, "python -m nanochat_nb.tokenizer")
    done = run_python("-m", "nanochat_nb.tokenizer", "train", "--vocab-size", "0", "--output", str(tmp_path / "x"))
    assert "--vocab-size must be positive" in one_line_error(done, "nanochat-tok-train")
    truncated = _copy(tokenizer.folder, tmp_path / "truncated")
    (truncated / RANKS_FILE).write_bytes((truncated / RANKS_FILE).read_bytes()[:5000])
    done = run_python("-m", "nanochat_nb.tokenizer", "eval", "--tokenizer", str(truncated))
    assert "truncated or was modified" in one_line_error(done, "nanochat-tok-eval")
    assert issubclass(TokenizerError, UserError) and issubclass(TokenizerError, ValueError)
