"""Shards of a batch: planning over input Parquet files, reading a shard's rows, output layout, manifests, resume."""

from __future__ import annotations

import hashlib
import logging
import re
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import msgspec
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from k2batch.records import (
    DUPLICATE_COLUMN,
    RESERVED_COLUMNS,
    RESULT_SCHEMA,
    ROW_COLUMN,
    SOURCE_COLUMN,
    TRACE_SCHEMA,
)
from k2batch.storage import (
    FileInfo,
    NotAFileError,
    StorageOptions,
    WrittenFile,
    child_names,
    file_sha256,
    join,
    list_files,
    list_uris,
    open_for_reading,
    read_json,
    remove,
    write_json_atomic,
    write_parquet_atomic,
)

log = logging.getLogger(__name__)

# Rows decoded at once when planning checks an input: bounds memory to a batch, not a file.
_DECODE_BATCH_ROWS = 8192


class InputError(Exception):
    """An input cannot be used as it is; the message names the file and says what is wrong."""


class Slice(msgspec.Struct, frozen=True):
    """Rows [row_start, row_stop) of one input file, whose content fingerprint was `etag` when planned."""

    uri: str
    etag: str
    row_start: int
    row_stop: int


class Duplicate(msgspec.Struct, frozen=True):
    """A row whose job_id already occurred earlier in the batch, at `first` ("file row N")."""

    uri: str
    row: int
    first: str


class Shard(msgspec.Struct, frozen=True, kw_only=True):
    """A unit of work: consecutive input rows, self-contained so any machine can run it."""

    index: int
    slices: tuple[Slice, ...]
    duplicates: tuple[Duplicate, ...]
    schema: bytes
    """The batch's unified input schema (Arrow IPC): every shard reads its rows into it, so every
    shard's results have the same pass-through columns."""
    input_hash: str
    """Hash of the slices (with file fingerprints), duplicates and schema: what the shard's outputs derive from."""

    @property
    def num_rows(self) -> int:
        return sum(part.row_stop - part.row_start for part in self.slices)

    def arrow_schema(self) -> pa.Schema:
        return pa.ipc.read_schema(pa.py_buffer(self.schema))


class ShardPlan(msgspec.Struct, frozen=True, kw_only=True):
    """Shards over all input files, in file-key order; the same inputs always give the same plan."""

    shards: tuple[Shard, ...]
    files: tuple[FileInfo, ...]
    empty_files: tuple[str, ...]
    """Files with no rows (zero bytes, or a Parquet file of zero rows): reported, skipped."""
    rows_per_shard: int
    num_rows: int


class ShardManifest(msgspec.Struct, frozen=True, kw_only=True):
    """Written last and atomically for a shard: its presence marks the shard complete."""

    shard: int
    input_hash: str
    config_hash: str
    attempt: int
    inputs: tuple[Slice, ...]
    rows_in: int
    started_at: float
    """Unix seconds."""
    timings: dict[str, float] = {}
    """Seconds per phase, as the runner names them."""
    rows_out: int = 0
    rows_by_status: dict[str, int] = {}
    spans: int = 0
    results: WrittenFile | None = None
    traces: WrittenFile | None = None
    finished_at: float | None = None


@contextmanager
def _parquet(uri: str, options: StorageOptions) -> Iterator[pq.ParquetFile]:
    """An input file opened as Parquet; any Arrow or I/O failure while using it becomes an InputError naming it."""
    try:
        with open_for_reading(uri, options) as handle:
            yield pq.ParquetFile(handle)
    except (pa.ArrowException, OSError) as exc:
        raise InputError(f"{uri}: not a readable Parquet file ({exc}); replace or remove it") from exc


def _job_ids(column: pa.ChunkedArray) -> pa.ChunkedArray | None:
    """job_id values as text for duplicate detection; None when the column is not text (every row is invalid then)."""
    kind = column.type.value_type if pa.types.is_dictionary(column.type) else column.type
    if pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_string_view(kind):
        return column.cast(pa.large_string())
    if pa.types.is_binary(kind) or pa.types.is_large_binary(kind) or pa.types.is_binary_view(kind):
        raw = column.cast(pa.large_binary()).to_pylist()
        # Undecodable ids are invalid rows anyway; replacement keeps them from matching real ids.
        return pa.chunked_array(
            [pa.array([None if v is None else v.decode("utf-8", "replace") for v in raw], pa.large_string())]
        )
    return None


def _inspect(file: FileInfo, options: StorageOptions) -> tuple[int, pa.Schema, pa.ChunkedArray | None]:
    """Row count, schema and job_ids of one input file, which is decoded in full here, a batch of rows at a
    time: a damaged page in any column fails planning, before any shard writes outputs."""
    if file.size == 0:  # a file created but never written: no rows, rather than a corrupt file
        return 0, pa.schema([]), None
    with _parquet(file.uri, options) as parquet:
        schema = parquet.schema_arrow.remove_metadata()
        reserved = sorted(set(schema.names) & set(RESERVED_COLUMNS))
        if reserved:
            raise InputError(f"{file.uri}: columns {', '.join(reserved)} are reserved for k2batch; rename them")
        id_chunks, decoded = [], 0
        for batch in parquet.iter_batches(batch_size=_DECODE_BATCH_ROWS):
            decoded += batch.num_rows
            if "job_id" in schema.names:
                id_chunks.append(batch.column("job_id"))
        if decoded != parquet.metadata.num_rows:
            raise InputError(
                f"{file.uri}: {decoded:,} of the {parquet.metadata.num_rows:,} rows its footer lists decode; replace it"
            )
        ids = _job_ids(pa.chunked_array(id_chunks, schema.field("job_id").type)) if id_chunks else None
        return parquet.metadata.num_rows, schema, ids


def _unify(schemas: dict[str, pa.Schema]) -> pa.Schema:
    try:
        return pa.unify_schemas(list(schemas.values()), promote_options="permissive")
    except (pa.ArrowTypeError, pa.ArrowInvalid) as exc:
        types: dict[str, dict[str, str]] = {}
        for uri, schema in schemas.items():
            for field in schema:
                types.setdefault(field.name, {}).setdefault(str(field.type), uri)
        conflicts = "; ".join(
            f"column '{name}' is " + ", ".join(f"{kind} in {uri}" for kind, uri in by_type.items())
            for name, by_type in types.items()
            if len(by_type) > 1
        )
        raise InputError(f"input files disagree on column types: {conflicts or exc}; make them agree") from exc


def _duplicates(ids: dict[str, pa.ChunkedArray]) -> list[tuple[str, int, str, int]]:
    """(uri, row, first uri, first row) of every job_id occurrence after the first, over all files in order."""
    uris = list(ids)
    if not uris:
        return []
    frames = [
        pl.DataFrame({"job_id": pl.from_arrow(column)}).with_row_index("row").with_columns(file=pl.lit(k))
        for k, column in enumerate(ids.values())
    ]
    repeated = (
        pl.concat(frames)
        .filter(pl.col("job_id").is_not_null() & (pl.col("job_id") != ""))
        .with_columns(
            first_file=pl.col("file").first().over("job_id"),
            first_row=pl.col("row").first().over("job_id"),
        )
        .filter((pl.col("file") != pl.col("first_file")) | (pl.col("row") != pl.col("first_row")))
    )
    return [
        (uris[f], r, uris[ff], fr)
        for f, r, ff, fr in repeated.select("file", "row", "first_file", "first_row").iter_rows()
    ]


def plan_shards(input_uris: str | Sequence[str], rows_per_shard: int, options: StorageOptions = None) -> ShardPlan:
    """Cut the rows of every Parquet file under `input_uris` (files or prefixes) into shards of `rows_per_shard`.

    Every file is opened here, so a corrupt one raises InputError before anything is written. Shards
    run over file boundaries; files are taken in URI order."""
    if rows_per_shard < 1:
        raise ValueError(f"rows_per_shard is {rows_per_shard}, expected at least 1")
    files: dict[str, FileInfo] = {}
    for uri in [input_uris] if isinstance(input_uris, str) else input_uris:
        found = list_files(uri, options)
        if not found:
            raise InputError(f"{uri}: no Parquet files there")
        files.update((file.uri, file) for file in found)
    listed = [files[uri] for uri in sorted(files)]

    counts: dict[str, int] = {}
    schemas: dict[str, pa.Schema] = {}
    ids: dict[str, pa.ChunkedArray] = {}
    empty: list[str] = []
    for file in listed:
        num_rows, schema, job_ids = _inspect(file, options)
        if num_rows == 0:
            log.warning("input %s has no rows; skipping it", file.uri)
            empty.append(file.uri)
            continue
        counts[file.uri], schemas[file.uri] = num_rows, schema
        if job_ids is not None:
            ids[file.uri] = job_ids
    schema_bytes = _unify(schemas).serialize().to_pybytes() if schemas else b""

    # Rows are numbered across files in order, so shard k holds global rows [k*n, (k+1)*n).
    offsets, total = {}, 0
    for uri, num_rows in counts.items():
        offsets[uri], total = total, total + num_rows
    duplicates: dict[int, list[Duplicate]] = {}
    for uri, row, first_uri, first_row in _duplicates(ids):
        index = (offsets[uri] + row) // rows_per_shard
        duplicates.setdefault(index, []).append(Duplicate(uri=uri, row=row, first=f"{first_uri} row {first_row}"))

    shards = []
    for index, start in enumerate(range(0, total, rows_per_shard)):
        stop = min(start + rows_per_shard, total)
        slices = tuple(
            Slice(uri, files[uri].etag_or_hash, max(start, offset) - offset, min(stop, offset + counts[uri]) - offset)
            for uri, offset in offsets.items()
            if offset < stop and offset + counts[uri] > start
        )
        dups = tuple(duplicates.get(index, ()))
        digest = hashlib.sha256(msgspec.msgpack.encode((slices, dups))).digest()
        input_hash = hashlib.sha256(digest + schema_bytes).hexdigest()
        shards.append(Shard(index=index, slices=slices, duplicates=dups, schema=schema_bytes, input_hash=input_hash))
    return ShardPlan(
        shards=tuple(shards),
        files=tuple(listed),
        empty_files=tuple(empty),
        rows_per_shard=rows_per_shard,
        num_rows=total,
    )


def _read_slice(part: Slice, schema: pa.Schema, options: StorageOptions) -> pa.Table:
    with _parquet(part.uri, options) as parquet:
        # Read only the row groups that overlap the slice.
        groups, first_row, row = [], None, 0
        for group in range(parquet.metadata.num_row_groups):
            size = parquet.metadata.row_group(group).num_rows
            if row < part.row_stop and row + size > part.row_start:
                groups.append(group)
                first_row = row if first_row is None else first_row
            row += size
        table = parquet.read_row_groups(groups).slice(part.row_start - (first_row or 0), part.row_stop - part.row_start)
    if table.num_rows != part.row_stop - part.row_start:
        raise InputError(f"{part.uri}: has fewer rows than when the batch was planned; plan again")
    columns = [
        (
            table.column(field.name).cast(field.type)
            if field.name in table.column_names
            else pa.nulls(table.num_rows, field.type)
        )
        for field in schema
    ]
    return pa.Table.from_arrays(columns, schema=schema)


def read_shard_rows(shard: Shard, options: StorageOptions = None) -> pa.Table:
    """The shard's input rows in the batch schema, plus `_source` (file URI), `_row` (row in that file) and
    `_duplicate_of` (where an earlier row holds the same job_id), for records.validate_jobs."""
    schema = shard.arrow_schema()
    first = {(dup.uri, dup.row): dup.first for dup in shard.duplicates}
    tables = []
    for part in shard.slices:
        table = _read_slice(part, schema, options)
        rows = range(part.row_start, part.row_stop)
        table = table.append_column(SOURCE_COLUMN, pa.array([part.uri] * len(rows), pa.string()))
        table = table.append_column(ROW_COLUMN, pa.array(rows, pa.int64()))
        table = table.append_column(DUPLICATE_COLUMN, pa.array([first.get((part.uri, r)) for r in rows], pa.string()))
        tables.append(table)
    return pa.concat_tables(tables)


def shard_name(index: int) -> str:
    """Hive-style partition name, so polars reads `shard` back from the path too."""
    return f"shard={index:05d}"


_SHARD_NAME = re.compile(r"shard=(\d+)(?:\.json)?")


def results_uri(output_uri: str, index: int) -> str:
    return join(output_uri, "results", shard_name(index), "part-0.parquet")


def traces_uri(output_uri: str, index: int) -> str:
    return join(output_uri, "traces", shard_name(index), "part-0.parquet")


def manifest_uri(output_uri: str, index: int) -> str:
    return join(output_uri, "manifests", f"{shard_name(index)}.json")


def summary_uri(output_uri: str) -> str:
    return join(output_uri, "summary.json")


def attempts_uri(output_uri: str, index: int) -> str:
    return join(output_uri, "attempts", shard_name(index))


def remove_stale_shards(output_uri: str, plan: ShardPlan, options: StorageOptions = None) -> list[int]:
    """Delete the outputs of shards `plan` does not have (an input rewritten with fewer rows leaves them behind),
    so summaries and the reader glob count only this plan's shards; returns their indexes.

    Each stale shard loses its manifest first: a reader never sees a complete-looking shard with files missing."""
    planned = {shard.index for shard in plan.shards}
    found = {
        int(match.group(1))
        for kind in ("manifests", "results", "traces", "attempts")
        for name in child_names(join(output_uri, kind), options)
        if (match := _SHARD_NAME.fullmatch(name))
    }
    stale = sorted(found - planned)
    for index in stale:
        remove(manifest_uri(output_uri, index), options)
        for kind in ("results", "traces", "attempts"):
            remove(join(output_uri, kind, shard_name(index)), options, recursive=True)
        log.info("removed the outputs of shard %d under %s: the plan has no such shard now", index, output_uri)
    return stale


class AttemptMarker(msgspec.Struct, frozen=True, kw_only=True):
    """Written when an attempt at a shard starts, so the next start knows how many came before it."""

    shard: int
    input_hash: str
    config_hash: str
    attempt: int
    started_at: float


def start_attempt(
    output_uri: str, shard: Shard, config_hash: str, options: StorageOptions = None, *, attempt: int | None = None
) -> int:
    """Mark an attempt at `shard` as started and return its number: `attempt` when the caller counts its own
    tries (an orchestrator's retries), else one more than the markers of earlier attempts at the same inputs
    and config, crashed ones included (a count in memory would restart at 1 after a kill)."""
    prefix = attempts_uri(output_uri, shard.index)
    if attempt is None:
        earlier = [read_json(uri, options, type=AttemptMarker) for uri in list_uris(prefix, options, suffix=".json")]
        attempt = 1 + sum(m.input_hash == shard.input_hash and m.config_hash == config_hash for m in earlier)
    marker = AttemptMarker(
        shard=shard.index, input_hash=shard.input_hash, config_hash=config_hash, attempt=attempt, started_at=time.time()
    )
    write_json_atomic(join(prefix, f"{time.time_ns()}.json"), marker, options)
    return attempt


def new_manifest(shard: Shard, config_hash: str, attempt: int = 1) -> ShardManifest:
    """The manifest of a shard attempt starting now; write_shard_outputs fills in what was written."""
    return ShardManifest(
        shard=shard.index,
        input_hash=shard.input_hash,
        config_hash=config_hash,
        attempt=attempt,
        inputs=shard.slices,
        rows_in=shard.num_rows,
        started_at=time.time(),
    )


def _check_schema(table: pa.Table, expected: pa.Schema, what: str) -> None:
    head = list(table.schema)[: len(expected)]
    if len(head) != len(expected) or not all(a.equals(b) for a, b in zip(head, expected, strict=True)):
        raise ValueError(f"{what} table does not start with the schema of k2batch.records; build it with records")


def write_shard_outputs(
    output_uri: str,
    shard_index: int,
    results_table: pa.Table,
    traces_table: pa.Table,
    manifest: ShardManifest,
    options: StorageOptions = None,
) -> ShardManifest:
    """Write results, then traces, then the manifest (which marks the shard complete), each atomically.

    Refuses a results table whose row count differs from the shard's input rows. Returns the manifest written."""
    _check_schema(results_table, RESULT_SCHEMA, "results")
    _check_schema(traces_table, TRACE_SCHEMA, "traces")
    if manifest.shard != shard_index:
        raise ValueError(f"manifest is for shard {manifest.shard}, not {shard_index}")
    if results_table.num_rows != manifest.rows_in:
        raise ValueError(f"shard {shard_index}: {results_table.num_rows} result rows for {manifest.rows_in} input rows")
    results = write_parquet_atomic(results_uri(output_uri, shard_index), results_table, options)
    traces = write_parquet_atomic(traces_uri(output_uri, shard_index), traces_table, options)
    statuses = Counter(results_table.column("status").to_pylist())
    written = msgspec.structs.replace(
        manifest,
        rows_out=results_table.num_rows,
        rows_by_status=dict(sorted(statuses.items())),
        spans=traces_table.num_rows,
        results=results,
        traces=traces,
        finished_at=time.time(),
    )
    write_json_atomic(manifest_uri(output_uri, shard_index), written, options)
    return written


def read_manifests(output_uri: str, options: StorageOptions = None) -> list[ShardManifest]:
    """The manifests of the shards complete under `output_uri`, by shard index."""
    uris = list_uris(join(output_uri, "manifests"), options, suffix=".json")
    return sorted((read_json(uri, options, type=ShardManifest) for uri in uris), key=lambda m: m.shard)


def completed_shards(output_uri: str, plan: ShardPlan, config_hash: str, options: StorageOptions = None) -> set[int]:
    """Indexes of shards already done: a manifest for the same input slice and config, and its files in place
    with the SHA-256 it recorded. The files are read back in full for that: a damaged or replaced one (same
    size or not) makes its shard run again, rather than being counted as done."""
    manifests = set(child_names(join(output_uri, "manifests"), options))
    done = set()
    for shard in plan.shards:
        uri = manifest_uri(output_uri, shard.index)
        if uri.rsplit("/", 1)[-1] not in manifests:
            continue
        try:
            manifest = read_json(uri, options, type=ShardManifest)
        except (msgspec.DecodeError, NotAFileError):
            log.warning("manifest %s is unreadable; shard %d will run again", uri, shard.index)
            continue
        if manifest.input_hash != shard.input_hash or manifest.config_hash != config_hash:
            continue
        # The URIs of this output prefix, not the manifest's: a copied or remounted batch keeps its shards.
        damaged = [
            where
            for where, written in (
                (results_uri(output_uri, shard.index), manifest.results),
                (traces_uri(output_uri, shard.index), manifest.traces),
            )
            if written is None or file_sha256(where, options) != written.sha256
        ]
        if damaged:
            log.warning("shard %d: %s missing or changed since its manifest; it will run again", shard.index, damaged)
            continue
        done.add(shard.index)
    return done
