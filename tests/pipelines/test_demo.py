"""The whole asset graph of a batch on the demo model (workspace/models/k2-demo, a tiny K2 that really calls
tools), materialized with dg.materialize on a temporary instance over a few held-out demo jobs."""

from __future__ import annotations

import json

import dagster as dg
import polars as pl
import pyarrow.parquet as pq
import pytest

from k2batch.demo.workspace import write_jobs
from k2batch.pipelines.assets import ERROR_RATE_CHECK, ROWS_CHECK, batch_report, batches, shard_plan, shard_results
from k2batch.pipelines.resources import EngineResource, StorageResource
from k2batch.pipelines.step_outputs import StepOutputsIOManager
from tests.pipelines.conftest import DEMO_MODEL, RUN_SETTINGS, demo_run_config

JOBS = 4  # the three tasks, then retrieval again: two shards of two

pytestmark = pytest.mark.skipif(
    not (DEMO_MODEL / "config.json").exists(), reason="needs the demo model (workspace/README.md)"
)


@pytest.fixture(scope="module")
def demo_batch(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo-root")
    inputs = write_jobs(root / "inputs" / "demo" / "jobs.parquet", JOBS)
    storage = StorageResource(root=str(root))
    with dg.instance_for_test() as instance:
        instance.add_dynamic_partitions(batches.name, ["demo"])
        result = dg.materialize(
            [shard_plan, shard_results, batch_report],
            partition_key="demo",
            instance=instance,
            resources={
                "storage": storage,
                "engine": EngineResource(),
                "io_manager": StepOutputsIOManager(storage=storage),
                "settings": RUN_SETTINGS,
            },
            run_config=demo_run_config(rows_per_shard=2),
            raise_on_error=False,
        )
    yield root / "outputs" / "demo", pl.read_parquet(inputs), result


def report_metadata(result: dg.ExecuteInProcessResult) -> dict:
    (event,) = [e for e in result.get_asset_materialization_events() if e.asset_key.path == ["batch_report"]]
    return {key: value.value for key, value in event.materialization.metadata.items()}


def test_every_job_has_one_result_with_its_columns_passed_through(demo_batch):
    output, jobs, result = demo_batch
    assert result.success
    results = pl.read_parquet(f"{output}/results/**/*.parquet", hive_partitioning=True).sort("job_id")
    assert results.height == jobs.height == JOBS  # rows in == rows out
    assert results["job_id"].to_list() == jobs["job_id"].to_list()
    assert results["expected"].to_list() == jobs["expected"].to_list()  # pass-through, for grading
    assert results["shard"].to_list() == [0, 0, 1, 1]
    assert "error" not in results["status"].to_list() and results["answer"].null_count() == 0
    assert sum(pq.ParquetFile(p).metadata.num_rows for p in output.glob("results/*/*.parquet")) == JOBS


def test_the_demo_model_calls_search_and_gets_corpus_results(demo_batch):
    output, jobs, _ = demo_batch
    traces = pl.read_parquet(f"{output}/traces/**/*.parquet", hive_partitioning=True)
    calls = traces.filter(pl.col("operation") == "execute_tool")
    searches = calls.filter(pl.col("tool_name") == "search")
    # Every job's tools include search, and the model calls it (no scripted steps here).
    assert sorted(searches["job_id"].unique()) == sorted(jobs["job_id"])
    assert searches["tool_result"].str.contains("doc").all() and searches["error_type"].is_null().all()


def test_report_metadata_checks_and_summary(demo_batch):
    output, jobs, result = demo_batch
    report = report_metadata(result)
    assert report["rows"] == JOBS and report["tool_calls"] >= JOBS
    assert report["prompt_tokens"] > 0 and report["completion_tokens"] > 0 and report["output_tokens_per_s"] > 0
    assert report["cached_prompt_tokens"] > 0  # an episode's later steps reuse its earlier KV
    assert f"| ok | {JOBS} |" in report["rows_by_status"]
    for task in jobs["task"].unique():
        assert task in report["tasks"] and task in report["tokens_per_task"]
    assert "█" in report["steps_per_episode"]
    evaluations = {e.check_name: e for e in result.get_asset_check_evaluations()}
    assert evaluations[ROWS_CHECK].passed and evaluations[ROWS_CHECK].metadata["rows_out"].value == JOBS
    assert evaluations[ERROR_RATE_CHECK].passed
    summary = json.loads((output / "summary.json").read_text())
    assert summary["rows"] == JOBS and summary["shards"] == 2 and summary["model"] == str(DEMO_MODEL)
    assert summary["engine"]["decode_tokens"] > 0
