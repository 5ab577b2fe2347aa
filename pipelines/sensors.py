"""The inputs sensor: a new or changed Parquet file under {root}/inputs/ adds its batch's partition and runs it."""

import dagster as dg
import msgspec

from k2batch.pipelines.assets import batch_job, batches
from k2batch.pipelines.batches import BatchInput, batch_of, inputs_uri, list_batches
from k2batch.pipelines.resources import RunSettings, StorageResource
from k2batch.storage import FileInfo, list_files

RUN_KEY_TAG = "dagster/run_key"  # the sensor daemon tags each run it launches with its request's run key


class InputsCursor(msgspec.Struct, frozen=True):
    """The newest last-modified time seen, and the fingerprints of the files modified within the lookback
    before it: a file is new or changed when it is in that window (or later) and its fingerprint differs."""

    mtime: float = 0.0
    """Unix seconds (JSON has no -inf: before the first file, the epoch)."""
    seen: dict[str, str] = {}

    @classmethod
    def decode(cls, text: str | None) -> "InputsCursor":
        return msgspec.json.decode(text, type=cls) if text else cls()

    def encode(self) -> str:
        return msgspec.json.encode(self).decode()

    def advance(self, files: list[FileInfo], lookback_s: float) -> tuple[list[FileInfo], "InputsCursor"]:
        """Files new or changed since this cursor, and the cursor after them."""
        horizon = self.mtime - lookback_s
        changed = [f for f in files if f.mtime > horizon and self.seen.get(f.uri) != f.etag_or_hash]
        newest = max([self.mtime, *(f.mtime for f in files)])
        seen = {f.uri: f.etag_or_hash for f in files if f.mtime > newest - lookback_s}
        return changed, InputsCursor(mtime=newest, seen=seen)


def run_request(batch: BatchInput, source: str) -> dg.RunRequest:
    """A run of `batch` as its files are now: the same files with the same content never run twice."""
    return dg.RunRequest(
        partition_key=batch.name,
        run_key=f"{source}:{batch.name}:{batch.fingerprint}",
        tags={"k2batch/input": batch.input_uri, "k2batch/fingerprint": batch.fingerprint},
    )


def ran_before(instance: dg.DagsterInstance, request: dg.RunRequest) -> bool:
    """Whether the instance has a run with the request's run key. The daemon would skip the request; asking
    first keeps an unchanged batch out of the tick altogether."""
    return bool(instance.get_run_records(dg.RunsFilter(tags={RUN_KEY_TAG: request.run_key}), limit=1))


def inputs_sensor(minimum_interval_s: int) -> dg.SensorDefinition:
    """The sensor `batch_inputs`, looking at {root}/inputs/ every `minimum_interval_s` seconds."""
    return dg.sensor(
        name="batch_inputs",
        job=batch_job,
        minimum_interval_seconds=minimum_interval_s,
        default_status=dg.DefaultSensorStatus.RUNNING,
    )(batch_inputs)


def batch_inputs(
    context: dg.SensorEvaluationContext, storage: StorageResource, settings: RunSettings
) -> dg.SensorResult:
    """Watches {root}/inputs/ (not inputs/nightly/, which the nightly schedule runs) for Parquet files."""
    options = storage.fsspec_options()
    inputs = inputs_uri(storage.root)
    files = list_files(inputs, options)
    changed, cursor = InputsCursor.decode(context.cursor).advance(files, settings.lookback_s)
    listing = list_batches(storage.root, options, files=files)
    touched = sorted({owner[0] for file in changed if (owner := batch_of(inputs, file)) is not None})
    ready = [listing.batches[name] for name in touched if name in listing.batches]
    requests = [run_request(batch, "inputs") for batch in ready if not batch.nightly]
    # A file looked at again (touched long after, or listed late) whose batch already ran as it is now.
    requests = [request for request in requests if not ran_before(context.instance, request)]
    if not requests:
        return dg.SensorResult(skip_reason=f"no new or changed batch under {inputs}", cursor=cursor.encode())
    names = [request.partition_key for request in requests]
    context.log.info(f"batches to run: {', '.join(names)}")
    return dg.SensorResult(
        run_requests=requests,
        dynamic_partitions_requests=[batches.build_add_request(names)],
        cursor=cursor.encode(),
    )
