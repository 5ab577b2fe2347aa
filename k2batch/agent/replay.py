"""Replay one recorded episode from its trace alone, answering its tool calls with the recorded results, and compare
the generated token ids step by step."""

from __future__ import annotations

import json

import msgspec
import polars as pl

from k2batch.agent.episode import Budgets, EpisodeSpec, recorded_caller, run_episodes
from k2batch.config import BatchConfig
from k2batch.engine import Engine
from k2batch.records import TraceSpan
from k2batch.storage import join, polars_storage_options


class StepComparison(msgspec.Struct, frozen=True):
    step: int
    recorded_tokens: int
    replayed_tokens: int
    same: bool
    """The same generated token ids (a vote, which generates none: the same answer)."""
    trajectory: int | None = 0
    """Which trajectory of a heavy job; None: its aggregation."""

    @property
    def label(self) -> str:
        if self.trajectory is None:
            return f"aggregation step {self.step}"
        return f"trajectory {self.trajectory} step {self.step}" if self.trajectory else f"step {self.step}"


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


def recorded_spec(job_id: str, task: str | None, spans: list[TraceSpan]) -> EpisodeSpec:
    """The job as it started, from its (first trajectory's) step-0 chat span: conversation, tools, sampling, seed
    and budgets; for a heavy job also its trajectories and how they were aggregated."""
    first = next((s for s in spans if s.operation == "chat" and s.step == 0 and not s.trajectory), None)
    recorded = first and (
        first.input_messages,
        first.tool_definitions,
        first.episode_budgets,
        first.request_temperature,
        first.request_top_p,
        first.request_top_k,
        first.request_seed,
    )
    if not recorded or None in recorded:
        raise ValueError(
            f"job {job_id!r}: its trace does not record how the episode started (written by an older k2batch?); "
            "run the batch again to replay it"
        )
    messages, tools, budgets, temperature, top_p, top_k, seed = recorded
    schemas = json.loads(tools)
    trajectories = {s.trajectory for s in spans if s.trajectory is not None}
    aggregation = next((json.loads(s.aggregation) for s in spans if s.aggregation), {"method": "model"})
    return EpisodeSpec(
        job_id=job_id,
        task=task,
        messages=json.loads(messages),
        tools=tuple(schema["function"]["name"] for schema in schemas),
        tool_schemas=schemas,
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        seed=seed,  # step k samples with seed + k, as it did in the batch; other trajectories' seeds follow from it
        budgets=msgspec.json.decode(budgets, type=Budgets),
        heavy=max(trajectories, default=0) + 1,
        aggregation=aggregation["method"],
    )


def replay_job(output_uri: str, job_id: str, config: BatchConfig, engine: Engine | None = None) -> ReplayReport:
    """Re-run job `job_id` of a batch from its trace, with the recorded sampling settings and seeds (a sampled run
    replays as exactly as a greedy one) and the recorded tool results. `config` gives the model and engine."""
    # Rows that repeat a job_id are invalid results under the same id: the run is the one that is not.
    ran = (pl.col("job_id") == job_id) & (pl.col("status") != "invalid")
    result = _scan(output_uri, "results", config).filter(ran).collect()
    if result.height != 1:
        raise ValueError(f"{output_uri} has no run result for job {job_id!r}")
    names = {field.name for field in msgspec.structs.fields(TraceSpan)}
    traces = _scan(output_uri, "traces", config).filter(pl.col("job_id") == job_id).collect()
    spans = [msgspec.convert({k: v for k, v in r.items() if k in names}, TraceSpan) for r in traces.to_dicts()]
    spec = recorded_spec(job_id, result["task"][0], spans)
    engine = engine or Engine.from_pretrained(config.model, config.engine, config.storage.options)
    (outcome,) = run_episodes(engine, engine.tokenizer, [spec], recorded_caller(spans))
    return ReplayReport(job_id, compare(spans, outcome.spans), result["status"][0], outcome.result.status)


def compare(recorded: list[TraceSpan], replayed: list[TraceSpan]) -> list[StepComparison]:
    """Every generating span of the recording (each trajectory's chat steps, then the aggregation) against the
    replay's span of the same trajectory and step; a step only one side has is a difference."""

    def generating(spans: list[TraceSpan]) -> dict[tuple[int, int], TraceSpan]:
        # The aggregation sorts after every trajectory.
        return {
            (1 << 30 if s.trajectory is None else s.trajectory, s.step): s
            for s in spans
            if s.operation in ("chat", "aggregate")
        }

    old, new = generating(recorded), generating(replayed)
    comparisons = []
    for key in sorted(old.keys() | new.keys()):
        before, after = old.get(key), new.get(key)
        span = before or after
        assert span is not None
        if before is not None and after is not None:
            tokens = before.output_token_ids is not None or after.output_token_ids is not None
            same = before.output_token_ids == after.output_token_ids if tokens else before.content == after.content
        else:
            same = False
        comparisons.append(
            StepComparison(
                step=span.step,
                recorded_tokens=len(before.output_token_ids or []) if before else 0,
                replayed_tokens=len(after.output_token_ids or []) if after else 0,
                same=same,
                trajectory=span.trajectory,
            )
        )
    return comparisons
