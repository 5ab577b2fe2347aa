"""Object storage behind fsspec URIs (local, file://, memory://, s3://): atomic writes, listing, polars options."""

from __future__ import annotations

import contextlib
import hashlib
import os
import stat
import uuid
from collections.abc import Mapping
from datetime import datetime
from typing import IO, Any, TypeVar

import fsspec
import msgspec
import pyarrow as pa
import pyarrow.parquet as pq
from fsspec import AbstractFileSystem
from fsspec.implementations.local import LocalFileSystem

T = TypeVar("T")
StorageOptions = Mapping[str, Any] | None

# Local and in-memory filesystems take no credentials; the configured options are for object stores.
_LOCAL_PROTOCOLS = frozenset({"file", "local", "memory"})
_S3_PROTOCOLS = frozenset({"s3", "s3a"})


class FileInfo(msgspec.Struct, frozen=True):
    """One listed file: its URI, size in bytes, modification time (Unix seconds) and content fingerprint."""

    uri: str
    size: int
    mtime: float
    etag_or_hash: str
    """The store's ETag where it keeps one (S3), else the MD5 of the bytes."""


class WrittenFile(msgspec.Struct, frozen=True):
    """What an atomic write put where: URI, size and SHA-256 of the bytes."""

    uri: str
    size: int
    sha256: str


def filesystem(uri: str, options: StorageOptions = None) -> tuple[AbstractFileSystem, str]:
    """The filesystem serving `uri` and the path inside it; `options` go to object stores only."""
    protocol = fsspec.utils.get_protocol(uri)
    if protocol in _LOCAL_PROTOCOLS:
        # auto_mkdir: writing a local file creates its folders, as keys on an object store need none.
        kwargs: dict[str, Any] = {"auto_mkdir": True} if protocol != "memory" else {}
    else:
        kwargs = dict(options or {})
    return fsspec.core.url_to_fs(uri, **kwargs)


class NotAFileError(OSError):
    """A local path that is a FIFO, a device, a socket or a link to one: reading it could block or reach
    what is not data."""


def _is_local(fs: AbstractFileSystem) -> bool:
    return isinstance(fs, LocalFileSystem)


def _regular(fs: AbstractFileSystem, path: str, info: Mapping[str, Any]) -> bool:
    """Whether a listed entry is a regular file (a local one after following links)."""
    if not _is_local(fs):
        return info.get("type") == "file"
    try:
        return stat.S_ISREG(os.stat(path).st_mode)
    except OSError:  # a dangling link, or gone since it was listed
        return False


def open_for_reading(uri: str, options: StorageOptions = None) -> IO[bytes]:
    """`uri` opened for binary reads. A local path that is not a regular file is refused (NotAFileError)
    without blocking on it: a FIFO would wait for a writer forever, a device is no input."""
    fs, path = filesystem(uri, options)
    if not _is_local(fs):
        return fs.open(path, "rb")
    if not stat.S_ISREG(os.stat(path).st_mode):  # before opening: opening some devices acts on them
        raise NotAFileError(f"{uri} is not a regular file (a FIFO, device or socket); remove it")
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):  # replaced since the check above
            raise NotAFileError(f"{uri} is not a regular file (a FIFO, device or socket); remove it")
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def join(uri: str, *parts: str) -> str:
    """`uri` with `parts` appended, '/'-separated (URIs are not OS paths)."""
    return "/".join([uri.rstrip("/"), *(part.strip("/") for part in parts)])


def exists(uri: str, options: StorageOptions = None) -> bool:
    fs, path = filesystem(uri, options)
    fs.invalidate_cache(path)  # another process may have written it since this fs listed the folder
    return fs.exists(path)


def remove(uri: str, options: StorageOptions = None, *, recursive: bool = False) -> None:
    """Delete the file at `uri` (with `recursive`, everything under it too); nothing there is no error."""
    fs, path = filesystem(uri, options)
    fs.invalidate_cache(path)
    if fs.exists(path):
        fs.rm(path, recursive=recursive)


def child_names(prefix_uri: str, options: StorageOptions = None) -> list[str]:
    """Names of the files and folders directly under `prefix_uri`, sorted; none when it does not exist."""
    fs, path = filesystem(prefix_uri, options)
    fs.invalidate_cache(path)
    try:
        entries = fs.ls(path, detail=False)
    except FileNotFoundError:
        return []
    return sorted({entry.rstrip("/").rsplit("/", 1)[-1] for entry in entries} - {""})


def file_sha256(uri: str, options: StorageOptions = None) -> str | None:
    """SHA-256 of the file's bytes, read in chunks; None when there is no file (or no regular file)."""
    fs, path = filesystem(uri, options)
    fs.invalidate_cache(path)
    digest = hashlib.sha256()
    try:
        with open_for_reading(uri, options) as handle:
            while chunk := handle.read(1 << 20):
                digest.update(chunk)
    except (FileNotFoundError, NotAFileError):
        return None
    return digest.hexdigest()


def read_bytes(uri: str, options: StorageOptions = None) -> bytes:
    with open_for_reading(uri, options) as handle:
        return handle.read()


def read_json(uri: str, options: StorageOptions = None, *, type: type[T] | None = None) -> Any:
    """Decode a JSON file, into `type` (a msgspec Struct, say) when given."""
    data = read_bytes(uri, options)
    return msgspec.json.decode(data, type=type) if type is not None else msgspec.json.decode(data)


def write_bytes_atomic(uri: str, data: bytes, options: StorageOptions = None) -> WrittenFile:
    """Write `data` to a temporary key beside `uri`, then move it into place, so readers never see a partial file.

    Local moves are renames; object stores copy and delete, which is atomic per key."""
    fs, path = filesystem(uri, options)
    parent, _, name = path.rpartition("/")
    # A dot-name ending in .tmp: listings and `*.parquet` globs skip it.
    temporary = f"{parent}/.{name}.{uuid.uuid4().hex}.tmp"
    try:
        fs.pipe_file(temporary, data)
        fs.mv(temporary, path)
    except BaseException:
        with contextlib.suppress(Exception):  # best effort: the write's own error is the one to report
            fs.rm_file(temporary)
        raise
    return WrittenFile(uri=uri, size=len(data), sha256=hashlib.sha256(data).hexdigest())


def parquet_bytes(table: pa.Table) -> bytes:
    """`table` as Parquet file bytes (zstd)."""
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="zstd")
    return sink.getvalue().to_pybytes()


def write_parquet_atomic(uri: str, table: pa.Table, options: StorageOptions = None) -> WrittenFile:
    return write_bytes_atomic(uri, parquet_bytes(table), options)


def write_json_atomic(uri: str, value: Any, options: StorageOptions = None) -> WrittenFile:
    """Write any msgspec-encodable value as indented JSON with sorted keys (stable bytes for stable hashes)."""
    data = msgspec.json.format(msgspec.json.encode(value, order="sorted"), indent=2) + b"\n"
    return write_bytes_atomic(uri, data, options)


def _find(prefix_uri: str, options: StorageOptions, suffix: str) -> list[tuple[str, str, dict[str, Any]]]:
    """(URI, path, info) of the files list_files lists, sorted by URI."""
    fs, path = filesystem(prefix_uri, options)
    fs.invalidate_cache(path)
    if not fs.exists(path):
        return []
    top = fs.info(path)
    entries = {path: top} if top["type"] != "directory" else fs.find(path, withdirs=False, detail=True)
    found = []
    for name, info in entries.items():
        base = name.rsplit("/", 1)[-1]
        if not base.endswith(suffix) or base.startswith((".", "_")) or not _regular(fs, name, info):
            continue
        found.append((join(prefix_uri, name[len(path) :]) if name != path else prefix_uri, name, info))
    return sorted(found, key=lambda entry: entry[0])


def list_files(prefix_uri: str, options: StorageOptions = None, *, suffix: str = ".parquet") -> list[FileInfo]:
    """Files under `prefix_uri` (recursively; or the file itself) whose names end in `suffix`, sorted by URI.

    Hidden names ('.', '_': temporary keys, _SUCCESS markers) are skipped, and so is anything that is not a
    regular file (a FIFO, device or socket; links are followed). URIs are `prefix_uri` joined
    with the path below it, so they compare equal to URIs built with `join` from the same root."""
    return [
        FileInfo(uri=uri, size=int(info["size"]), mtime=_mtime(info), etag_or_hash=_fingerprint(uri, info, options))
        for uri, _, info in _find(prefix_uri, options, suffix)
    ]


def list_uris(prefix_uri: str, options: StorageOptions = None, *, suffix: str = ".parquet") -> list[str]:
    """The URIs list_files lists, without reading the files for their fingerprints."""
    return [uri for uri, _, _ in _find(prefix_uri, options, suffix)]


def _mtime(info: Mapping[str, Any]) -> float:
    # Each fsspec implementation names the modification time differently.
    for key in ("mtime", "LastModified", "last_modified", "created"):
        value = info.get(key)
        if isinstance(value, datetime):
            return value.timestamp()
        if isinstance(value, int | float):
            return float(value)
    return 0.0


def _fingerprint(uri: str, info: Mapping[str, Any], options: StorageOptions) -> str:
    etag = info.get("ETag") or info.get("etag")
    if etag:
        return str(etag).strip('"')
    digest = hashlib.md5(usedforsecurity=False)
    with open_for_reading(uri, options) as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def polars_storage_options(uri: str, options: StorageOptions = None) -> dict[str, str]:
    """The s3fs-style `options` under polars' (object_store) names, for `pl.scan_parquet(uri, storage_options=...)`.

    Values polars does not get here (credentials left out of `options`) it reads from the AWS_* environment,
    as s3fs does."""
    if fsspec.utils.get_protocol(uri) not in _S3_PROTOCOLS:
        return {}
    options = dict(options or {})
    client_kwargs = dict(options.get("client_kwargs") or {})
    translated = {
        "aws_access_key_id": options.get("key"),
        "aws_secret_access_key": options.get("secret"),
        "aws_session_token": options.get("token"),
        "aws_endpoint_url": options.get("endpoint_url") or client_kwargs.get("endpoint_url"),
        "aws_region": options.get("region_name") or client_kwargs.get("region_name"),
    }
    result = {name: str(value) for name, value in translated.items() if value}
    if result.get("aws_endpoint_url", "").startswith("http://"):
        result["aws_allow_http"] = "true"
    if options.get("anon"):
        result["aws_skip_signature"] = "true"
    return result
