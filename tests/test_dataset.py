"""Chapter 2: shard listing, verification, rank-strided reading, and downloads from a real HTTP server on 127.0.0.1."""
import http.server
import threading
from collections import Counter

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from conftest import one_line_error, run_python
from nanochat_nb.common import UserError
from nanochat_nb.dataset import (CorruptShardError, RowGroupReader, ShardNotFoundError, download_shards,
                                 ensure_shards, iter_texts, list_shards, main, split_shards, verify_shard)


class ShardServer:
    """Serves copies of the course's shards over HTTP (with Range support), optionally misbehaving.

    mode "ok"; "drop": the first response for each file stops half-way and closes the connection;
    "corrupt": the first response for each file has 4 KB of zeros in the middle. `missing`: names answered 404.
    `requests` records (file name, Range header) of every GET."""

    def __init__(self, shards, mode="ok", missing=()):
        self.files = {p.name: p.read_bytes() for p in shards}
        self.mode, self.missing, self.requests = mode, set(missing), []
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                name = self.path.lstrip("/")
                server.requests.append((name, self.headers.get("Range")))
                if name not in server.files or name in server.missing:
                    self.send_error(404)
                    return
                body, first = server.files[name], sum(n == name for n, _ in server.requests) == 1
                if first and server.mode == "corrupt":
                    middle = len(body) // 2
                    body = body[:middle] + bytes(4096) + body[middle + 4096:]
                start = int(self.headers["Range"].split("=")[1].split("-")[0]) if self.headers.get("Range") else 0
                self.send_response(206 if start else 200)
                if start:
                    self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
                self.send_header("Content-Length", str(len(body) - start))
                self.end_headers()
                payload = body[start:]
                if first and server.mode == "drop":
                    payload = payload[: len(payload) // 2]
                self.wfile.write(payload)

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def gets(self, name):
        return [rng for n, rng in self.requests if n == name]

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def shared_shards(data_root):
    return list_shards(data_root / "pretrain")


@pytest.fixture
def serve(shared_shards):
    servers = []

    def start(mode="ok", missing=()):
        servers.append(ShardServer(shared_shards, mode, missing))
        return servers[-1]
    yield start
    for server in servers:
        server.close()


def fetch(server, folder, n=3, **kw):
    return download_shards(n, folder, base_url=server.url, total_shards=7, backoff=0.01, progress=False,
                           log=lambda msg: None, **kw)


# ---- downloads ---------------------------------------------------------------------------------------------

def test_download_cli_full_then_nothing_again(serve, shared_shards, tmp_path, capsys):
    server = serve()
    args = ["download", "-n", "3", "--base-url", server.url, "--total-shards", "7", "--folder", str(tmp_path),
            "--no-progress"]
    done = run_python("-m", "nanochat_nb.dataset", *args, timeout=120)
    assert done.returncode == 0, done.stderr
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["shard_00000.parquet", "shard_00001.parquet", "shard_00006.parquet"]  # val = the source's last
    for name in names:
        assert (tmp_path / name).read_bytes() == server.files[name]
    assert "train = 2, val = shard_00006.parquet" in done.stdout
    before = len(server.requests)
    main(args)  # the same command again, in process
    assert len(server.requests) == before  # nothing complete is fetched again
    assert "3 of 3 shards already" in capsys.readouterr().out


def test_dropped_connection_resumes_byte_identical(serve, tmp_path):
    server = serve("drop")
    shards = fetch(server, tmp_path)
    for path in shards:
        assert path.read_bytes() == server.files[path.name]
        full, resumed = server.gets(path.name)  # one broken response, then one Range request for the rest
        assert full is None and resumed == f"bytes={len(server.files[path.name]) // 2}-"
    assert not list(tmp_path.glob("*.part"))


def test_partial_file_from_an_earlier_run_is_resumed(serve, tmp_path):
    server = serve()
    good = server.files["shard_00001.parquet"]
    (tmp_path / "shard_00001.parquet.part").write_bytes(good[:1_000_000])
    fetch(server, tmp_path)
    assert server.gets("shard_00001.parquet") == ["bytes=1000000-"]
    assert (tmp_path / "shard_00001.parquet").read_bytes() == good


def test_corrupt_download_is_rejected_and_fetched_again(serve, tmp_path):
    server = serve("corrupt")
    messages = []
    shards = download_shards(2, tmp_path, base_url=server.url, total_shards=7, backoff=0.01, progress=False,
                             log=messages.append)
    for path in shards:
        assert path.read_bytes() == server.files[path.name] and server.gets(path.name) == [None, None]
    assert any("shard_00000.parquet" in m and "corrupt" in m for m in messages)


def test_404_names_the_shard_and_the_others_still_land(serve, tmp_path, capsys):
    server = serve(missing={"shard_00006.parquet"})
    with pytest.raises(ShardNotFoundError, match=r"shard_00006\.parquet.*404"):
        fetch(server, tmp_path)
    assert sorted(p.name for p in tmp_path.glob("shard_*")) == ["shard_00000.parquet", "shard_00001.parquet"]
    assert len(server.gets("shard_00006.parquet")) == 1  # a 404 is not retried
    with pytest.raises(SystemExit) as stop:
        main(["download", "-n", "3", "--base-url", server.url, "--total-shards", "7", "--folder", str(tmp_path),
              "--no-progress"])
    assert stop.value.code == 2 and "shard_00006.parquet is not on the server" in capsys.readouterr().err


def test_corrupt_local_shard_is_reported_and_fetched_again(serve, tmp_path):
    server = serve()
    fetch(server, tmp_path)
    truncated = tmp_path / "shard_00000.parquet"
    truncated.write_bytes(server.files[truncated.name][:-5000])
    server.requests.clear()
    messages = []
    download_shards(3, tmp_path, base_url=server.url, total_shards=7, progress=False, log=messages.append)
    assert [n for n, _ in server.requests] == ["shard_00000.parquet"]  # only the bad one
    assert any(m.startswith("shard_00000.parquet is corrupt") for m in messages)
    assert truncated.read_bytes() == server.files[truncated.name]


def test_ensure_shards_uses_local_shards_then_downloads(serve, shared_shards, tmp_path):
    assert ensure_shards(7, shared_shards[0].parent) == shared_shards  # local mode: no server needed
    server = serve()
    assert [p.name for p in ensure_shards(2, tmp_path, base_url=server.url, total_shards=7, progress=False,
                                          log=lambda m: None)] == ["shard_00000.parquet", "shard_00006.parquet"]


# ---- local mode ----------------------------------------------------------------------------------------------

def test_empty_folder_and_single_shard_errors(shared_shards, tmp_path):
    with pytest.raises(FileNotFoundError, match="No shard_XXXXX.parquet files in .*nanochat-data download"):
        list_shards(tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        list_shards(tmp_path / "nope")
    (tmp_path / "shard_00000.parquet").write_bytes(shared_shards[0].read_bytes())
    (tmp_path / "shard_00001.parquet.part").write_bytes(b"half")  # ignored
    assert list_shards(tmp_path) == [tmp_path / "shard_00000.parquet"]
    with pytest.raises(ValueError, match="Only 1 shard .* validation split"):
        split_shards("train", tmp_path)
    with pytest.raises(ValueError, match="Unknown split"):
        split_shards("test", tmp_path)


def test_corrupt_local_shard_is_rejected_by_name(shared_shards, tmp_path, capsys):
    (tmp_path / "shard_00000.parquet").write_bytes(shared_shards[0].read_bytes())
    (tmp_path / "shard_00001.parquet").write_bytes(shared_shards[1].read_bytes()[:300_000])
    (tmp_path / "shard_00002.parquet").write_bytes(shared_shards[6].read_bytes())
    with pytest.raises(CorruptShardError, match=r"shard_00001\.parquet is not a readable parquet file"):
        list(iter_texts("train", tmp_path))
    with pytest.raises(CorruptShardError, match=r"shard_00001\.parquet"):
        ensure_shards(3, tmp_path)
    with pytest.raises(SystemExit) as stop:
        main(["check", "--folder", str(tmp_path)])
    assert stop.value.code == 2 and "shard_00001.parquet is not a readable parquet file" in capsys.readouterr().err
    no_text = tmp_path / "other.parquet"
    pq.write_table(pq.read_table(shared_shards[0]).rename_columns(["body"]), no_text)
    with pytest.raises(CorruptShardError, match="has no `text` column"):
        verify_shard(no_text)


def damaged_copy(source, dest, offset=None, patch=bytes(4096)):
    "A copy of a real shard with `patch` written over its bytes at `offset` (default: the middle of the file)."
    data = source.read_bytes()
    offset = len(data) // 2 if offset is None else offset
    dest.write_bytes(data[:offset] + patch + data[offset + len(patch):])
    return dest


def test_empty_shard_and_text_that_is_not_strings(shared_shards, tmp_path):
    table = pq.read_table(shared_shards[0])
    empty, numbers = tmp_path / "shard_00000.parquet", tmp_path / "shard_00001.parquet"
    pq.write_table(table.slice(0, 0), empty)
    pq.write_table(pa.table({"text": pc.utf8_length(table["text"])}), numbers)
    with pytest.raises(CorruptShardError, match=r"shard_00000\.parquet holds no documents \(0 rows\)"):
        verify_shard(empty)
    with pytest.raises(CorruptShardError, match=r"shard_00001\.parquet has a `text` column of int32, not of strings"):
        verify_shard(numbers)
    assert issubclass(CorruptShardError, UserError)


def test_shard_damaged_mid_file_fails_by_name_when_read(shared_shards, tmp_path):
    zeros = damaged_copy(shared_shards[0], tmp_path / "shard_00000.parquet")  # the decompressor notices
    bad_utf8 = damaged_copy(shared_shards[0], tmp_path / "shard_00001.parquet", 4_893_407, b"\xff" * 8)  # it does not
    for path, row_group in ((zeros, 3), (bad_utf8, 7)):
        assert verify_shard(path) == 1024  # the quick check reads the footer only
        with pytest.raises(CorruptShardError, match=rf"{path.name} is not a readable parquet file"):
            verify_shard(path, full=True)
        with pytest.raises(CorruptShardError, match=rf"{path.name} has an unreadable row group {row_group} \("):
            list(RowGroupReader([path], loop=False))


def test_check_command_reports_a_damaged_shard_in_one_line(shared_shards, tmp_path):
    damaged_copy(shared_shards[0], tmp_path / "shard_00000.parquet")
    (tmp_path / "shard_00001.parquet").write_bytes(shared_shards[-1].read_bytes())
    done = run_python("-m", "nanochat_nb.dataset", "check", "--full", "--folder", str(tmp_path))
    assert "shard_00000.parquet is not a readable parquet file" in one_line_error(done, "nanochat-data")


# ---- reading ----------------------------------------------------------------------------------------------------

def test_ranks_are_disjoint_and_complete(shared_shards):
    train = shared_shards[:-1]
    everything = Counter((s, g) for s, p in enumerate(train) for g in range(pq.ParquetFile(p).num_row_groups))
    for world in (2, 3):
        seen = Counter((g.shard, g.row_group) for r in range(world) for g in RowGroupReader(train, r, world, loop=False))
        assert seen == everything  # every row group exactly once over the ranks


def test_reader_epochs_and_exact_position(shared_shards):
    reader = RowGroupReader(shared_shards[:2], rank=0, world_size=3)  # 3 row groups per shard for rank 0: 6 a pass
    groups = [next(reader) for _ in range(8)]
    assert [(g.epoch, g.shard, g.row_group) for g in groups[5:]] == [(0, 1, 6), (1, 0, 0), (1, 0, 3)]
    resumed = RowGroupReader(shared_shards[:2], rank=0, world_size=3)
    resumed.load_state_dict(groups[4].state_after)
    assert [next(resumed).texts for _ in range(3)] == [g.texts for g in groups[5:]]
    with pytest.raises(ValueError, match="rank 1 of 3"):
        RowGroupReader(shared_shards[:2], rank=1, world_size=3).load_state_dict(groups[4].state_after)
    with pytest.raises(ValueError, match="gets no row groups"):
        next(RowGroupReader(shared_shards[:1], rank=8, world_size=9))


def test_iter_texts_budget_and_cap(shared_shards):
    texts = list(iter_texts("val", max_chars=50_000, doc_cap=3_000))
    assert sum(map(len, texts)) == 50_000 and max(map(len, texts)) <= 3_000
    first = pq.read_table(shared_shards[-1]).column("text")[0].as_py()
    assert texts[0] == first[:3_000]
