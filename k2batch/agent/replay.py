"""Replay one recorded episode greedily, answering its tool calls with the recorded results, and compare steps."""

from __future__ import annotations

import msgspec
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from k2batch.agent.batch import episode_spec
from k2batch.agent.episode import recorded_caller, run_episodes
from k2batch.agent.tools import TOOLS
from k2batch.config import BatchConfig
from k2batch.engine import Engine
from k2batch.records import ROW_COLUMN, SOURCE_COLUMN, TraceSpan, validate_jobs
from k2batch.storage import filesystem, join, polars_storage_options


class StepComparison(msgspec.Struct, frozen=True):
    step: int
    recorded_tokens: int
    replayed_tokens: int
    same: bool
    """Same number of output tokens, reasoning and content."""


class ReplayReport(msgspec.Struct, frozen=True):
    job_id: str
    steps: list[StepComparison]
    recorded_status: str
    replayed_status: str

    @property
    def matches(self) -> bool:
        return self.recorded_status == self.replayed_status and all(s.same for s in self.steps) and bool(self.steps)


def _scan(output_uri: str, kind: str, config: BatchConfig) -> pl.LazyFrame:
    options = polars_storage_options(output_uri, config.storage.options) or None
    return pl.scan_parquet(join(output_uri, kind, "**", "*.parquet"), hive_partitioning=True, storage_options=options)


def replay_job(output_uri: str, job_id: str, config: BatchConfig, engine: Engine | None = None) -> ReplayReport:
    """Re-run job `job_id` of a finished batch with temperature 0 and its recorded tool results."""
    result = _scan(output_uri, "results", config).filter(pl.col("job_id") == job_id).collect()
    if result.height != 1 or result["status"][0] == "invalid":
        raise ValueError(f"{output_uri} has no run result for job {job_id!r}")
    source, row = result["source_file"][0], result["source_row"][0]
    fs, path = filesystem(source, config.storage.options)
    with fs.open(path, "rb") as handle:
        table = pq.read_table(handle).slice(row, 1)
    table = table.append_column(SOURCE_COLUMN, pa.array([source])).append_column(ROW_COLUMN, pa.array([row]))
    (job,), _ = validate_jobs(table, known_tools=TOOLS.names(), default_tools=config.tools.enabled)
    spans_frame = _scan(output_uri, "traces", config).filter(pl.col("job_id") == job_id).collect()
    names = {field.name for field in msgspec.structs.fields(TraceSpan)}
    spans = [msgspec.convert({k: v for k, v in r.items() if k in names}, TraceSpan) for r in spans_frame.to_dicts()]
    engine = engine or Engine.from_pretrained(config.model, config.engine)
    spec = msgspec.structs.replace(episode_spec(job, config, engine), temperature=0.0)
    (outcome,) = run_episodes(engine, engine.tokenizer, [spec], recorded_caller(spans))
    recorded = sorted((s for s in spans if s.operation == "chat"), key=lambda s: s.step)
    replayed = [s for s in outcome.spans if s.operation == "chat"]
    steps = [
        StepComparison(
            step=old.step,
            recorded_tokens=old.output_tokens or 0,
            replayed_tokens=(new.output_tokens or 0) if new else 0,
            same=new is not None
            and (old.output_tokens, old.reasoning_content, old.content)
            == (new.output_tokens, new.reasoning_content, new.content),
        )
        for old, new in zip(recorded, replayed + [None] * (len(recorded) - len(replayed)), strict=False)
    ]
    if len(replayed) > len(recorded):
        steps.append(StepComparison(len(recorded), 0, replayed[len(recorded)].output_tokens or 0, False))
    return ReplayReport(job_id, steps, result["status"][0], outcome.result.status)
