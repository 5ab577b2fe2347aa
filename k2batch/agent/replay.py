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
    """The same generated token ids."""


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
    """The episode as it started, from its step-0 chat span: conversation, tools, sampling, seed and budgets."""
    first = next((s for s in spans if s.operation == "chat" and s.step == 0), None)
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
    return EpisodeSpec(
        job_id=job_id,
        task=task,
        messages=json.loads(messages),
        tools=tuple(schema["function"]["name"] for schema in schemas),
        tool_schemas=schemas,
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        seed=seed,  # step k samples with seed + k, as it did in the batch
        budgets=msgspec.json.decode(budgets, type=Budgets),
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
    recorded = sorted((s for s in spans if s.operation == "chat"), key=lambda s: s.step)
    replayed = [s for s in outcome.spans if s.operation == "chat"]
    steps = [
        StepComparison(
            step=old.step,
            recorded_tokens=len(old.output_token_ids or []),
            replayed_tokens=len(new.output_token_ids or []) if new else 0,
            same=new is not None and old.output_token_ids == new.output_token_ids,
        )
        for old, new in zip(recorded, replayed + [None] * (len(recorded) - len(replayed)), strict=False)
    ]
    if len(replayed) > len(recorded):
        steps.append(StepComparison(len(recorded), 0, replayed[len(recorded)].output_tokens or 0, False))
    return ReplayReport(job_id, steps, result["status"][0], outcome.result.status)
