"""Chapter 3: best-fit packing invariants on real data, ranks, exact resume (with the background thread)."""
import json
import threading
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from nanochat_nb.common import UserError
from nanochat_nb.dataloader import BestFitLoader, BestFitPacker
from nanochat_nb.dataset import CorruptShardError, list_shards


@pytest.fixture(scope="module")
def shards(data_root):
    return list_shards(data_root / "pretrain")


def texts_of(path, row_groups):
    shard = pq.ParquetFile(path)
    return [t for g in row_groups for t in shard.read_row_group(g, columns=["text"]).column("text").to_pylist()]


def segments(row, bos):
    "A packed row cut at its bos tokens: the pieces of documents it holds."
    starts = np.flatnonzero(row == bos).tolist()
    return [row[a:b] for a, b in zip(starts, starts[1:] + [len(row)])]


def test_packer_invariants_on_real_documents(tokenizer, shards):
    docs = tokenizer.encode(texts_of(shards[0], [0, 1]), prepend="<|bos|>")
    bos, row_len = tokenizer.bos_id, 513
    packer, stream = BestFitPacker(row_len, buffer_size=64), iter(enumerate(docs))
    refill = lambda: next((packer.add(*doc) or True for doc in stream), False)
    rows, placed, used_docs = np.zeros((60, row_len), dtype=np.int64), [], set()
    for row in rows:
        placements = packer.fill_row(row, refill)
        assert row[0] == bos and [p[1] for p in placements] == np.flatnonzero(row == bos).tolist()
        assert sum(p[2] for p in placements) == row_len  # exactly full: no padding
        for k, (doc_id, start, used, cropped) in enumerate(placements):
            assert doc_id not in used_docs  # every document at most once
            used_docs.add(doc_id)
            assert row[start:start + used].tolist() == docs[doc_id][:used]  # its tokens, in order
            assert used + cropped == len(docs[doc_id]) and (cropped == 0 or k == len(placements) - 1)
        placed += placements
    counts = packer.counts
    assert counts["rows"] == 60 and counts["docs"] == len(placed) and counts["tokens"] == 60 * row_len
    assert counts["cropped_tokens"] == sum(p[3] for p in placed) > 0
    assert counts["cropped_docs"] == sum(p[3] > 0 for p in placed)
    assert packer.cropped_fraction == counts["cropped_tokens"] / (counts["tokens"] + counts["cropped_tokens"])


def test_best_fit_takes_the_largest_that_fits_and_crops_the_shortest():
    packer = BestFitPacker(row_len=10, buffer_size=1)
    for doc_id, n in enumerate([7, 3, 12, 2, 4, 6]):
        packer.add(doc_id, [0] + list(range(1, n)))
    rows = np.zeros((3, 10), dtype=np.int64)
    plan = [[(d, u, c) for d, _, u, c in packer.fill_row(row, lambda: False)] for row in rows]
    assert plan == [[(0, 7, 0), (1, 3, 0)], [(5, 6, 0), (4, 4, 0)], [(3, 2, 0), (2, 8, 4)]]
    assert packer.fill_row(rows[0], lambda: False) is None  # out of documents


def test_loader_batches_are_aligned_unpadded_document_prefixes(tokenizer, shards):
    B, T = 4, 256
    loader = BestFitLoader(tokenizer, B, T, shards=shards[:1], buffer_size=32)
    docs = tokenizer.encode(texts_of(shards[0], [0, 1]), prepend="<|bos|>")  # 32 buffered docs: from row group 0
    for step in range(3):
        inputs, targets = next(loader)
        assert inputs.shape == targets.shape == (B, T) and inputs.dtype == targets.dtype == torch.long
        assert torch.equal(inputs[:, 1:], targets[:, :-1]) and (inputs[:, 0] == tokenizer.bos_id).all()
        rows = torch.cat([inputs, targets[:, -1:]], dim=1).numpy()
        for row in rows:
            pieces = segments(row, tokenizer.bos_id)
            for k, piece in enumerate(pieces):  # each piece: a document's first tokens; only the last may be cropped
                matches = [d for d in docs if d[:len(piece)] == piece.tolist()]
                assert matches and (k == len(pieces) - 1 or any(len(d) == len(piece) for d in matches))
    stats = loader.stats
    assert stats["rows"] == 3 * B and stats["tokens"] == 3 * B * (T + 1) and 0 < stats["cropped_fraction"] < 1
    loader.close()


def test_two_ranks_read_disjoint_documents(tokenizer, shards):
    val = shards[-1:]
    own = {r: tokenizer.encode(texts_of(val[0], [r]), prepend="<|bos|>") for r in (0, 1)}  # first row group of each
    for rank in (0, 1):
        loader = BestFitLoader(tokenizer, 4, 512, rank=rank, world_size=2, shards=val, buffer_size=16)
        for _ in range(3):
            inputs, _ = next(loader)
            for piece in (p for row in inputs.numpy() for p in segments(row, tokenizer.bos_id) if len(p) >= 16):
                assert any(d[:len(piece)] == piece.tolist() for d in own[rank])
                assert not any(d[:len(piece)] == piece.tolist() for d in own[1 - rank])
        loader.close()


def test_batches_are_prepared_ahead_in_the_background(tokenizer, shards):
    loader = BestFitLoader(tokenizer, 2, 128, shards=shards[-1:], buffer_size=16, prefetch=3)
    next(loader)
    deadline = time.time() + 20
    while loader._queue.qsize() < 3 and time.time() < deadline:  # nobody asks, yet the next batches get ready
        time.sleep(0.05)
    assert loader._queue.qsize() == 3 and loader._thread.is_alive()
    loader.close()
    assert loader._thread is None


@pytest.fixture(scope="module")
def small_shards(tmp_path_factory, shards):
    "Two small real shards (40 and 24 short documents, row groups of 8), so that epochs go by quickly."
    folder = tmp_path_factory.mktemp("small_shards")
    texts = [t[:1500] for t in texts_of(shards[0], [0])]
    for i, docs in enumerate((texts[:40], texts[40:64])):
        pq.write_table(pa.table({"text": docs}), folder / f"shard_{i:05d}.parquet", row_group_size=8)
    return list_shards(folder)


def test_exact_resume_token_for_token(tokenizer, small_shards):
    def loader(**kw):
        return BestFitLoader(tokenizer, 4, 128, folder=small_shards[0].parent, buffer_size=24, **kw)

    first = loader()
    for _ in range(10):
        next(first)
    saved = json.loads(json.dumps(first.state_dict()))  # plain JSON
    expected = [torch.stack(next(first)) for _ in range(10)]
    assert first.stats["epoch"] >= 1  # the 20 batches crossed an epoch boundary
    resumed = loader()
    resumed.load_state_dict(saved)
    assert all(torch.equal(torch.stack(next(resumed)), e) for e in expected)
    first.load_state_dict(saved)  # rewinding a running loader (its thread ran ahead) works too
    assert all(torch.equal(torch.stack(next(first)), e) for e in expected)
    assert resumed.stats == first.stats
    with pytest.raises(ValueError, match="seq_len=128 but this loader has seq_len=64"):
        BestFitLoader(tokenizer, 4, 64, folder=small_shards[0].parent, buffer_size=24).load_state_dict(saved)
    first.close(), resumed.close()


def test_corrupt_shard_fails_at_construction(tokenizer, shards, tmp_path):
    (tmp_path / "shard_00000.parquet").write_bytes(shards[0].read_bytes()[:200_000])
    (tmp_path / "shard_00001.parquet").write_bytes(shards[6].read_bytes())
    with pytest.raises(CorruptShardError, match=r"shard_00000\.parquet"):
        BestFitLoader(tokenizer, 2, 64, folder=tmp_path)


def test_shard_damaged_mid_file_fails_by_name_from_the_background_thread(tokenizer, shards, tmp_path):
    data = shards[0].read_bytes()
    middle = len(data) // 2  # inside row group 3
    (tmp_path / "shard_00000.parquet").write_bytes(data[:middle] + bytes(4096) + data[middle + 4096:])
    (tmp_path / "shard_00001.parquet").write_bytes(shards[6].read_bytes())
    # rank 3 of 4 reads row group 3 first: the damaged one
    loader = BestFitLoader(tokenizer, 2, 64, folder=tmp_path, rank=3, world_size=4, buffer_size=16)
    raised = []

    def first_batch():
        try:
            next(loader)
        except Exception as error:  # noqa: BLE001
            raised.append(error)
    caller = threading.Thread(target=first_batch, daemon=True)
    caller.start()
    caller.join(timeout=120)
    assert not caller.is_alive(), "next() hung on a damaged shard"
    error, = raised
    assert isinstance(error, CorruptShardError) and isinstance(error, UserError)
    assert "shard_00000.parquet has an unreadable row group 3" in str(error)
    assert loader._thread is None  # the loader stopped its background thread


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_batches_are_on_the_device(tokenizer, shards):
    loader = BestFitLoader(tokenizer, 2, 128, device="cuda", shards=shards[-1:], buffer_size=16)
    inputs, targets = next(loader)
    cpu = BestFitLoader(tokenizer, 2, 128, shards=shards[-1:], buffer_size=16)
    assert inputs.is_cuda and torch.equal(inputs.cpu(), next(cpu)[0])
    loader.close(), cpu.close()
