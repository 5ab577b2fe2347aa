"""The whole asset graph of a batch, materialized with dg.materialize on a temporary instance."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import ClassVar

import dagster as dg
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from k2batch.cli import inspect_table
from k2batch.engine import Engine, EngineConfig
from k2batch.pipelines.assets import ERROR_RATE_CHECK, ROWS_CHECK, batch_report, batches, shard_plan, shard_results
from k2batch.pipelines.resources import StorageResource
from k2batch.pipelines.step_outputs import StepOutputsIOManager
from tests.pipelines.conftest import RUN_SETTINGS, ScriptedEngine, batch_run_config, write_jobs

ASSETS = [shard_plan, shard_results, batch_report]


def materialize(root, model, instance, batch="b1", engine=None, selection=None, run_config=None, **report):
    storage = StorageResource(root=str(root))
    instance.add_dynamic_partitions(batches.name, [batch])
    resources = {
        "storage": storage,
        "engine": engine or ScriptedEngine(),
        "io_manager": StepOutputsIOManager(storage=storage),
        "settings": RUN_SETTINGS,
    }
    run_config = run_config or batch_run_config(model, **report)
    if selection is not None:
        run_config = {"ops": {op: config for op, config in run_config["ops"].items() if op in selection}}
    return dg.materialize(
        ASSETS,
        partition_key=batch,
        instance=instance,
        resources=resources,
        run_config=run_config,
        selection=selection,
        raise_on_error=False,
    )


def metadata(result: dg.ExecuteInProcessResult, asset: str) -> dict:
    (event,) = [e for e in result.get_asset_materialization_events() if e.asset_key.path == [asset]]
    return {key: value.value for key, value in event.materialization.metadata.items()}


def checks(result: dg.ExecuteInProcessResult) -> dict[str, dg.AssetCheckEvaluation]:
    return {e.check_name: e for e in result.get_asset_check_evaluations()}


@pytest.fixture(scope="module")
def materialized(batch_model, tmp_path_factory):
    root = tmp_path_factory.mktemp("root")
    write_jobs(root / "inputs" / "b1" / "part-0.parquet")
    with dg.instance_for_test() as instance:
        result = materialize(root, batch_model, instance)
        yield root, result, instance


def test_whole_graph_writes_results_traces_and_summary(materialized):
    root, result, _ = materialized
    assert result.success
    output = root / "outputs" / "b1"
    results = pl.scan_parquet(f"{output}/results/**/*.parquet", hive_partitioning=True).collect().sort("source_row")
    assert results["customer"].to_list() == ["a", "b", "c", "d", "e"]  # rows in == rows out, pass-through kept
    assert results["error_type"].to_list()[2:] == ["duplicate_job_id", "missing_job_id", "unknown_tool"]
    assert results["shard"].to_list() == [0, 0, 0, 1, 1]
    assert sorted(p.name for p in (output / "manifests").iterdir()) == ["shard=00000.json", "shard=00001.json"]
    traces = pl.read_parquet(f"{output}/traces/**/*.parquet")
    assert traces.filter(pl.col("operation") == "execute_tool").height > 0
    summary = json.loads((output / "summary.json").read_text())
    assert summary["rows"] == 5 and summary["shards"] == 2 and summary["rows_by_status"]["invalid"] == 3
    assert summary["engine"]["decode_tokens"] > 0 and summary["engine"]["prefill_tokens"] > 0  # both shards' work


def test_step_outputs_are_json_in_dagsters_storage_and_nothing_of_dagsters_is_under_the_root(materialized):
    root, _, instance = materialized
    storage = Path(instance.storage_directory())
    assert json.loads((storage / "assets" / "shard_plan" / "b1.json").read_text())["type"] == "BatchPlan"
    shard_results = json.loads((storage / "assets" / "shard_results" / "b1.json").read_text())
    assert shard_results["type"] == "list[ShardOutcome]" and len(shard_results["value"]) == 2
    assert not list(storage.rglob("*.pickle"))
    assert sorted(path.name for path in root.iterdir()) == ["inputs", "outputs"]


def test_invalid_rows_are_listed_in_the_report_instead_of_failing(materialized):
    _, result, _ = materialized
    plan = metadata(result, "shard_plan")
    assert plan["rows"] == 5 and plan["shards"] == 2 and plan["duplicate_job_ids"] == 1
    report = metadata(result, "batch_report")
    assert report["invalid_rows"] == 3
    for error in ("duplicate_job_id", "missing_job_id", "unknown_tool"):
        assert f"| {error} | 1 |" in report["invalid_by_error"]
    assert "teleport" in report["invalid_rows_first"]  # the unknown tool is named, with its file and row
    assert "part-0.parquet | 4 |" in report["invalid_rows_first"]


def test_rows_are_read_and_validated_once_by_the_step_that_runs_them(batch_model, tmp_path, monkeypatch):
    """Planning reads each file in full once (a damaged one fails the plan) and validates nothing; each shard's
    step reads its own rows and validates them once."""
    from k2batch import records, shards

    decoded, reads, validated = [], [], []
    inspect, read_rows, validate = shards._inspect, shards.read_shard_rows, records.validate_jobs

    def counted_inspect(file, options):
        decoded.append(file.uri)
        return inspect(file, options)

    def counted_read(shard, options=None):
        reads.append(shard.index)
        return read_rows(shard, options)

    def counted_validate(table, **checks):
        validated.append(table.num_rows)
        return validate(table, **checks)

    monkeypatch.setattr(shards, "_inspect", counted_inspect)
    # Wherever the pipeline's modules hold these functions.
    for name, module in list(sys.modules.items()):
        if name.split(".")[0] in ("k2batch", "pipelines"):
            for attribute, original, counted in (
                ("read_shard_rows", read_rows, counted_read),
                ("validate_jobs", validate, counted_validate),
            ):
                if getattr(module, attribute, None) is original:
                    monkeypatch.setattr(module, attribute, counted)
    write_jobs(tmp_path / "inputs" / "b9" / "part-0.parquet")
    with dg.instance_for_test() as instance:
        assert materialize(tmp_path, batch_model, instance, batch="b9").success
    assert len(decoded) == 1 and sorted(reads) == [0, 1] and sorted(validated) == [2, 3]


def test_each_shard_is_its_own_step(materialized):
    _, result, _ = materialized
    steps = {e.step_key for e in result.all_events if e.event_type_value == "STEP_SUCCESS"}
    assert {"shard_results.run_shard[shard_00000]", "shard_results.run_shard[shard_00001]"} <= steps


def test_report_metadata_and_checks(materialized):
    root, result, _ = materialized
    report = metadata(result, "batch_report")
    assert report["rows"] == 5
    assert report["prompt_tokens"] > 0 and report["completion_tokens"] > 0
    assert 0 <= report["cache_hit_rate"] <= 1 and report["cached_prompt_tokens"] > 0  # steps reuse the prefix
    assert report["output_tokens_per_s"] > 0 and report["output_tokens_per_shard_s"] > 0 and report["api_cost_usd"] > 0
    assert 0 < report["run_s"] and 0 < report["shard_run_s"]
    # The report's numbers are the batch summary's, which `k2batch inspect` shows too.
    summary = json.loads((root / "outputs" / "b1" / "summary.json").read_text())
    numbers = {name: value for name, value in summary.items() if isinstance(value, int | float)}
    assert {name: report[name] for name in numbers} == numbers
    total = inspect_table(str(root / "outputs" / "b1"), None).filter(pl.col("status") == "total").row(0, named=True)
    assert total["jobs"] == summary["rows"] and total["cost_usd"] == summary["api_cost_usd"]
    assert total["output_tokens_per_s"] == summary["output_tokens_per_s"]
    assert "| invalid | 3 |" in report["rows_by_status"]
    assert "█" in report["steps_per_episode"] and "█" in report["tokens_per_task"]
    assert "retrieval" in report["tasks"]
    evaluations = checks(result)
    assert evaluations[ROWS_CHECK].passed
    assert evaluations[ROWS_CHECK].metadata["rows_out"].value == 5
    assert evaluations[ERROR_RATE_CHECK].passed  # no row errored; invalid rows are not errors by default


def test_rerun_skips_complete_shards_and_checks_error_threshold(materialized, batch_model):
    root, _, instance = materialized
    # Counting invalid rows as errors, 3 of 5 is over a 10% threshold: the check fails, the run does not.
    result = materialize(root, batch_model, instance, max_error_rate=0.1, error_statuses=["error", "invalid"])
    assert result.success
    shard_steps = [e for e in result.get_step_success_events() if e.step_key.startswith("shard_results.run_shard")]
    assert len(shard_steps) == 2
    outputs = [e for e in result.all_events if e.event_type_value == "STEP_OUTPUT" and "run_shard[" in e.step_key]
    assert all(e.event_specific_data.metadata["skipped"].value for e in outputs)
    evaluation = checks(result)[ERROR_RATE_CHECK]
    assert not evaluation.passed and evaluation.metadata["error_rate"].value == pytest.approx(0.6)
    assert json.loads((root / "outputs" / "b1" / "summary.json").read_text())["engine"] is None  # nothing ran


def test_rows_check_fails_when_a_result_row_is_missing(batch_model, tmp_path):
    write_jobs(tmp_path / "inputs" / "b6.parquet")
    with dg.instance_for_test() as instance:
        assert materialize(tmp_path, batch_model, instance, batch="b6").success
        shard = tmp_path / "outputs" / "b6" / "results" / "shard=00001" / "part-0.parquet"
        pq.write_table(pq.read_table(shard).slice(0, 1), shard)  # one of its two result rows lost
        result = materialize(tmp_path, batch_model, instance, batch="b6", selection=["batch_report"])
    assert result.success  # a failed check flags the report, it does not fail the run
    evaluation = checks(result)[ROWS_CHECK]
    assert not evaluation.passed and evaluation.description == "5 input rows but 4 result rows"
    assert (evaluation.metadata["rows_in"].value, evaluation.metadata["rows_out"].value) == (5, 4)


class FlakyEngine(ScriptedEngine):
    """The first engine step of the run fails (shard 0), as a lost GPU would."""

    failed: ClassVar[list[bool]] = []

    def build(self, model: str, config: EngineConfig, storage_options=None) -> Engine:
        engine = super().build(model, config, storage_options)
        step = engine.step

        def flaky_step():
            if not FlakyEngine.failed:
                FlakyEngine.failed.append(True)
                raise RuntimeError("CUDA error: an illegal memory access was encountered")
            return step()

        engine.step = flaky_step
        return engine


def test_failed_shard_is_retried_alone(batch_model, tmp_path):
    write_jobs(tmp_path / "inputs" / "b2.parquet")
    with dg.instance_for_test() as instance:
        result = materialize(tmp_path, batch_model, instance, batch="b2", engine=FlakyEngine())
    assert result.success
    retried = [e.step_key for e in result.all_events if e.event_type_value == "STEP_UP_FOR_RETRY"]
    assert retried == ["shard_results.run_shard[shard_00000]"]
    starts = [e.step_key for e in result.all_events if e.event_type_value == "STEP_START"]
    assert starts.count("shard_results.run_shard[shard_00001]") == 1
    results = pl.read_parquet(f"{tmp_path}/outputs/b2/results/**/*.parquet", hive_partitioning=True).sort("shard")
    assert results["attempt"].to_list() == [2, 2, 2, 1, 1]
    assert "error" not in results["status"].to_list()  # the retry ran on a fresh engine


def test_unreadable_input_fails_the_plan_with_the_file_named(batch_model, tmp_path):
    (tmp_path / "inputs" / "b3").mkdir(parents=True)
    (tmp_path / "inputs" / "b3" / "broken.parquet").write_bytes(b"PAR1 not really")
    with dg.instance_for_test() as instance:
        result = materialize(tmp_path, batch_model, instance, batch="b3")
    assert not result.success
    (failure,) = [e for e in result.all_events if e.event_type_value == "STEP_FAILURE"]
    assert failure.step_key == "shard_plan" and "broken.parquet" in failure.event_specific_data.error.message


def test_missing_batch_fails_with_where_it_looked(batch_model, tmp_path):
    with dg.instance_for_test() as instance:
        result = materialize(tmp_path, batch_model, instance, batch="nothing")
    assert not result.success
    (failure,) = [e for e in result.all_events if e.event_type_value == "STEP_FAILURE"]
    assert "no batch 'nothing'" in failure.event_specific_data.error.message


def test_bad_pass_through_types_stay_rows(batch_model, tmp_path):
    """A wrong-typed job column makes invalid rows, not a failed plan (schema errors per row)."""
    table = pa.table({"job_id": ["x", "y"], "prompt": ["a", "b"], "max_steps": ["three", "four"]})
    write_jobs(tmp_path / "inputs" / "b4" / "jobs.parquet", table)
    with dg.instance_for_test() as instance:
        result = materialize(tmp_path, batch_model, instance, batch="b4")
    assert result.success
    report = metadata(result, "batch_report")
    assert report["invalid_rows"] == 2 and "wrong_type" in report["invalid_by_error"]
    assert checks(result)[ROWS_CHECK].passed


def test_rewritten_batch_with_fewer_rows_and_other_columns_reports_only_its_rows(batch_model, tmp_path):
    path = write_jobs(tmp_path / "inputs" / "b7" / "jobs.parquet")  # five rows: shards 0 and 1
    with dg.instance_for_test() as instance:
        assert materialize(tmp_path, batch_model, instance, batch="b7").success
        write_jobs(path, pa.table({"job_id": ["solo"], "prompt": ["Hi"], "region": ["eu"]}))
        result = materialize(tmp_path, batch_model, instance, batch="b7")
    assert result.success
    assert metadata(result, "shard_plan")["stale_shards_removed"] == 1
    output = tmp_path / "outputs" / "b7"
    assert sorted(p.name for p in (output / "manifests").iterdir()) == ["shard=00000.json"]
    assert sorted(p.name for p in (output / "results").iterdir()) == ["shard=00000"]
    results = pl.read_parquet(f"{output}/results/**/*.parquet", hive_partitioning=True)
    assert results["job_id"].to_list() == ["solo"] and results["region"].to_list() == ["eu"]
    assert metadata(result, "batch_report")["rows"] == 1 and checks(result)[ROWS_CHECK].passed
    assert json.loads((output / "summary.json").read_text())["rows"] == 1


def test_readme_polars_snippet_reads_the_outputs(materialized, capsys):
    root, _, _ = materialized
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    section = readme[readme.index("## Dagster") :]
    snippet = section[section.index("```python\n") + len("```python\n") :]
    snippet = snippet[: snippet.index("```")]
    line = 'root, batch = "workspace/storage", "my-batch"'
    assert line in snippet
    exec(snippet.replace(line, f"root, batch = {str(root)!r}, 'b1'"), {})
    printed = capsys.readouterr().out
    # What the snippet prints is what the outputs hold, whichever model wrote them.
    output = root / "outputs" / "b1"
    tasks = pl.read_parquet(f"{output}/results/**/*.parquet", hive_partitioning=True)["task"].drop_nulls().unique()
    traces = pl.read_parquet(f"{output}/traces/**/*.parquet").filter(pl.col("operation") == "execute_tool")
    tools = traces["tool_name"].unique()
    assert tasks.len() and tools.len()
    assert all(task in printed for task in tasks) and all(tool in printed for tool in tools)


class CountingEngine(ScriptedEngine):
    builds: ClassVar[list[str]] = []

    def build(self, model: str, config: EngineConfig, storage_options=None) -> Engine:
        CountingEngine.builds.append(model)
        return super().build(model, config, storage_options)


def test_model_loads_once_per_run_process(batch_model, tmp_path):
    write_jobs(tmp_path / "inputs" / "b5" / "jobs.parquet")
    with dg.instance_for_test() as instance:
        result = materialize(tmp_path, batch_model, instance, batch="b5", engine=CountingEngine())
    assert result.success and len(result.get_step_success_events()) >= 6  # two shard steps among them
    assert CountingEngine.builds == [batch_model]
