"""Assets of a batch (one dynamic partition per batch): the shard plan, the shard results, the report.

shard_results is a graph: one `run_shard` step per shard (dynamic outputs), so a failed shard is retried
alone (RunSettings.max_retries), a shard whose manifest is in place is skipped, and each step can run on its own
machine (a pod per step under k8s_job_executor) since every input a step needs is on the storage root.

Input rows are validated once, by the step that runs them (with the model's tokenizer, for prompt length); the
plan only reads every file in full, so a damaged one fails before any shard runs. The report lists the invalid
rows from the results."""

from collections.abc import Iterator

import dagster as dg
import msgspec
import polars as pl
from pydantic import Field

from k2batch.agent.batch import run_shard
from k2batch.config import BatchConfig, ConfigError, StorageConfig, config_hash
from k2batch.metrics import engine_work, scan_results, total_work, write_summary
from k2batch.pipelines import report
from k2batch.pipelines.batch_config import BatchRunConfig
from k2batch.pipelines.batches import inputs_uri, list_batches, outputs_uri
from k2batch.pipelines.resources import EngineResource, RunSettings, StorageResource
from k2batch.shards import (
    InputError,
    Shard,
    ShardManifest,
    ShardPlan,
    completed_shards,
    manifest_uri,
    plan_shards,
    remove_stale_shards,
    summary_uri,
)
from k2batch.storage import read_json

GROUP = "batch"
ROWS_CHECK = "rows_in_equals_rows_out"
ERROR_RATE_CHECK = "error_rate_below_threshold"
SHOWN_INVALID_ROWS = 20

batches = dg.DynamicPartitionsDefinition(name="batches")


class BatchPlan(msgspec.Struct, frozen=True, kw_only=True):
    """What every later step of a batch needs: where it reads and writes, its config and its shards."""

    batch: str
    input_uri: str
    output_uri: str
    config: BatchConfig
    """The run's config; its storage options carry no secrets (steps add the storage resource's)."""
    plan: ShardPlan


class ShardTask(msgspec.Struct, frozen=True, kw_only=True):
    """One shard step's input: self-contained, so any machine can run it."""

    output_uri: str
    config: BatchConfig
    shard: Shard


class ShardOutcome(msgspec.Struct, frozen=True, kw_only=True):
    """One shard step's output: the shard's manifest, and what its engine did for it (None: skipped)."""

    manifest: ShardManifest
    engine: dict[str, float] | None


def with_storage(config: BatchConfig, storage: StorageResource) -> BatchConfig:
    return msgspec.structs.replace(config, storage=StorageConfig(options=storage.fsspec_options()))


@dg.asset(partitions_def=batches, group_name=GROUP, kinds={"parquet"})
def shard_plan(
    context: dg.AssetExecutionContext, config: BatchRunConfig, storage: StorageResource, settings: RunSettings
) -> dg.Output:
    """The batch's input rows cut into shards, every file read in full: an unreadable file fails the step and
    names it. Rows are checked by the shard steps (bad ones become status "invalid" results, which the report
    lists)."""
    batch = context.partition_key
    options = storage.fsspec_options()
    listing = list_batches(storage.root, options)
    if batch in listing.ambiguous:
        raise dg.Failure(f"batch {batch!r} is claimed by {', '.join(listing.ambiguous[batch])}; rename one")
    if batch not in listing.batches:
        where = inputs_uri(storage.root)
        raise dg.Failure(f"no batch {batch!r}: expected {where}/{batch}/*.parquet or {where}/{batch}.parquet")
    found = listing.batches[batch]
    try:
        batch_config = config.batch_config(settings.base_config())
        plan = plan_shards(found.input_uri, batch_config.shards.rows_per_shard, options)
    except (ConfigError, InputError) as exc:
        raise dg.Failure(str(exc)) from None
    if not plan.shards:
        raise dg.Failure(f"{found.input_uri}: its {len(plan.files)} file(s) hold no rows")
    output = outputs_uri(storage.root, batch)
    # A batch rewritten with fewer rows has fewer shards: the outputs of the others go, or the report would
    # count their rows (and fail on their columns).
    stale = remove_stale_shards(output, plan, options)
    if stale:
        context.log.info(f"removed the outputs of shards {stale} under {output}: the plan has no such shards now")
    stored = msgspec.structs.replace(batch_config, storage=StorageConfig(options=dict(storage.options)))
    value = BatchPlan(batch=batch, input_uri=found.input_uri, output_uri=output, config=stored, plan=plan)
    return dg.Output(
        value,
        metadata={
            "rows": plan.num_rows,
            "shards": len(plan.shards),
            "rows_per_shard": plan.rows_per_shard,
            "files": len(plan.files),
            "empty_files": len(plan.empty_files),
            "duplicate_job_ids": sum(len(shard.duplicates) for shard in plan.shards),
            "stale_shards_removed": len(stale),
            "input": found.input_uri,
            "output": output,
            "model": batch_config.model,
            "config_hash": config_hash(batch_config),
        },
    )


@dg.op(out=dg.DynamicOut(ShardTask))
def split_shards(shard_plan: BatchPlan) -> Iterator[dg.DynamicOutput]:
    """One output per shard, each mapped to its own run_shard step."""
    for shard in shard_plan.plan.shards:
        task = ShardTask(output_uri=shard_plan.output_uri, config=shard_plan.config, shard=shard)
        yield dg.DynamicOutput(task, mapping_key=f"shard_{shard.index:05d}")


@dg.op(name="run_shard", pool="gpu")
def run_shard_step(
    context: dg.OpExecutionContext,
    task: ShardTask,
    storage: StorageResource,
    engine: EngineResource,
    settings: RunSettings,
) -> dg.Output:
    """Run one shard's episodes and write its results, traces and manifest; skipped when its manifest (same
    inputs, same config) is in place. Retried alone when it fails (settings.max_retries times, waiting
    settings.retry_delay_s and twice that for each later retry); the results record the attempt."""
    config = with_storage(task.config, storage)
    options, shard = config.storage.options, task.shard
    alone = ShardPlan(shards=(shard,), files=(), empty_files=(), rows_per_shard=shard.num_rows, num_rows=shard.num_rows)
    skipped = bool(completed_shards(task.output_uri, alone, config_hash(config), options))
    work = None
    if skipped:
        context.log.info(f"shard {shard.index} is complete under {task.output_uri}; skipping it")
        manifest = read_json(manifest_uri(task.output_uri, shard.index), options, type=ShardManifest)
    else:
        loaded = engine.load(config.model, config.engine, config.storage.options)
        before = msgspec.to_builtins(loaded.stats)
        try:
            manifest = run_shard(loaded, shard, task.output_uri, config, attempt=context.retry_number + 1)
        except Exception as error:
            engine.discard()  # requests of the failed attempt may still be queued in it (or its device is lost)
            wait = settings.retry_delay(context.retry_number)
            raise dg.RetryRequested(max_retries=settings.max_retries, seconds_to_wait=wait) from error
        work = engine_work(before, msgspec.to_builtins(loaded.stats))
    return dg.Output(
        ShardOutcome(manifest=manifest, engine=work),
        metadata={
            "shard": shard.index,
            "rows": manifest.rows_out,
            "skipped": skipped,
            "attempt": manifest.attempt,
            "run_s": manifest.timings.get("run_s", 0.0),
            **{f"status_{status}": n for status, n in manifest.rows_by_status.items()},
        },
    )


@dg.op
def gather_shards(outcomes: list[ShardOutcome]) -> list[ShardOutcome]:
    return sorted(outcomes, key=lambda outcome: outcome.manifest.shard)


@dg.graph_asset(partitions_def=batches, group_name=GROUP, kinds={"parquet"})
def shard_results(shard_plan):
    """Results and traces of every shard under outputs/{batch}/ (one run_shard step per shard), and their
    manifests."""
    return gather_shards(split_shards(shard_plan).map(run_shard_step).collect())


class ReportRunConfig(dg.Config):
    max_error_rate: float | None = Field(
        None, description="The error-rate check fails above this fraction of rows; null: the settings resource's."
    )
    error_statuses: list[str] | None = Field(
        None, description="Result statuses that count as errors; null: the settings resource's."
    )


@dg.asset(
    partitions_def=batches,
    group_name=GROUP,
    kinds={"polars"},
    check_specs=[
        dg.AssetCheckSpec(ROWS_CHECK, asset="batch_report", description="Every input row has one result row."),
        dg.AssetCheckSpec(
            ERROR_RATE_CHECK, asset="batch_report", description="Rows with an error status stay under the threshold."
        ),
    ],
)
def batch_report(
    context: dg.AssetExecutionContext,
    config: ReportRunConfig,
    shard_plan: BatchPlan,
    shard_results: list[ShardOutcome],
    storage: StorageResource,
    settings: RunSettings,
) -> dg.MaterializeResult:
    """Batch totals (metrics.BatchSummary: rows per status, tokens, cache hit rate, run times, throughput and
    API-equivalent cost), written as outputs/{batch}/summary.json as `k2batch run` writes it, with the invalid rows,
    a table per task and charts of steps per episode and tokens per task."""
    batch_config = with_storage(shard_plan.config, storage)
    options, output = batch_config.storage.options, shard_plan.output_uri
    engine = total_work([outcome.engine for outcome in shard_results])
    summary = write_summary(output, batch_config, shards=len(shard_plan.plan.shards), engine=engine)
    results = scan_results(output, options)
    tasks = report.tasks_table(results, batch_config.prices)
    invalid = results.filter(pl.col("status") == "invalid")
    by_error = invalid.group_by("error_type").len().sort("error_type").collect()
    shown = (
        invalid.sort("shard", "source_file", "source_row")
        .select("source_file", "source_row", "job_id", "error_type", "error_message")
        .head(SHOWN_INVALID_ROWS)
        .collect()
    )
    by_status = summary.rows_by_status
    max_error_rate = settings.max_error_rate if config.max_error_rate is None else config.max_error_rate
    error_statuses = settings.error_statuses if config.error_statuses is None else config.error_statuses

    rows_in, rows_out = shard_plan.plan.num_rows, summary.rows
    errors = sum(by_status.get(status, 0) for status in error_statuses)
    error_rate = errors / max(rows_out, 1)
    checks = [
        dg.AssetCheckResult(
            check_name=ROWS_CHECK,
            passed=rows_in == rows_out,
            metadata={"rows_in": rows_in, "rows_out": rows_out},
            description=None if rows_in == rows_out else f"{rows_in} input rows but {rows_out} result rows",
        ),
        dg.AssetCheckResult(
            check_name=ERROR_RATE_CHECK,
            passed=error_rate <= max_error_rate,
            metadata={"error_rate": error_rate, "max_error_rate": max_error_rate, "error_rows": errors},
        ),
    ]
    context.log.info(f"batch {shard_plan.batch}: {rows_out} rows {by_status}")
    return dg.MaterializeResult(
        metadata={
            **report.totals(summary),
            "rows_by_status": dg.MetadataValue.md(report.markdown_table(["status", "rows"], sorted(by_status.items()))),
            "invalid_rows": by_status.get("invalid", 0),
            "invalid_by_error": dg.MetadataValue.md(
                report.markdown_table(["error_type", "rows"], by_error.rows()) if by_error.height else "none"
            ),
            "invalid_rows_first": dg.MetadataValue.md(
                report.markdown_table(["file", "row", "job_id", "error_type", "error_message"], shown.rows())
                if shown.height
                else "none"
            ),
            "tasks": dg.MetadataValue.md(report.tasks_markdown(tasks)),
            "steps_per_episode": dg.MetadataValue.md(report.steps_chart(report.steps_histogram(results))),
            "tokens_per_task": dg.MetadataValue.md(report.tokens_chart(tasks)),
            "summary": dg.MetadataValue.path(summary_uri(output)),
            "model": batch_config.model,
        },
        check_results=checks,
    )


batch_job = dg.define_asset_job(
    "batch_job",
    selection=dg.AssetSelection.assets(shard_plan, shard_results, batch_report),
    description="Plan, run and report one batch (a partition of `batches`).",
)
