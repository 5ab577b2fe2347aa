"""The nightly schedule: every batch queued under {root}/inputs/nightly/ that has not run to its summary yet."""

import dagster as dg

from k2batch.shards import summary_uri
from k2batch.storage import exists
from pipelines.assets import SETTINGS, batch_job, batches
from pipelines.batches import list_batches, outputs_uri
from pipelines.resources import StorageResource
from pipelines.sensors import run_request


@dg.schedule(
    job=batch_job,
    cron_schedule=SETTINGS.nightly.cron,
    execution_timezone=SETTINGS.nightly.timezone,
    default_status=dg.DefaultScheduleStatus.RUNNING,
)
def nightly_batches(context: dg.ScheduleEvaluationContext, storage: StorageResource):
    """A batch without outputs/{batch}/summary.json has not finished: it runs (a failed one resumes, skipping
    its complete shards). Run keys carry the night, so last night's failure runs again tonight."""
    options = storage.fsspec_options()
    queued = [batch for batch in list_batches(storage.root, options).batches.values() if batch.nightly]
    pending = [b for b in queued if not exists(summary_uri(outputs_uri(storage.root, b.name)), options)]
    if not pending:
        return dg.SkipReason(f"no batch waiting under {storage.root}/inputs/nightly/")
    # Schedules cannot return partition requests: add the partitions here, before the run requests name them.
    context.instance.add_dynamic_partitions(batches.name, [batch.name for batch in pending])
    night = context.scheduled_execution_time.date().isoformat()
    return [run_request(batch, f"nightly-{night}") for batch in pending]
