"""The nightly schedule: every batch queued under {root}/inputs/nightly/ that has not run to its summary yet."""

import dagster as dg

from k2batch.pipelines.assets import batch_job, batches
from k2batch.pipelines.batches import list_batches, outputs_uri
from k2batch.pipelines.resources import StorageResource
from k2batch.pipelines.sensors import run_request
from k2batch.pipelines.settings import NightlySettings
from k2batch.shards import summary_uri
from k2batch.storage import exists

NOT_FINISHED = [
    dg.DagsterRunStatus.QUEUED,
    dg.DagsterRunStatus.NOT_STARTED,
    dg.DagsterRunStatus.STARTING,
    dg.DagsterRunStatus.STARTED,
    dg.DagsterRunStatus.CANCELING,
]


def in_flight(instance: dg.DagsterInstance, batch: str) -> bool:
    """Whether a run of the batch's partition is queued or running: by batch_job, or by a materialization of
    its assets from the UI (another job name, the same partition tag)."""
    runs = dg.RunsFilter(statuses=NOT_FINISHED, tags={"dagster/partition": batch})
    return bool(instance.get_run_records(runs, limit=1))


def nightly_schedule(nightly: NightlySettings) -> dg.ScheduleDefinition:
    """The schedule `nightly_batches`, on the cron and timezone of the settings' [nightly]."""
    return dg.schedule(
        name="nightly_batches",
        job=batch_job,
        cron_schedule=nightly.cron,
        execution_timezone=nightly.timezone,
        default_status=dg.DefaultScheduleStatus.RUNNING,
    )(nightly_batches)


def nightly_batches(context: dg.ScheduleEvaluationContext, storage: StorageResource):
    """A batch without outputs/{batch}/summary.json has not finished: it runs (a failed one resumes, skipping
    its complete shards), unless a run of it is still queued or running. Run keys carry the night, so last
    night's failure runs again tonight."""
    options = storage.fsspec_options()
    queued = [batch for batch in list_batches(storage.root, options).batches.values() if batch.nightly]
    unfinished = [b for b in queued if not exists(summary_uri(outputs_uri(storage.root, b.name)), options)]
    running = [b.name for b in unfinished if in_flight(context.instance, b.name)]
    if running:
        context.log.info(f"still running from an earlier tick or launch: {', '.join(running)}")
    pending = [b for b in unfinished if b.name not in running]
    if not pending:
        waiting = f"; {', '.join(running)} still running" if running else ""
        return dg.SkipReason(f"no batch waiting under {storage.root}/inputs/nightly/{waiting}")
    # Schedules cannot return partition requests: add the partitions here, before the run requests name them.
    context.instance.add_dynamic_partitions(batches.name, [batch.name for batch in pending])
    night = context.scheduled_execution_time.date().isoformat()
    return [run_request(batch, f"nightly-{night}") for batch in pending]
