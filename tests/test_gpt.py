"""The GPT: KV cache == full forward, SDPA == naive attention, gradients, parameter counts, nanochat checkpoints."""
import json
import math

import pytest
import torch
import torch.nn.functional as F

from nanochat_nb import checkpoint
from nanochat_nb.gpt import GPT, GPTConfig, KVCache, load_model_state, sdpa_attention, window_mask, window_sizes

TINY = dict(vocab_size=512, n_layer=4, n_head=4, n_kv_head=2, n_embd=64)


pytestmark = pytest.mark.usefixtures("one_thread")   # tiny problems: one thread is fastest


def tiny_model(seed=0, **overrides) -> GPT:
    "A small model whose zero-initialised weights are made non-zero, so that every path carries signal."
    torch.manual_seed(seed)
    model = GPT(GPTConfig(**{"sequence_len": 64, **TINY, **overrides})).init_weights()
    with torch.no_grad():
        for block in model.transformer.h:
            block.attn.c_proj.weight.normal_(std=0.05)
            block.mlp.c_proj.weight.normal_(std=0.05)
        model.smear_lambda.fill_(0.3)
        model.lm_head.weight.normal_(std=0.05)
    return model


@pytest.mark.parametrize("window_pattern,sequence_len,prompt_lens", [
    ("L", 64, [1, 7, 40]),
    ("SSSL", 1024, [1, 150, 290]),   # short window 256 < 300 tokens: the window really slides
    ("SL", 1024, [255, 256, 299]),
])
def test_kv_cache_decode_matches_full_forward(window_pattern, sequence_len, prompt_lens):
    model = tiny_model(window_pattern=window_pattern, sequence_len=sequence_len).eval()
    total = 300 if sequence_len > 64 else 60
    idx = torch.randint(0, 512, (2, total), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = model(idx)
        for prompt_len in prompt_lens:
            cache = KVCache(model, batch_size=2, max_len=total)
            steps = [model(idx[:, :prompt_len], kv_cache=cache)]
            steps += [model(idx[:, t:t + 1], kv_cache=cache) for t in range(prompt_len, total)]
            torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=2e-5, rtol=1e-4)


def test_kv_cache_with_tiny_windows_and_chunked_prefill():
    model = tiny_model().eval()
    model.window_sizes = [1, 4, 9, 63]
    idx = torch.randint(0, 512, (1, 40), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full = model(idx)
        cache = KVCache(model, max_len=40)
        pieces = [model(idx[:, a:b], kv_cache=cache) for a, b in [(0, 5), (5, 6), (6, 20), (20, 21), (21, 40)]]
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, atol=2e-5, rtol=1e-4)


def test_kv_cache_refuses_to_overflow():
    model = tiny_model()
    cache = KVCache(model, max_len=8)
    with pytest.raises(ValueError, match="KV cache is full"):
        model(torch.zeros(1, 9, dtype=torch.long), kv_cache=cache)


def naive_attention(q, k, v, window: int) -> torch.Tensor:
    "The reference for `sdpa_attention`: softmax(q kᵀ / √D + window mask) v, written out."
    q_len, k_len = q.size(2), k.size(2)
    if q.size(1) != k.size(1):
        repeat = q.size(1) // k.size(1)
        k, v = k.repeat_interleave(repeat, dim=1), v.repeat_interleave(repeat, dim=1)
    scores = (q.float() @ k.float().transpose(-2, -1)) / math.sqrt(q.size(-1))
    scores = scores.masked_fill(~window_mask(q_len, k_len, window, q.device), float("-inf"))
    return (scores.softmax(-1) @ v.float()).to(q.dtype)


@pytest.mark.parametrize("q_len,k_len,window,heads,kv_heads", [
    (16, 16, 100, 4, 4), (16, 16, 15, 4, 4), (16, 16, 3, 4, 2), (6, 16, 4, 4, 4), (1, 16, 5, 4, 1), (1, 16, 64, 2, 2),
    (128, 128, 32, 2, 2), (96, 96, 32, 4, 2), (512, 512, 128, 2, 2),  # the last three: blocks of w queries
])
def test_sdpa_matches_naive_attention(q_len, k_len, window, heads, kv_heads):
    g = torch.Generator().manual_seed(q_len * 1000 + window)
    q = torch.randn(2, heads, q_len, 16, generator=g)
    k, v = torch.randn(2, kv_heads, k_len, 16, generator=g), torch.randn(2, kv_heads, k_len, 16, generator=g)
    torch.testing.assert_close(sdpa_attention(q, k, v, window), naive_attention(q, k, v, window), atol=1e-5, rtol=1e-4)


def test_block_window_attention_gradients_match_naive():
    g = torch.Generator().manual_seed(7)
    q, k, v = (torch.randn(2, 2, 256, 16, generator=g).requires_grad_() for _ in range(3))
    out = torch.randn(2, 2, 256, 16, generator=g)
    grads = torch.autograd.grad((sdpa_attention(q, k, v, 64) * out).sum(), (q, k, v))
    expected = torch.autograd.grad((naive_attention(q, k, v, 64) * out).sum(), (q, k, v))
    for a, b in zip(grads, expected):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_window_sizes_follow_the_pattern():
    assert window_sizes(2048, 6, "SSSL") == [512, 512, 512, 2048, 512, 2048]
    assert window_sizes(512, 4, "SSSL") == [128, 128, 128, 512]
    assert window_sizes(100, 3, "S") == [128, 128, 100]
    with pytest.raises(ValueError, match="window_pattern"):
        window_sizes(512, 4, "SXL")


def test_gradients_reach_every_parameter_and_match_plain_loss():
    model = tiny_model()
    idx = torch.randint(0, 512, (2, 64), generator=torch.Generator().manual_seed(3))
    targets = idx.roll(-1, 1)
    targets[:, -5:] = -1
    loss = model(idx, targets=targets)
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, f"no gradient reaches {name}"
    fused_grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad()
    reference = F.cross_entropy(model(idx).flatten(0, 1), targets.flatten(), ignore_index=-1)
    reference.backward()
    torch.testing.assert_close(loss, reference, atol=1e-5, rtol=1e-5)
    for name, p in model.named_parameters():
        torch.testing.assert_close(fused_grads[name], p.grad, atol=1e-5, rtol=1e-3, msg=f"gradient of {name}")


def test_untrained_loss_is_ln_vocab_on_real_text(tokenizer, data_root):
    import pyarrow.parquet as pq
    text = " ".join(pq.read_table(data_root / "pretrain" / "shard_00001.parquet", columns=["text"])
                    .column("text").to_pylist()[:20])
    ids = torch.tensor(tokenizer.encode(text, prepend="<|bos|>")[:4 * 129]).view(4, 129)
    torch.manual_seed(0)
    model = GPT(GPTConfig.from_depth(2, vocab_size=tokenizer.vocab_size, sequence_len=128, head_dim=64)).init_weights()
    loss = model(ids[:, :-1], targets=ids[:, 1:])
    assert abs(loss.item() - math.log(tokenizer.vocab_size)) < 0.02


def test_param_counts_match_spec():
    with torch.device("meta"):
        d4 = GPT(GPTConfig.from_depth(4))
        d12 = GPT(GPTConfig.from_depth(12))
    c4 = d4.param_counts()
    assert (d4.config.n_embd, d4.config.n_head) == (256, 2)
    assert {k: round(v / 1e6, 1) for k, v in c4.items() if k != "scalars"} == {
        "wte": 8.4, "value_embeds": 16.8, "lm_head": 8.4, "transformer_matrices": 3.1, "total": 36.7}
    assert c4["scalars"] == 4 + 4 + 24 + 1 + 1
    assert d4.num_scaling_params() == c4["transformer_matrices"] + c4["lm_head"]
    c12 = d12.param_counts()
    assert (d12.config.n_embd, d12.config.n_head) == (768, 6)
    assert c12["lm_head"] == c12["wte"] == 32768 * 768 and c12["value_embeds"] == 6 * 32768 * 768
    assert c12["transformer_matrices"] == 12 * 12 * 768**2 + 6 * 12 * 6
    assert round(12 * d12.num_scaling_params() / 1e9, 2) == 1.32  # SPEC: D_ref = 12 N(d12) ≈ 1.32B tokens
    attention = sum(12 * 6 * 128 * w for w in window_sizes(2048, 12))
    assert d12.estimate_flops() == 6 * (c12["transformer_matrices"] + c12["lm_head"] + 24) + attention


def test_state_dict_names_and_shapes_are_nanochats():
    with torch.device("meta"):
        model = GPT(GPTConfig.from_depth(4, sequence_len=512))
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    expected = {"transformer.wte.weight": (32768, 256), "lm_head.weight": (32768, 256), "resid_lambdas": (4,),
                "x0_lambdas": (4,), "smear_lambda": (1,), "backout_lambda": (1,), "smear_gate.weight": (1, 24)}
    for i in range(4):
        for name in ("c_q", "c_k", "c_v", "c_proj"):
            expected[f"transformer.h.{i}.attn.{name}.weight"] = (256, 256)
        expected[f"transformer.h.{i}.mlp.c_fc.weight"] = (1024, 256)
        expected[f"transformer.h.{i}.mlp.c_proj.weight"] = (256, 1024)
    for i in (1, 3):  # layer i has a value embedding when i % 2 == (L - 1) % 2
        expected[f"transformer.h.{i}.attn.ve_gate.weight"] = (2, 12)
        expected[f"value_embeds.{i}.weight"] = (32768, 256)
    assert shapes == expected


def test_loading_a_mismatching_state_dict_names_the_first_bad_tensor():
    model = tiny_model()
    state = model.state_dict()
    bad = dict(state)
    bad["transformer.h.2.mlp.c_fc.weight"] = torch.zeros(10, 64)
    with pytest.raises(ValueError, match=r"'transformer\.h\.2\.mlp\.c_fc\.weight' has shape \(10, 64\)"):
        load_model_state(tiny_model(), bad)
    missing = {k: v for k, v in state.items() if k != "lm_head.weight"}
    with pytest.raises(ValueError, match="no tensor 'lm_head.weight'"):
        load_model_state(tiny_model(), missing)
    with pytest.raises(ValueError, match=r"'resid_lambdas' has shape \(4,\), the model expects \(6,\)"):
        load_model_state(tiny_model(n_layer=6), state)
    extra = {**state, "transformer.h.4.mlp.c_fc.weight": torch.zeros(256, 64)}
    with pytest.raises(ValueError, match=r"unexpected tensor 'transformer\.h\.4\.mlp\.c_fc\.weight'"):
        load_model_state(tiny_model(), extra)
    before = tiny_model().state_dict()
    target = tiny_model()
    with pytest.raises(ValueError):
        load_model_state(target, bad)
    assert all(torch.equal(before[k], v) for k, v in target.state_dict().items()), "a failed load changed the model"


def test_nanochat_checkpoint_round_trip(tmp_path):
    "Write a checkpoint the way nanochat does (torch.compile prefixes, bf16 embeddings, its meta keys) and load it."
    model = tiny_model(seed=5, window_pattern="SSL").eval()
    state = {f"_orig_mod.{k}": (v.bfloat16() if "wte" in k or "value_embeds" in k else v.clone())
             for k, v in model.state_dict().items()}
    folder = tmp_path / "base_checkpoints" / "d4"
    folder.mkdir(parents=True)
    for step in (100, 250):
        torch.save(state, folder / f"model_{step:06d}.pt")
        meta = {"step": step, "val_bpb": 1.23, "model_config": {**vars(model.config), "n_kv_head": 2},
                "user_config": {"depth": 4}, "device_batch_size": 8, "max_seq_len": 64}
        (folder / f"meta_{step:06d}.json").write_text(json.dumps(meta))
    loaded, meta = checkpoint.load_model(folder)
    assert meta["step"] == 250 and loaded.config == model.config
    assert all(p.dtype == torch.float32 for p in loaded.parameters())
    with torch.no_grad():  # the original model with the same bf16-rounded embeddings gives the same logits
        model.transformer.wte.weight.copy_(model.transformer.wte.weight.bfloat16().float())
        for table in model.value_embeds.values():
            table.weight.copy_(table.weight.bfloat16().float())
    idx = torch.randint(0, 512, (2, 30))
    with torch.no_grad():
        torch.testing.assert_close(loaded(idx), model(idx))
    assert checkpoint.load_model(folder, step=100)[1]["step"] == 100
    with pytest.raises(checkpoint.CheckpointError, match=r"No checkpoint for step 7 .*it has steps 100, 250"):
        checkpoint.load_model(folder, step=7)
    with pytest.raises(checkpoint.CheckpointError, match="does not exist"):
        checkpoint.load_model(tmp_path / "nowhere")
    # our own writer produces nanochat's files plus sizes and hashes, and the loaded model trains
    checkpoint.save(tmp_path / "ours", 3, loaded, meta={"val_bpb": 2.0})
    again, meta = checkpoint.load_model(tmp_path / "ours", 3)
    assert meta["val_bpb"] == 2.0 and set(json.loads((tmp_path / "ours" / "meta_000003.json").read_text())) >= {
        "step", "model_config", "files"}
    again.train()
    again(idx, targets=idx).backward()
    assert again.lm_head.weight.grad is not None


def test_generate_is_reproducible_and_uses_the_cache():
    model = tiny_model().eval()
    greedy = list(model.generate([1, 2, 3], max_tokens=10, temperature=0))
    assert len(greedy) == 10 and greedy == list(model.generate([1, 2, 3], max_tokens=10, temperature=0))
    # greedy decoding with the cache equals greedy decoding by full forward passes
    ids = [1, 2, 3]
    with torch.no_grad():
        for _ in range(10):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    assert ids[3:] == greedy
    sampled = list(model.generate([1], max_tokens=12, temperature=1.0, top_k=5, seed=7))
    assert sampled == list(model.generate([1], max_tokens=12, temperature=1.0, top_k=5, seed=7))
    with pytest.raises(ValueError, match="at least one prompt token"):
        list(model.generate([], max_tokens=3))


def test_from_depth_follows_the_depth_dial():
    for depth, dim in [(2, 128), (4, 256), (6, 384), (12, 768), (20, 1280), (24, 1536)]:
        c = GPTConfig.from_depth(depth)
        assert (c.n_embd, c.n_head, c.n_kv_head, c.n_layer) == (dim, dim // 128, dim // 128, depth)
    assert GPTConfig.from_depth(3).n_embd == 256  # 3 * 64 = 192, rounded up to a multiple of 128
    with pytest.raises(ValueError, match="depth"):
        GPTConfig.from_depth(0)


def test_explicit_compute_dtype_without_autocast():
    model = tiny_model()
    bf16 = GPT(model.config, compute_dtype=torch.bfloat16)
    bf16.load_state_dict(model.state_dict())
    assert all(p.dtype == torch.float32 for p in bf16.parameters()) and bf16.cos.dtype == torch.bfloat16
    idx = torch.randint(0, 512, (1, 32))
    with torch.no_grad():
        logits = bf16(idx)
        assert logits.dtype == torch.float32
        assert (logits - model(idx)).abs().max() < 0.1
    loss = bf16(idx, targets=idx)
    loss.backward()
    assert bf16.lm_head.weight.grad.dtype == torch.float32


def test_decoding_head_equals_the_head_and_follows_weight_updates():
    "next_logits through the CPU decoding layouts gives the plain head's logits, for 1 or many rows, never stale."
    model = tiny_model().eval()
    torch.nn.init.normal_(model.lm_head.weight, std=0.5)
    idx = torch.randint(0, model.config.vocab_size, (16, 9))
    plain = lambda rows: softcap_free_logits(model, idx[:rows])
    with torch.no_grad():
        for rows in (1, 3, 16):
            torch.testing.assert_close(model.next_logits(idx[:rows]), plain(rows), atol=1e-5, rtol=1e-5)
        model.lm_head.weight.mul_(-2)  # an in-place update, as an optimizer step makes
        for rows in (1, 16):
            torch.testing.assert_close(model.next_logits(idx[:rows]), plain(rows), atol=1e-5, rtol=1e-5)
    logits = model.next_logits(idx[:2])  # with gradients on: the plain head, differentiable
    logits.sum().backward()
    assert model.lm_head.weight.grad is not None


def softcap_free_logits(model, idx):
    return torch.nn.functional.linear(model.hidden_states(idx)[:, -1], model.lm_head.weight)[:, :model.config.vocab_size]
