"""The inputs sensor (build_sensor_context) and the nightly schedule (build_schedule_context) on a local root."""

from __future__ import annotations

import os
from datetime import UTC, datetime

import dagster as dg
import pyarrow as pa
import pytest
from dagster._core.test_utils import create_run_for_test

from k2batch.pipelines.assets import batches
from k2batch.pipelines.batches import list_batches
from k2batch.pipelines.definitions import build_definitions
from k2batch.pipelines.resources import StorageResource
from k2batch.pipelines.schedules import nightly_schedule
from k2batch.pipelines.sensors import RUN_KEY_TAG, InputsCursor, inputs_sensor
from k2batch.pipelines.settings import load_settings
from k2batch.storage import FileInfo
from tests.pipelines.conftest import RUN_SETTINGS, write_jobs

batch_inputs = inputs_sensor(minimum_interval_s=30)
nightly_batches = nightly_schedule(load_settings().nightly)


class Inputs:
    """A storage root, and ticks of the sensor over it that carry the cursor from one tick to the next."""

    def __init__(self, root, instance):
        self.root, self.instance, self.cursor = root, instance, None

    def write(self, relative: str, table: pa.Table | None = None, mtime: float | None = None):
        path = write_jobs(self.root / "inputs" / relative, *([table] if table is not None else []))
        if mtime is not None:
            os.utime(path, (mtime, mtime))
        return path

    def tick(self) -> dg.SensorResult:
        """One evaluation of the sensor; its requests become runs on the instance, as the daemon makes them."""
        resources = {"storage": StorageResource(root=str(self.root)), "settings": RUN_SETTINGS}
        context = dg.build_sensor_context(instance=self.instance, cursor=self.cursor, resources=resources)
        result = batch_inputs(context)
        self.cursor = result.cursor
        for request in result.run_requests or []:
            tags = {**request.tags, RUN_KEY_TAG: request.run_key, "dagster/partition": request.partition_key}
            create_run_for_test(self.instance, job_name="batch_job", status=dg.DagsterRunStatus.SUCCESS, tags=tags)
        return result

    def runs(self, batch: str) -> list[dg.DagsterRun]:
        return self.instance.get_runs(dg.RunsFilter(tags={"dagster/partition": batch}))


@pytest.fixture
def inputs(tmp_path):
    with dg.instance_for_test() as instance:
        yield Inputs(tmp_path, instance)


def requested(result: dg.SensorResult) -> dict[str, str]:
    return {request.partition_key: request.run_key for request in result.run_requests or []}


def test_new_file_launches_once(inputs):
    inputs.write("b1/part-0.parquet")
    first = inputs.tick()
    assert list(requested(first)) == ["b1"]
    (added,) = first.dynamic_partitions_requests
    assert added.partitions_def_name == batches.name and list(added.partition_keys) == ["b1"]
    assert requested(inputs.tick()) == {} and requested(inputs.tick()) == {}


def test_modified_file_is_picked_up_with_a_new_run_key(inputs):
    inputs.write("b1/part-0.parquet", mtime=1_000_000.0)
    first = requested(inputs.tick())
    inputs.write("b1/part-0.parquet", pa.table({"job_id": ["z"], "prompt": ["changed"]}), mtime=1_000_100.0)
    second = requested(inputs.tick())
    assert list(second) == ["b1"] and second["b1"] != first["b1"]
    rewritten = list_batches(str(inputs.root)).batches["b1"]
    assert second["b1"] == f"inputs:b1:{rewritten.fingerprint}"  # the run is of the file as it is now
    assert requested(inputs.tick()) == {} and len(inputs.runs("b1")) == 2


def test_unchanged_file_is_never_relaunched(inputs):
    path = inputs.write("b1/part-0.parquet", mtime=1_000_000.0)
    first = requested(inputs.tick())
    assert list(first) == ["b1"]
    os.utime(path, (1_000_050.0, 1_000_050.0))  # touched: newer, same bytes
    assert requested(inputs.tick()) == {}
    inputs.write("b2/part-0.parquet", mtime=2_000_000.0)  # b1 drops out of the cursor's window
    assert list(requested(inputs.tick())) == ["b2"]
    os.utime(path, (3_000_000.0, 3_000_000.0))  # touched again, long after: looked at, same content
    again = inputs.tick()
    assert requested(again) == {} and again.skip_reason is not None  # its run key has a run already
    assert [run.tags[RUN_KEY_TAG] for run in inputs.runs("b1")] == [first["b1"]]


def test_non_parquet_files_are_ignored(inputs):
    (inputs.root / "inputs" / "b2").mkdir(parents=True)
    (inputs.root / "inputs" / "b2" / "notes.csv").write_text("job_id,prompt\nx,y\n")
    (inputs.root / "inputs" / "readme.txt").write_text("drop Parquet files here")
    result = inputs.tick()
    assert requested(result) == {} and result.skip_reason is not None
    inputs.write("b3/part-0.parquet")  # the cursor of a tick that saw no Parquet file reads back
    assert list(requested(inputs.tick())) == ["b3"]


def test_late_listed_file_older_than_the_cursor_is_not_missed(inputs):
    inputs.write("b1/part-0.parquet", mtime=1_000_000.0)
    inputs.tick()
    # An upload that started before b1's (object stores stamp the start) but was listed only now.
    inputs.write("b2/part-0.parquet", mtime=999_990.0)
    assert list(requested(inputs.tick())) == ["b2"]


def test_same_mtime_other_key_is_not_missed(inputs):
    inputs.write("b2/part-0.parquet", mtime=1_000_000.0)
    inputs.tick()
    inputs.write("b1/part-0.parquet", mtime=1_000_000.0)  # sorts before b2, same second
    assert list(requested(inputs.tick())) == ["b1"]


def test_single_files_are_batches_and_nightly_waits_for_the_schedule(inputs):
    inputs.write("b3.parquet")
    inputs.write("nightly/n1/part-0.parquet")
    assert list(requested(inputs.tick())) == ["b3"]


def test_added_file_relaunches_its_batch(inputs):
    inputs.write("b1/part-0.parquet", mtime=1_000_000.0)
    first = requested(inputs.tick())
    inputs.write("b1/part-1.parquet", mtime=1_000_100.0)
    second = requested(inputs.tick())
    assert list(second) == ["b1"] and second["b1"] != first["b1"]


def test_ambiguous_batch_name_does_not_run(inputs):
    inputs.write("b1/part-0.parquet")
    inputs.write("nightly/b1.parquet")
    inputs.write("b2.parquet")
    assert list(requested(inputs.tick())) == ["b2"]


def test_cursor_keeps_only_recent_fingerprints():
    cursor = InputsCursor()
    files = [FileInfo(f"r/inputs/b{k}.parquet", 1, 1000.0 * k, f"e{k}") for k in range(5)]
    changed, after = cursor.advance(files, lookback_s=1500.0)
    assert (
        len(changed) == 5
        and after.mtime == 4000.0
        and sorted(after.seen) == ["r/inputs/b3.parquet", "r/inputs/b4.parquet"]
    )


def test_nightly_schedule_runs_queued_batches_not_yet_run(tmp_path):
    write_jobs(tmp_path / "inputs" / "nightly" / "n1" / "part-0.parquet")
    write_jobs(tmp_path / "inputs" / "nightly" / "n2.parquet")
    write_jobs(tmp_path / "inputs" / "b1" / "part-0.parquet")  # the sensor's, not the schedule's
    (tmp_path / "outputs" / "n2").mkdir(parents=True)
    (tmp_path / "outputs" / "n2" / "summary.json").write_text("{}")  # n2 ran already
    defs = build_definitions(storage=StorageResource(root=str(tmp_path)))
    with dg.instance_for_test() as instance:
        context = dg.build_schedule_context(
            instance=instance,
            resources={"storage": StorageResource(root=str(tmp_path))},
            scheduled_execution_time=datetime(2026, 11, 23, 2, 0, tzinfo=UTC),
            repository_def=defs.get_repository_def(),
        )
        data = nightly_batches.evaluate_tick(context)
        (request,) = data.run_requests
        assert request.partition_key == "n1" and request.run_key.startswith("nightly-2026-11-23:n1:")
        assert instance.get_dynamic_partitions(batches.name) == ["n1"]
        (tmp_path / "outputs" / "n1").mkdir(parents=True)
        (tmp_path / "outputs" / "n1" / "summary.json").write_text("{}")
        assert nightly_batches.evaluate_tick(context).skip_message


def test_nightly_schedule_skips_a_batch_still_running_from_last_night(tmp_path):
    write_jobs(tmp_path / "inputs" / "nightly" / "n1.parquet")
    write_jobs(tmp_path / "inputs" / "nightly" / "n2.parquet")
    storage = StorageResource(root=str(tmp_path))
    defs = build_definitions(storage=storage)
    with dg.instance_for_test() as instance:

        def run_of(batch: str, status: dg.DagsterRunStatus) -> dg.DagsterRun:
            return create_run_for_test(instance, job_name="batch_job", status=status, tags={"dagster/partition": batch})

        # Last night's run of n1 is still going (no summary.json yet); tonight's tick must not start another.
        last_night = run_of("n1", dg.DagsterRunStatus.STARTED)
        run_of("n2", dg.DagsterRunStatus.FAILURE)

        def tick(day: int):
            return nightly_batches.evaluate_tick(
                dg.build_schedule_context(
                    instance=instance,
                    resources={"storage": storage},
                    scheduled_execution_time=datetime(2026, 11, day, 2, 0, tzinfo=UTC),
                    repository_def=defs.get_repository_def(),
                )
            )

        tonight = tick(24)
        assert [request.partition_key for request in tonight.run_requests] == ["n2"]  # a failed run resumes
        run_of("n2", dg.DagsterRunStatus.STARTING)  # launched by hand, say
        skipped = tick(24)
        assert not skipped.run_requests and "n1, n2 still running" in skipped.skip_message
        instance.report_run_failed(instance.get_run_by_id(last_night.run_id))
        assert "n1" in [request.partition_key for request in tick(25).run_requests]


def test_nightly_schedule_cron_and_timezone_come_from_the_settings():
    settings = load_settings()
    schedule = build_definitions(settings=settings).resolve_schedule_def("nightly_batches")
    assert schedule.cron_schedule == settings.nightly.cron
    assert schedule.execution_timezone == settings.nightly.timezone


def test_names_that_cannot_be_partition_keys_are_ignored(inputs):
    inputs.write("my batch/part-0.parquet")
    inputs.write("ok-batch_1.v2/part-0.parquet")
    assert list(requested(inputs.tick())) == ["ok-batch_1.v2"]
