"""End to end on S3 (a moto server on 127.0.0.1): a Parquet file put under inputs/, a sensor tick, the run,
and the outputs read back from S3 with polars. Credentials reach the resources only as dg.EnvVar."""

from __future__ import annotations

import json
from pathlib import Path

import dagster as dg
import polars as pl
import pyarrow.parquet as pq
import pytest
import s3fs

from k2batch.pipelines.batches import BatchInput
from k2batch.pipelines.definitions import build_definitions
from k2batch.pipelines.resources import StorageResource
from k2batch.pipelines.sensors import inputs_sensor
from k2batch.storage import FileInfo, parquet_bytes, polars_storage_options
from tests.pipelines.conftest import JOBS, RUN_SETTINGS, ScriptedEngine, batch_run_config
from tests.s3_server import s3_bucket, s3_endpoint, s3_options  # noqa: F401


@pytest.fixture
def s3_storage(s3_bucket, s3_options, monkeypatch) -> StorageResource:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3_options["key"])
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3_options["secret"])
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    public = {name: value for name, value in s3_options.items() if name not in ("key", "secret")}
    return StorageResource(
        root=f"{s3_bucket}/k2",
        options=public,
        key=dg.EnvVar("AWS_ACCESS_KEY_ID"),
        secret=dg.EnvVar("AWS_SECRET_ACCESS_KEY"),
    )


def refuse_downloads(*args, **kwargs):
    raise AssertionError("the sensor opened an input file: fingerprints come from the listing's ETags")


def test_parquet_put_on_s3_runs_and_outputs_read_back_with_polars(
    s3_storage,
    s3_options,
    batch_model,
    monkeypatch,
):
    fs = s3fs.S3FileSystem(**s3_options)
    jobs_uri = f"{s3_storage.root}/inputs/b1/jobs.parquet"
    fs.pipe(jobs_uri, parquet_bytes(JOBS))
    fs.pipe(f"{s3_storage.root}/inputs/b1/notes.txt", b"not a batch file")

    defs = build_definitions(storage=s3_storage, engine=ScriptedEngine())
    with dg.instance_for_test() as instance:
        batch_inputs = inputs_sensor(minimum_interval_s=30)
        resources = {"storage": s3_storage, "settings": RUN_SETTINGS}
        context = dg.build_sensor_context(instance=instance, resources=resources)
        with monkeypatch.context() as patch:
            patch.setattr(s3fs.S3FileSystem, "_open", refuse_downloads)
            tick = batch_inputs(context)
        (request,) = tick.run_requests
        assert request.partition_key == "b1" and request.tags["k2batch/input"] == f"{s3_storage.root}/inputs/b1"
        # The fingerprint is the one built from S3's ETag of the file (read from the listing, no download).
        etag = fs.info(jobs_uri)["ETag"].strip('"')
        listed = (FileInfo(jobs_uri, 0, 0.0, etag),)
        from_etag = BatchInput(name="b1", input_uri=f"{s3_storage.root}/inputs/b1", nightly=False, files=listed)
        assert request.tags["k2batch/fingerprint"] == from_etag.fingerprint
        assert request.run_key == f"inputs:b1:{from_etag.fingerprint}"
        for partitions in tick.dynamic_partitions_requests:
            instance.add_dynamic_partitions(partitions.partitions_def_name, list(partitions.partition_keys))

        job = defs.resolve_job_def("batch_job")
        result = job.execute_in_process(
            instance=instance,
            partition_key=request.partition_key,
            run_config=batch_run_config(batch_model),
            tags=request.tags,
        )
        assert result.success
        again = batch_inputs(dg.build_sensor_context(instance=instance, cursor=tick.cursor, resources=resources))
        assert not again.run_requests
        # Step outputs are JSON in the instance's storage directory, nothing of Dagster's is under the data root.
        stored = Path(instance.storage_directory()) / "assets" / "shard_plan" / "b1.json"
        assert json.loads(stored.read_text())["type"] == "BatchPlan"

    output = f"{s3_storage.root}/outputs/b1"
    options = polars_storage_options(output, s3_options)
    results = (
        pl.scan_parquet(f"{output}/results/**/*.parquet", hive_partitioning=True, storage_options=options)
        .select("job_id", "status", "customer", "shard")
        .sort("customer")
        .collect()
    )
    assert results["customer"].to_list() == ["a", "b", "c", "d", "e"]
    assert results["shard"].to_list() == [0, 0, 0, 1, 1]
    traces = pl.scan_parquet(f"{output}/traces/**/*.parquet", storage_options=options).collect()
    assert traces.filter(pl.col("operation") == "execute_tool")["tool_name"].to_list()
    assert json.loads(fs.cat(f"{output}/summary.json"))["rows"] == 5
    assert sorted(path.rsplit("/", 1)[-1] for path in fs.ls(s3_storage.root)) == ["inputs", "outputs"]
    assert pq.ParquetFile(fs.open(f"{output}/results/shard=00000/part-0.parquet")).metadata.num_rows == 3


@pytest.mark.parametrize(
    "options, where",
    [
        ({"endpoint_url": "http://x", "secret": "hunter2"}, "options.secret"),
        ({"client_kwargs": {"aws_secret_access_key": "hunter2"}}, "options.client_kwargs.aws_secret_access_key"),
        # A protocol table, as fsspec takes per-protocol options: nested as deep as it likes.
        ({"s3": {"key": "AKIA", "secret": "hunter2"}}, "options.s3.key, options.s3.secret"),
        ({"config_kwargs": {"s3": {"Session-Token": "x"}}}, "options.config_kwargs.s3.Session-Token"),
    ],
)
def test_literal_secrets_in_storage_options_are_refused(options, where):
    with pytest.raises(ValueError, match="EnvVar") as error:
        StorageResource(root="s3://bucket", options=options)
    assert f"storage {where}: credentials" in str(error.value)


@dg.asset
def storage_options(storage: StorageResource) -> dict:
    return storage.fsspec_options()


def test_credentials_are_env_vars_only(monkeypatch):
    monkeypatch.setenv("TEST_S3_KEY", "AKIA-from-env")
    monkeypatch.setenv("TEST_S3_SECRET", "secret-from-env")
    for field in ("key", "secret", "token"):
        with pytest.raises(ValueError, match=rf"storage {field}: a literal value; pass it as dg.EnvVar"):
            StorageResource(root="s3://bucket", **{field: "hunter2"})
    # Python: dg.EnvVar; the value is read where the resource is used, never stored.
    storage = StorageResource(root="s3://bucket", key=dg.EnvVar("TEST_S3_KEY"), secret=dg.EnvVar("TEST_S3_SECRET"))
    assert "AKIA-from-env" not in repr(storage)
    assert storage.fsspec_options() == {"key": "AKIA-from-env", "secret": "secret-from-env"}
    result = dg.materialize([storage_options], resources={"storage": storage})
    assert result.output_for_node("storage_options")["key"] == "AKIA-from-env"
    # The launchpad: {env: VARIABLE} works, a literal string is refused by the config schema.
    launched = {"storage": StorageResource.configure_at_launch()}
    config = {"root": "s3://bucket", "key": {"env": "TEST_S3_KEY"}, "secret": {"env": "TEST_S3_SECRET"}}
    result = dg.materialize(
        [storage_options], resources=launched, run_config={"resources": {"storage": {"config": config}}}
    )
    assert result.output_for_node("storage_options") == {"key": "AKIA-from-env", "secret": "secret-from-env"}
    config["key"] = "AKIA-literal"
    with pytest.raises(dg.DagsterInvalidConfigError, match=r"config:key must be dict. Expected: .\{ env:"):
        dg.materialize([storage_options], resources=launched, run_config={"resources": {"storage": {"config": config}}})


def test_unset_credential_variable_is_named(monkeypatch):
    monkeypatch.delenv("TEST_S3_UNSET", raising=False)
    storage = StorageResource(root="s3://bucket", token=dg.EnvVar("TEST_S3_UNSET"))
    with pytest.raises(ValueError, match="storage token: environment variable TEST_S3_UNSET is not set"):
        storage.fsspec_options()
