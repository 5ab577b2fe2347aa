"""Shard planning over several input files, reading shards, writing outputs, and resume from manifests."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from k2batch import storage
from k2batch.records import RunInfo, results_table, traces_table, validate_jobs
from k2batch.shards import (
    InputError,
    ShardPlan,
    attempts_uri,
    completed_shards,
    manifest_uri,
    new_manifest,
    plan_shards,
    read_shard_rows,
    remove_stale_shards,
    results_uri,
    start_attempt,
    summary_uri,
    traces_uri,
    write_shard_outputs,
)
from tests.s3_server import s3_bucket, s3_endpoint, s3_options  # noqa: F401 (fixtures)

CONFIG = "cfg-1"


def write_inputs(root: str, options: dict[str, Any] | None = None) -> None:
    """a: 3 rows; b: 5 rows with an extra column and a job_id repeated from a; c: no rows; d: zero bytes."""
    storage.write_parquet_atomic(
        storage.join(root, "a.parquet"),
        pa.table({"job_id": ["a0", "a1", "a2"], "prompt": ["p"] * 3, "max_steps": pa.array([1, 2, 3], pa.int32())}),
        options,
    )
    storage.write_parquet_atomic(
        storage.join(root, "b.parquet"),
        pa.table(
            {
                "job_id": ["b0", "a1", "b2", "b3", "b4"],
                "prompt": ["q", "q", None, "q", "q"],
                "max_steps": pa.array([4, 5, 6, 7, 8], pa.int64()),
                "topic": ["x", "y", "z", "w", "v"],
            }
        ),
        options,
    )
    storage.write_parquet_atomic(
        storage.join(root, "c.parquet"), pa.table({"job_id": pa.array([], pa.string())}), options
    )
    storage.write_bytes_atomic(storage.join(root, "d.parquet"), b"", options)


@pytest.fixture
def inputs(tmp_path: Path) -> str:
    root = str(tmp_path / "inputs")
    write_inputs(root)
    return root


def run_shard(
    plan: ShardPlan, index: int, output: str, options: dict[str, Any] | None = None, config: str = CONFIG
) -> None:
    """What a runner does with one shard, minus the model: every valid job 'succeeds'."""
    from k2batch.records import Result

    shard = plan.shards[index]
    rows = read_shard_rows(shard, options)
    jobs, invalid = validate_jobs(rows, known_tools=set(), default_tools=(), source="unused")
    done = [
        Result(
            job_id=j.job_id, task=j.task, status="ok", answer="done", source_file=j.source_file, source_row=j.source_row
        )
        for j in jobs
    ]
    results = results_table(done + invalid, RunInfo(model="m", config_hash=config, shard=index, attempt=1), rows)
    manifest = new_manifest(shard, config)
    write_shard_outputs(output, index, results, traces_table([]), manifest, options)


def test_plans_are_stable_and_cross_file_boundaries(inputs: str) -> None:
    plan = plan_shards(inputs, 4)
    a, b, c, d = (storage.join(inputs, name) for name in ["a.parquet", "b.parquet", "c.parquet", "d.parquet"])
    assert [[(s.uri, s.row_start, s.row_stop) for s in shard.slices] for shard in plan.shards] == [
        [(a, 0, 3), (b, 0, 1)],
        [(b, 1, 5)],
    ]
    assert plan.empty_files == (c, d) and plan.num_rows == 8 and [f.uri for f in plan.files] == [a, b, c, d]
    assert plan_shards([b, d, a, c], 4) == plan  # files are taken in key order, however they are given
    assert plan_shards(inputs, 4) == plan
    assert [shard.num_rows for shard in plan_shards(inputs, 3).shards] == [3, 3, 2]


def test_shard_rows_carry_their_source_and_the_batch_schema(inputs: str) -> None:
    plan = plan_shards(inputs, 4)
    first, second = (read_shard_rows(shard) for shard in plan.shards)
    assert first.schema == second.schema  # a has no topic column: nulls, so every shard has the same columns
    assert first.column_names == ["job_id", "prompt", "max_steps", "topic", "_source", "_row", "_duplicate_of"]
    assert first.schema.field("max_steps").type == pa.int64()
    assert first.column("job_id").to_pylist() == ["a0", "a1", "a2", "b0"]
    assert first.column("topic").to_pylist() == [None, None, None, "x"]
    assert second.column("_row").to_pylist() == [1, 2, 3, 4]
    assert second.column("_duplicate_of").to_pylist() == [
        storage.join(inputs, "a.parquet") + " row 1",
        None,
        None,
        None,
    ]

    jobs, invalid = validate_jobs(second, known_tools=set(), default_tools=(), source="unused")
    a, b = storage.join(inputs, "a.parquet"), storage.join(inputs, "b.parquet")
    assert [(j.job_id, j.source_row) for j in jobs] == [("b3", 3), ("b4", 4)]
    assert [r.error_message for r in invalid] == [
        f"{b} row 1 (job 'a1'): job_id 'a1' already used by {a} row 1; only that row runs",
        f"{b} row 2 (job 'b2'): neither prompt nor messages is set; give one",
    ]


def test_a_truncated_file_fails_the_plan_before_anything_is_written(inputs: str, tmp_path: Path) -> None:
    good = (Path(inputs) / "b.parquet").read_bytes()
    (Path(inputs) / "e.parquet").write_bytes(good[: len(good) // 2])
    output = tmp_path / "outputs"
    with pytest.raises(InputError, match=r"e\.parquet: not a readable Parquet file .*; replace or remove it"):
        run_shard(plan_shards(inputs, 4), 0, str(output))
    assert not output.exists()
    (Path(inputs) / "e.parquet").write_bytes(b"PAR1 not parquet at all")
    with pytest.raises(InputError, match=r"e\.parquet"):
        plan_shards(inputs, 4)


def damage_column(path: Path, column: str) -> None:
    """Overwrite the middle of `column`'s chunk in row group 0 with junk: the footer and other columns stay intact."""
    parquet = pq.ParquetFile(path)
    chunk = parquet.metadata.row_group(0).column(parquet.schema_arrow.names.index(column))
    start = chunk.dictionary_page_offset if chunk.has_dictionary_page else chunk.data_page_offset
    data = bytearray(path.read_bytes())
    middle = start + chunk.total_compressed_size // 2
    data[middle : middle + 16] = b"\xff" * 16
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("with_id", [True, False])
def test_damage_in_any_column_fails_the_plan(tmp_path: Path, with_id: bool) -> None:
    rng = random.Random(0)
    notes = ["".join(rng.choice("abcdefghij") for _ in range(200)) for _ in range(300)]  # pages worth damaging
    table = pa.table({"job_id": [f"j{i}" for i in range(300)], "prompt": ["p"] * 300, "notes": notes})
    path = tmp_path / "jobs.parquet"
    pq.write_table(table if with_id else table.drop_columns(["job_id"]), path, compression="zstd")
    damage_column(path, "notes")
    pq.read_table(path, columns=["job_id", "prompt"] if with_id else ["prompt"])  # the other columns still read
    with pytest.raises(InputError, match=r"jobs\.parquet: not a readable Parquet file"):
        plan_shards(str(tmp_path), 100)


def test_inputs_that_cannot_form_one_batch(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="no Parquet files there"):
        plan_shards(str(tmp_path / "nothing"), 4)
    pq.write_table(pa.table({"job_id": ["a"], "seed": [1]}), tmp_path / "a.parquet")
    pq.write_table(pa.table({"job_id": ["b"], "seed": ["one"]}), tmp_path / "b.parquet")
    with pytest.raises(InputError, match=r"column 'seed' is int64 in .*a\.parquet, string in .*b\.parquet"):
        plan_shards(str(tmp_path), 4)
    pq.write_table(pa.table({"job_id": ["b"], "_row": [1]}), tmp_path / "b.parquet")
    with pytest.raises(InputError, match="columns _row are reserved"):
        plan_shards(str(tmp_path), 4)


def test_only_empty_files_plan_no_shards(tmp_path: Path) -> None:
    pq.write_table(pa.table({"job_id": pa.array([], pa.string())}), tmp_path / "a.parquet")
    plan = plan_shards(str(tmp_path), 4)
    assert plan.shards == () and plan.num_rows == 0 and len(plan.empty_files) == 1


def test_resume_skips_complete_shards_and_redoes_the_rest(inputs: str, tmp_path: Path) -> None:
    output = str(tmp_path / "outputs")
    plan = plan_shards(inputs, 4)
    assert completed_shards(output, plan, CONFIG) == set()
    run_shard(plan, 1, output)
    assert completed_shards(output, plan, CONFIG) == {1}
    assert completed_shards(output, plan, "another-config") == set()

    # Shard 0 died after its results were written, before its manifest: not complete.
    storage.write_bytes_atomic(results_uri(output, 0), b"half", None)
    assert completed_shards(output, plan, CONFIG) == {1}
    run_shard(plan, 0, output)
    run_shard(plan, 0, output)  # a rerun overwrites: no duplicate rows
    assert completed_shards(output, plan, CONFIG) == {0, 1}
    frame = pl.read_parquet(f"{output}/results/**/*.parquet", hive_partitioning=True)
    assert frame.height == plan.num_rows
    assert frame.group_by("shard").len().sort("shard").to_dicts() == [{"shard": 0, "len": 4}, {"shard": 1, "len": 4}]
    assert frame.filter(pl.col("status") == "invalid").height == 2

    manifest = storage.read_json(manifest_uri(output, 0))
    assert manifest["rows_in"] == manifest["rows_out"] == 4 and manifest["rows_by_status"] == {"ok": 4}
    assert manifest["input_hash"] == plan.shards[0].input_hash and manifest["config_hash"] == CONFIG
    assert manifest["results"]["sha256"] and manifest["traces"]["uri"] == traces_uri(output, 0)

    # a.parquet changes: only the shard that read it is redone.
    pq.write_table(pa.table({"job_id": ["a0", "a1", "a2"], "prompt": ["new"] * 3}), Path(inputs) / "a.parquet")
    replanned = plan_shards(inputs, 4)
    assert replanned.shards[1] == plan.shards[1]
    assert completed_shards(output, replanned, CONFIG) == {1}
    # A results file that is not the one the manifest describes: redone.
    storage.write_bytes_atomic(results_uri(output, 1), b"not these", None)
    assert completed_shards(output, replanned, CONFIG) == set()


def test_a_complete_shard_damaged_in_place_is_redone(inputs: str, tmp_path: Path) -> None:
    output = str(tmp_path / "outputs")
    plan = plan_shards(inputs, 4)
    run_shard(plan, 0, output)
    run_shard(plan, 1, output)
    for uri in (results_uri(output, 1), traces_uri(output, 0)):
        good = bytearray(storage.read_bytes(uri))
        good[len(good) // 2] ^= 0xFF  # one flipped bit pattern: same size, different bytes
        Path(uri).write_bytes(bytes(good))
    assert completed_shards(output, plan, CONFIG) == set()
    run_shard(plan, 1, output)
    assert completed_shards(output, plan, CONFIG) == {1}


def test_stale_shards_are_removed_manifest_first(inputs: str, tmp_path: Path, monkeypatch) -> None:
    output = str(tmp_path / "outputs")
    plan = plan_shards(inputs, 3)
    assert len(plan.shards) == 3
    for shard in plan.shards:
        start_attempt(output, shard, CONFIG)
        run_shard(plan, shard.index, output)
    Path(results_uri(output, 2)).with_name(".part-0.parquet.abc.tmp").write_bytes(b"left by a kill")
    # b.parquet is rewritten with fewer rows: 5 rows in two shards now, shard 2 is stale.
    pq.write_table(pa.table({"job_id": ["b0", "b1"], "prompt": ["q", "q"]}), Path(inputs) / "b.parquet")
    replanned = plan_shards(inputs, 3)
    assert len(replanned.shards) == 2
    removed = []
    real_remove = storage.remove
    monkeypatch.setattr(
        "k2batch.shards.remove", lambda uri, options=None, **kw: removed.append(uri) or real_remove(uri, options, **kw)
    )
    assert remove_stale_shards(output, replanned) == [2]
    assert removed[0] == manifest_uri(output, 2)  # first: no moment where shard 2 looks complete but is not
    for uri in (manifest_uri(output, 2), results_uri(output, 2), traces_uri(output, 2), attempts_uri(output, 2)):
        assert not Path(uri).exists()
    assert not Path(results_uri(output, 2)).parent.exists()  # the folder goes too, temporary leftovers with it
    for index in (0, 1):
        assert Path(manifest_uri(output, index)).exists() and Path(results_uri(output, index)).exists()
    frame = pl.read_parquet(f"{output}/results/**/*.parquet", hive_partitioning=True)
    assert sorted(frame["shard"].unique().to_list()) == [0, 1]
    assert remove_stale_shards(output, replanned) == []
    assert remove_stale_shards(str(tmp_path / "never-written"), replanned) == []


def test_attempts_count_earlier_starts_of_the_same_shard(inputs: str, tmp_path: Path) -> None:
    output = str(tmp_path / "outputs")
    plan = plan_shards(inputs, 4)
    shard = plan.shards[0]
    assert [start_attempt(output, shard, CONFIG) for _ in range(3)] == [1, 2, 3]  # e.g. two crashed runs, then one
    assert start_attempt(output, plan.shards[1], CONFIG) == 1  # per shard
    assert start_attempt(output, shard, "another-config") == 1  # per inputs and config
    assert start_attempt(output, shard, CONFIG, attempt=7) == 7  # an orchestrator that counts its own retries
    assert start_attempt(output, shard, CONFIG) == 5
    assert len(list(Path(attempts_uri(output, 0)).iterdir())) == 6


def test_outputs_are_refused_when_rows_went_missing(inputs: str, tmp_path: Path) -> None:
    plan = plan_shards(inputs, 4)
    rows = read_shard_rows(plan.shards[0])
    _, invalid = validate_jobs(rows.slice(0, 2), known_tools=set(), default_tools=(), source="x")
    short = results_table(invalid, RunInfo(model="m", config_hash=CONFIG, shard=0, attempt=1))
    output = str(tmp_path / "outputs")
    with pytest.raises(ValueError, match="shard 0: 0 result rows for 4 input rows"):
        write_shard_outputs(output, 0, short, traces_table([]), new_manifest(plan.shards[0], CONFIG))
    with pytest.raises(ValueError, match="traces table does not start with the schema"):
        write_shard_outputs(output, 0, short, pa.table({"x": [1]}), new_manifest(plan.shards[0], CONFIG))
    assert not Path(output).exists()


def test_layout() -> None:
    assert results_uri("s3://b/out", 7) == "s3://b/out/results/shard=00007/part-0.parquet"
    assert traces_uri("s3://b/out", 7) == "s3://b/out/traces/shard=00007/part-0.parquet"
    assert manifest_uri("s3://b/out", 7) == "s3://b/out/manifests/shard=00007.json"
    assert summary_uri("s3://b/out/") == "s3://b/out/summary.json"


def test_the_whole_round_on_s3(s3_bucket: str, s3_options: dict[str, Any]) -> None:
    inputs, output = storage.join(s3_bucket, "inputs", "batch1"), storage.join(s3_bucket, "outputs", "batch1")
    write_inputs(inputs, s3_options)
    plan = plan_shards(inputs, 4, s3_options)
    assert [shard.num_rows for shard in plan.shards] == [4, 4] and len(plan.empty_files) == 2
    for shard in plan.shards:
        run_shard(plan, shard.index, output, s3_options)
    assert completed_shards(output, plan, CONFIG, s3_options) == {0, 1}
    frame = pl.scan_parquet(
        f"{output}/results/**/*.parquet",
        hive_partitioning=True,
        storage_options=storage.polars_storage_options(output, s3_options),
    ).collect()
    assert sorted(frame["job_id"].to_list()) == ["a0", "a1", "a1", "a2", "b0", "b2", "b3", "b4"]
    assert frame.filter(pl.col("status") == "ok").height == 6
