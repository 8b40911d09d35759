"""The engine: the cache against full forwards, samples and batches against one-at-a-time, the tool machine
and its sandbox, and bad requests."""
import time

import pytest
import torch

from nanochat_nb.common import UserError
from nanochat_nb.engine import Calculator, Engine, generate_uncached
from nanochat_nb.fused_head import softcap_logits
from nanochat_nb.gpt import GPT, GPTConfig, KVCache, sample_next

HOSTILE = ["import os", "open('/etc/passwd').read()", "__import__('os').system('true')", "().__class__.__bases__",
           "[i for i in iter(int, 1)]", "'a'*10**10", "9**9**9", "'abc'.encode('idna')", "(lambda: 1)()",
           "'{0.__class__}'.format(1)"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tokenizer(byte_tokenizer):
    return byte_tokenizer


@pytest.fixture(scope="module")
def calculator():
    calc = Calculator()
    yield calc
    calc.restart()


def lively_model(tokenizer, n_head=4, n_kv_head=2, windows=None, seed=0, sequence_len=96):
    "A random GPT whose every part matters (nonzero projections, smear) and whose logits are decisive."
    torch.manual_seed(seed)
    model = GPT(GPTConfig(sequence_len=sequence_len, vocab_size=tokenizer.vocab_size, n_layer=len(windows or "xxx"),
                          n_head=n_head, n_kv_head=n_kv_head, n_embd=16 * n_head)).init_weights()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("c_proj.weight"):
                torch.nn.init.uniform_(p, -0.1, 0.1)
        torch.nn.init.normal_(model.lm_head.weight, std=0.3)
        model.smear_lambda.fill_(0.5)
    if windows:
        model.window_sizes = list(windows)
    return model.eval()


def prompt_of(n, offset=0):
    return [(offset + 37 * i) % 256 for i in range(n)]


@pytest.mark.parametrize("n_kv_head,windows", [(4, None), (2, (3, 7, 96)), (1, (5, 2, 11, 96))],
                         ids=["mha-full", "gqa-windows", "mqa-tiny-windows"])
def test_greedy_cache_equals_full_forwards(tokenizer, calculator, n_kv_head, windows):
    model = lively_model(tokenizer, n_kv_head=n_kv_head, windows=windows)
    engine = Engine(model, tokenizer, calculator)
    for length in (1, 6, 23):
        prompt = prompt_of(length)
        got = [t.id for t in engine.stream(prompt, max_tokens=16, temperature=0)]
        reference = generate_uncached(model, prompt, 16)
        assert got == reference[:len(got)], (length, got, reference)
        assert len(got) == 16 or got[-1] in engine.stop_ids
        assert list(model.generate(prompt, 16, temperature=0))[:len(got)] == got  # the model's own loop agrees


def test_parallel_samples_equal_separate_generations(tokenizer, calculator):
    model = lively_model(tokenizer, windows=(4, 9, 96))
    engine = Engine(model, tokenizer, calculator)
    prompt = prompt_of(12)
    settings = dict(max_tokens=14, temperature=1.0, top_k=40)
    rows, masks = engine.generate_batch(prompt, num_samples=4, seed=10, **settings)
    assert len({tuple(r) for r in rows}) > 1, "four samples at temperature 1 should not all agree"
    for j, row in enumerate(rows):
        alone, _ = engine.generate_batch(prompt, num_samples=1, seed=10 + j, **settings)
        assert alone[0] == row
        assert masks[j] == [1] * len(row)


def test_batched_prompts_equal_one_at_a_time(tokenizer, calculator):
    model = lively_model(tokenizer, windows=(3, 8, 96))
    engine = Engine(model, tokenizer, calculator)
    prompts = [prompt_of(n, offset=n) for n in (2, 9, 20)]
    for settings in (dict(temperature=0), dict(temperature=0.9, top_k=30, seed=3)):
        streamed = [[] for _ in range(6)]
        for token in engine.stream(prompts, num_samples=2, max_tokens=12, **settings):
            streamed[token.row].append(token.id)
        for i, prompt in enumerate(prompts):
            for j in range(2):
                seed = settings.get("seed", 42) + j
                alone = [t.id for t in engine.stream(prompt, max_tokens=12, **{**settings, "seed": seed})]
                assert streamed[2 * i + j] == alone, (i, j, settings)


def test_seeds_reproduce(tokenizer, calculator):
    engine = Engine(lively_model(tokenizer), tokenizer, calculator)
    run = lambda seed: engine.generate_batch(prompt_of(5), num_samples=3, max_tokens=20, temperature=1.0, seed=seed)[0]
    assert run(1) == run(1)
    assert run(1) != run(2)


def test_stops_and_limits(tokenizer, calculator):
    model = lively_model(tokenizer)
    engine = Engine(model, tokenizer, calculator)
    for stop in ("<|assistant_end|>", "<|bos|>"):
        tokens = list(engine.stream(prompt_of(4), max_tokens=10, force=[tokenizer.id_of(stop)]))
        assert [(t.id, t.sampled) for t in tokens] == [(tokenizer.id_of(stop), False)]
    assert len(list(engine.stream(prompt_of(4), max_tokens=3, force=[65] * 10))) == 3
    near_full = prompt_of(model.config.sequence_len - 2)  # two positions left in the context
    assert len(list(engine.stream(near_full, max_tokens=10, force=[65] * 10))) == 2


def test_cache_dtype_and_windows():
    model = GPT(GPTConfig(sequence_len=64, vocab_size=300, n_layer=2, n_head=2, n_kv_head=1, n_embd=32),
                compute_dtype=torch.bfloat16)
    model.window_sizes = [7, 64]
    cache = KVCache(model, batch_size=3, max_len=40)
    assert cache.lengths == [8, 40] and all(t.dtype == torch.bfloat16 for t in cache.k + cache.v)
    assert cache.k[0].shape == (3, 8, 1, 16)


def test_tool_call_is_evaluated_and_forced(tokenizer, calculator):
    engine = Engine(lively_model(tokenizer), tokenizer, calculator)
    call = tokenizer.encode("<|python_start|>12*7<|python_end|>", allowed_special="all")
    output = tokenizer.encode("<|output_start|>84<|output_end|>", allowed_special="all")
    rows, masks = engine.generate_batch(prompt_of(5), num_samples=2, max_tokens=len(call) + len(output) + 5,
                                        temperature=0, force=call)
    for row, mask in zip(rows, masks):
        n = len(call) + len(output)
        assert row[:n] == call + output and mask[:n] == [0] * n
        assert mask[n:] and all(mask[n:]), "the model samples again after the tool's output"


@pytest.mark.parametrize("expr", HOSTILE)
def test_hostile_expressions_give_errors_and_generation_continues(tokenizer, calculator, expr):
    engine = Engine(lively_model(tokenizer, seed=1, sequence_len=256), tokenizer, calculator)
    call = [tokenizer.id_of("<|python_start|>"), *tokenizer.encode(expr), tokenizer.id_of("<|python_end|>")]
    start = time.perf_counter()
    rows, masks = engine.generate_batch(prompt_of(3), max_tokens=len(call) + 140, temperature=1.0, force=call)
    assert time.perf_counter() - start < 3
    text = tokenizer.decode(rows[0][len(call):])
    assert text.startswith("<|output_start|>Error: ") and "<|output_end|>" in text, text
    assert 1 in masks[0], "generation goes on after the error"
    assert calculator("12*7") == "84"


def test_calculator_worker_is_reused_and_replaced(calculator):
    assert calculator("'strawberry'.count('r')") == "3" and calculator("7/2") == "3.5"
    worker = calculator._proc
    assert calculator("2+2") == "4" and calculator._proc is worker
    start = time.perf_counter()
    assert calculator("9**9**9").startswith("Error: timed out")
    assert time.perf_counter() - start < 2
    assert calculator("2+3") == "5" and calculator._proc is not worker
    calculator._proc.kill()
    calculator._proc.wait()
    assert calculator("3+3") == "6"
    assert calculator("'abc'.encode('idna')").startswith("Error: OSError")  # the worker cannot open files
    assert calculator("'a'*10**10") == "Error: out of memory"
    assert calculator("1+" * 600 + "1").startswith("Error: expression longer than")


@pytest.mark.parametrize("request_", [dict(prompt=[]), dict(prompt=[1, 2], max_tokens=0),
                                      dict(prompt=[1, 2], temperature=-0.5), dict(prompt=[1, 2], top_k=-1),
                                      dict(prompt=[1, 2], num_samples=0), dict(prompt=[[1, 2], []]),
                                      dict(prompt=[5] * 96), dict(prompt=[10**6])])
def test_bad_requests_raise_one_sentence(tokenizer, calculator, request_):
    engine = Engine(lively_model(tokenizer), tokenizer, calculator)
    with pytest.raises(UserError) as error:
        engine.stream(**request_)
    assert str(error.value).count(". ") == 0 and str(error.value).endswith(".")


def test_sampling_follows_the_softmax_over_the_top_k():
    "Frequencies of many draws match softmax(logits / T) restricted to the top k (within 5 standard errors)."
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0, 5.0]])
    generator = torch.Generator().manual_seed(0)
    for temperature, top_k in ((1.0, None), (0.5, 3), (2.0, 2)):
        draws = torch.cat([sample_next(logits, temperature, top_k, [generator]) for _ in range(4000)])
        kept = logits[0] if top_k is None else logits[0].masked_fill(logits[0] < logits[0].topk(top_k).values[-1],
                                                                     float("-inf"))
        expected = torch.softmax(kept / temperature, dim=-1)
        observed = torch.bincount(draws, minlength=5).float() / len(draws)
        tolerance = 5 * (expected * (1 - expected) / len(draws)).sqrt() + 1e-9
        assert ((observed - expected).abs() <= tolerance).all(), (temperature, top_k, observed, expected)


def test_softcap_after_the_top_k_draws_the_same_tokens():
    "Squashing only the k kept raw logits (what the engine does) draws what squashing all V logits first would."
    raw = torch.randn(6, 500, generator=torch.Generator().manual_seed(3)) * 10
    generators = lambda: [torch.Generator().manual_seed(row) for row in range(6)]
    for temperature, top_k in ((1.0, 50), (0.7, None), (1.3, 5), (0.0, None)):
        for _ in range(20):
            late = sample_next(raw, temperature, top_k, generators(), softcap=15.0)
            early = sample_next(softcap_logits(raw, 15.0), temperature, top_k, generators())
            assert torch.equal(late, early), (temperature, top_k)
            raw = raw.roll(7, dims=1)
