"""Storage behind fsspec URIs: the same behaviour on local paths, file://, memory:// and a real S3 endpoint (moto)."""

from __future__ import annotations

import contextlib
import hashlib
import os
import socket
import stat
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import fsspec
import msgspec
import polars as pl
import pyarrow as pa
import pytest

from k2batch import storage
from tests.s3_server import s3_bucket, s3_endpoint, s3_options  # noqa: F401 (fixtures)


@pytest.fixture(params=["local", "file", "memory", "s3"])
def root(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[str, dict[str, Any]]:
    """(root URI, storage options) of an empty folder on each kind of store."""
    if request.param == "local":
        return str(tmp_path / "root"), {}
    if request.param == "file":
        return f"file://{tmp_path}/root", {}
    if request.param == "memory":
        return f"memory://test-{uuid.uuid4().hex}", {}
    return request.getfixturevalue("s3_bucket") + "/root", request.getfixturevalue("s3_options")


def _all_names(uri: str, options: dict[str, Any]) -> list[str]:
    fs, path = storage.filesystem(uri, options)
    fs.invalidate_cache()
    return sorted(name.rsplit("/", 1)[-1] for name in fs.find(path))


class Manifest(msgspec.Struct):
    shard: int
    rows: dict[str, int]


def test_atomic_writes_read_back_and_leave_no_temporary_keys(root: tuple[str, dict[str, Any]]) -> None:
    uri, options = root
    target = storage.join(uri, "a", "b.bin")
    assert not storage.exists(target, options)
    written = storage.write_bytes_atomic(target, b"first", options)
    assert written.size == 5 and written.uri == target
    storage.write_bytes_atomic(target, b"second", options)  # overwrite in place
    assert storage.read_bytes(target, options) == b"second"
    assert storage.exists(target, options)

    storage.write_json_atomic(storage.join(uri, "m.json"), Manifest(shard=7, rows={"ok": 3}), options)
    assert storage.read_json(storage.join(uri, "m.json"), options, type=Manifest) == Manifest(7, {"ok": 3})
    assert storage.read_json(storage.join(uri, "m.json"), options) == {"rows": {"ok": 3}, "shard": 7}
    assert _all_names(uri, options) == ["b.bin", "m.json"]


def test_list_files_sorted_filtered_with_sizes_times_and_fingerprints(root: tuple[str, dict[str, Any]]) -> None:
    uri, options = root
    table = pa.table({"x": [1, 2, 3]})
    for name in ["b/2.parquet", "a.parquet", "b/1.parquet", "b/notes.txt", "b/.hidden.parquet", "_SUCCESS.parquet"]:
        storage.write_parquet_atomic(storage.join(uri, name), table, options)
    storage.write_parquet_atomic(storage.join(uri, "c.parquet"), pa.table({"x": [4]}), options)

    files = storage.list_files(uri, options)
    expected = [storage.join(uri, name) for name in ["a.parquet", "b/1.parquet", "b/2.parquet", "c.parquet"]]
    assert [file.uri for file in files] == expected == storage.list_uris(uri, options)
    assert all(file.size > 0 and file.mtime > 1.6e9 for file in files)
    # Same bytes, same fingerprint; other bytes, another.
    assert files[0].etag_or_hash == files[1].etag_or_hash != files[3].etag_or_hash
    assert storage.list_files(storage.join(uri, "b", "notes.txt"), options, suffix=".txt")[0].uri.endswith("notes.txt")
    assert [f.uri for f in storage.list_files(expected[0], options)] == [expected[0]]
    assert storage.list_files(storage.join(uri, "missing"), options) == []


def test_children_hashes_and_removal(root: tuple[str, dict[str, Any]]) -> None:
    uri, options = root
    for name in ["a/1.json", "a/2.json", "b.json"]:
        storage.write_bytes_atomic(storage.join(uri, name), name.encode(), options)
    assert storage.child_names(uri, options) == ["a", "b.json"]
    assert storage.child_names(storage.join(uri, "missing"), options) == []
    assert storage.file_sha256(storage.join(uri, "b.json"), options) == hashlib.sha256(b"b.json").hexdigest()
    assert storage.file_sha256(storage.join(uri, "nope.json"), options) is None
    storage.remove(storage.join(uri, "b.json"), options)
    storage.remove(storage.join(uri, "a"), options, recursive=True)
    storage.remove(storage.join(uri, "never"), options, recursive=True)  # nothing there: no error
    assert storage.child_names(uri, options) == []


def test_a_failed_move_leaves_neither_target_nor_temporary(monkeypatch: pytest.MonkeyPatch) -> None:
    uri = f"memory://test-{uuid.uuid4().hex}"

    def broken_move(*args: Any, **kwargs: Any) -> None:
        raise OSError("store went away")

    monkeypatch.setattr(fsspec.implementations.memory.MemoryFileSystem, "mv", broken_move)
    with pytest.raises(OSError, match="store went away"):
        storage.write_bytes_atomic(storage.join(uri, "x.json"), b"{}")
    assert _all_names(uri, {}) == []


def test_join_keeps_the_uri_style() -> None:
    assert storage.join("s3://b/out/", "results", "/shard=00001/") == "s3://b/out/results/shard=00001"
    assert storage.join("/tmp/out", "a.json") == "/tmp/out/a.json"


def test_polars_storage_options_translate_s3fs_names() -> None:
    options = {
        "key": "AK",
        "secret": "SK",
        "token": "TK",
        "endpoint_url": "http://127.0.0.1:9000",
        "client_kwargs": {"region_name": "eu-west-1"},
    }
    assert storage.polars_storage_options("s3://bucket/x", options) == {
        "aws_access_key_id": "AK",
        "aws_secret_access_key": "SK",
        "aws_session_token": "TK",
        "aws_endpoint_url": "http://127.0.0.1:9000",
        "aws_region": "eu-west-1",
        "aws_allow_http": "true",
    }
    assert storage.polars_storage_options(
        "s3://bucket/x", {"client_kwargs": {"endpoint_url": "https://s3.example"}}
    ) == {"aws_endpoint_url": "https://s3.example"}
    assert storage.polars_storage_options("/tmp/x.parquet", options) == {}


def test_polars_scans_parquet_written_to_s3(s3_bucket: str, s3_options: dict[str, Any]) -> None:
    for shard in range(3):
        table = pa.table({"job_id": [f"j{shard}-{i}" for i in range(4)], "tokens": pa.array(range(4), pa.int64())})
        storage.write_parquet_atomic(
            storage.join(s3_bucket, "out", f"shard={shard:05d}", "part-0.parquet"), table, s3_options
        )
    frame = (
        pl.scan_parquet(
            f"{s3_bucket}/out/**/*.parquet",
            hive_partitioning=True,
            storage_options=storage.polars_storage_options(s3_bucket, s3_options),
        )
        .group_by("shard")
        .agg(pl.len(), pl.col("tokens").sum())
        .sort("shard")
        .collect()
    )
    assert frame.to_dicts() == [{"shard": s, "len": 4, "tokens": 6} for s in range(3)]


@contextlib.contextmanager
def writer_after(fifo: Path, seconds: float) -> Iterator[list[bool]]:
    """Should the code under test block opening `fifo`, a writer opens it after `seconds`: the test then fails on
    the returned flag instead of hanging."""
    unblocked: list[bool] = []

    def write() -> None:
        try:
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))  # succeeds only if a reader is waiting
            unblocked.append(True)
        except OSError:
            pass

    timer = threading.Timer(seconds, write)
    timer.start()
    try:
        yield unblocked
    finally:
        timer.cancel()


def special_files(folder: Path) -> list[Path]:
    """A FIFO, a socket, a link to a device and (as root) a device node, each named like a Parquet file."""
    os.mkfifo(folder / "fifo.parquet")
    with socket.socket(socket.AF_UNIX) as unix:
        unix.bind(str(folder / "socket.parquet"))
    os.symlink("/dev/zero", folder / "zero.parquet")
    made = [folder / "fifo.parquet", folder / "socket.parquet", folder / "zero.parquet"]
    if os.geteuid() == 0:
        os.mknod(folder / "null.parquet", 0o600 | stat.S_IFCHR, os.makedev(1, 3))
        made.append(folder / "null.parquet")
    return made


def test_listing_skips_what_is_not_a_regular_file_and_reads_refuse_it(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    storage.write_parquet_atomic(str(tmp_path / "sub" / "a.parquet"), pa.table({"x": [1]}))
    os.symlink(tmp_path / "sub" / "a.parquet", tmp_path / "link.parquet")  # a link to a file is a file
    made = special_files(tmp_path)
    with writer_after(tmp_path / "fifo.parquet", 10.0) as unblocked:
        files = storage.list_files(str(tmp_path))
        for path in made:
            assert storage.list_files(str(path)) == [], path
            with pytest.raises(storage.NotAFileError, match="not a regular file"):
                storage.read_bytes(str(path))
            assert storage.file_sha256(str(path)) is None
    assert not unblocked
    assert [file.uri for file in files] == [str(tmp_path / "link.parquet"), str(tmp_path / "sub" / "a.parquet")]
