"""A batch with its input and outputs on S3 (a moto server on 127.0.0.1), through run_batch and `k2batch run`."""

from __future__ import annotations

import json

import msgspec
import polars as pl
import pyarrow as pa
import s3fs

from k2batch import storage
from k2batch.agent.batch import run_batch
from k2batch.cli import inspect_table, main
from k2batch.config import StorageConfig
from tests.agent.test_batch import answering_engine, config_for
from tests.s3_server import s3_bucket, s3_endpoint, s3_options  # noqa: F401 (fixtures)

JOBS = pa.table(
    {
        "job_id": ["a", "b", "b", "c", "d"],
        "prompt": ["What is 2+3?", "Add 2 and 3.", "dup", "Sum 2, 3", "2 plus 3"],
        "customer": ["w", "x", "y", "z", "v"],
    }
)


def scan(uri: str, options: dict) -> pl.DataFrame:
    return pl.scan_parquet(
        uri, hive_partitioning=True, storage_options=storage.polars_storage_options(uri, options)
    ).collect()


def test_run_batch_reads_and_writes_s3(k2_checkpoint, s3_bucket, s3_options):
    inputs, output = f"{s3_bucket}/inputs/b1", f"{s3_bucket}/outputs/b1"
    storage.write_parquet_atomic(f"{inputs}/jobs.parquet", JOBS, s3_options)
    config = msgspec.structs.replace(config_for(k2_checkpoint), storage=StorageConfig(options=s3_options))
    summary = run_batch(inputs, output, config, engine=answering_engine(k2_checkpoint))

    results = scan(f"{output}/results/**/*.parquet", s3_options).sort("job_id", "source_row")
    assert results.height == JOBS.num_rows == summary["rows"]  # rows in == rows out
    assert sorted(results["customer"].to_list()) == sorted(JOBS.column("customer").to_pylist())
    assert results["status"].to_list() == ["ok", "ok", "invalid", "ok", "ok"]
    assert results["shard"].to_list() == [0, 0, 0, 1, 1]
    traces = scan(f"{output}/traces/**/*.parquet", s3_options)
    assert set(traces["job_id"].to_list()) == {"a", "b", "c", "d"}
    names = storage.child_names(f"{output}/manifests", s3_options)
    assert names == ["shard=00000.json", "shard=00001.json"]
    assert json.loads(storage.read_bytes(f"{output}/summary.json", s3_options))["rows_by_status"] == {
        "invalid": 1,
        "ok": 4,
    }


def test_cli_run_and_inspect_on_s3(k2_checkpoint, s3_bucket, s3_endpoint, tmp_path, monkeypatch, capsys):
    inputs, output = f"{s3_bucket}/inputs/b2", f"{s3_bucket}/outputs/b2"
    options = {"endpoint_url": s3_endpoint, "client_kwargs": {"region_name": "eu-west-1"}}
    # Credentials come from the environment, as a config file may not hold them.
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    storage.write_parquet_atomic(f"{inputs}/jobs.parquet", JOBS, {**options, "key": "testing", "secret": "testing"})
    # The model is on S3 too: the engine loads it (weights, tokenizer, generation config) with the same options.
    model = f"{s3_bucket}/models/k2"
    s3fs.S3FileSystem(**options, key="testing", secret="testing").put(f"{k2_checkpoint}/", f"{model}/", recursive=True)
    (tmp_path / "s3.toml").write_text(
        f'model = "{model}"\n[engine]\nmax_num_seqs = 4\nnum_kv_blocks = 256\n'
        "[sampling]\ntemperature = 0.0\nmax_new_tokens = 8\n[agent]\nmax_steps = 2\n"
        '[tools]\nenabled = ["calculator"]\n[shards]\nrows_per_shard = 2\n'
        f'[storage.options]\nendpoint_url = "{s3_endpoint}"\nclient_kwargs = {{region_name = "eu-west-1"}}\n'
    )
    main(["run", "--input", inputs, "--output", output, "--config", str(tmp_path / "s3.toml")])
    assert capsys.readouterr().out.startswith("5 rows")
    results = scan(f"{output}/results/**/*.parquet", options)
    assert results.height == 5 and sorted(results["shard"].unique().to_list()) == [0, 1, 2]
    table = inspect_table(output, str(tmp_path / "s3.toml"))
    assert table.filter(pl.col("status") == "total")["jobs"].to_list() == [5]
