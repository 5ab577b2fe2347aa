"""A whole batch without dagster: plan shards, run each shard's episodes through one engine, write the outputs."""

from __future__ import annotations

import hashlib
import logging
import time
from typing import Any

import msgspec
import pyarrow as pa
from tqdm import tqdm

from k2batch.agent.episode import Budgets, EpisodeOutcome, EpisodeSpec, registry_caller, run_episodes
from k2batch.agent.tools import TOOLS, ToolContext, ToolRegistry, ToolSettings
from k2batch.agent.tools.python_sandbox import require_sandbox
from k2batch.config import BatchConfig, config_hash, load_config
from k2batch.engine import Engine
from k2batch.metrics import engine_work, total_work, write_summary
from k2batch.records import MAX_SEED, Job, Result, RunInfo, results_table, traces_table, validate_jobs
from k2batch.shards import (
    Shard,
    ShardManifest,
    completed_shards,
    new_manifest,
    plan_shards,
    read_shard_rows,
    remove_stale_shards,
    start_attempt,
    write_shard_outputs,
)

log = logging.getLogger(__name__)


def context_budget(config: BatchConfig, engine: Engine) -> int:
    return min(config.agent.max_context_tokens or engine.max_model_len, engine.max_model_len)


def episode_spec(job: Job, config: BatchConfig, engine: Engine, registry: ToolRegistry = TOOLS) -> EpisodeSpec:
    """A valid job with the config's defaults filled in: system prompt, tools, sampling, budgets."""
    messages = list(job.messages) if job.messages else [{"role": "user", "content": job.prompt}]
    if messages[0]["role"] != "system":
        messages.insert(0, {"role": "system", "content": job.system or config.system_prompt(job.task)})
    elif job.system:
        messages[0] = {"role": "system", "content": job.system}
    # A seed from the job id, not its position, so a job samples the same tokens in any shard layout.
    own_seed = int(hashlib.sha256(job.job_id.encode()).hexdigest()[:8], 16)
    return EpisodeSpec(
        job_id=job.job_id,
        task=job.task,
        messages=messages,
        tools=job.tools,
        tool_schemas=registry.schemas(job.tools),
        temperature=config.sampling.temperature if job.temperature is None else job.temperature,
        top_p=config.sampling.top_p if job.top_p is None else job.top_p,
        top_k=config.sampling.top_k,
        seed=job.seed if job.seed is not None else (config.sampling.seed + own_seed) % MAX_SEED,
        budgets=Budgets(
            max_steps=job.max_steps or config.agent.max_steps,
            max_new_tokens=job.max_new_tokens or config.sampling.max_new_tokens,
            max_new_tokens_per_episode=config.agent.max_new_tokens_per_episode,
            max_context_tokens=context_budget(config, engine),
            hidden_tool_result=config.agent.hidden_tool_result_placeholder,
        ),
        heavy=job.heavy or config.agent.heavy,
        aggregation=config.agent.heavy_aggregation,
        source_file=job.source_file,
        source_row=job.source_row,
    )


def run_shard(
    engine: Engine,
    shard: Shard,
    output_uri: str,
    config: BatchConfig,
    registry: ToolRegistry = TOOLS,
    *,
    attempt: int | None = None,
) -> ShardManifest:
    """Validate a shard's rows, run its jobs' episodes, write results, traces and (last) the manifest.

    Results and the manifest record the attempt: `attempt` when the caller counts its tries (an orchestrator's
    retries), else the count of starts under `output_uri` (shards.start_attempt), crashed runs included."""
    options = config.storage.options
    hashed = config_hash(config)
    attempt = start_attempt(output_uri, shard, hashed, options, attempt=attempt)
    manifest = new_manifest(shard, hashed, attempt)
    started = time.perf_counter()
    inputs = read_shard_rows(shard, options)
    tokenizer = engine.tokenizer
    jobs, invalid = validate_jobs(
        inputs,
        known_tools=registry.names(),
        default_tools=config.tools.enabled,
        count_tokens=lambda text: len(tokenizer.encode(text)),
        max_prompt_tokens=context_budget(config, engine),
    )
    specs = []
    for job in jobs:
        try:
            specs.append(episode_spec(job, config, engine, registry))
        except Exception as error:  # one job that cannot start must not end the shard
            invalid.append(_row_error(job.job_id, job.task, job.source_file, job.source_row, "episode_error", error))
    settings = ToolSettings.from_config(config.tools)
    if any("python" in spec.tools for spec in specs):
        require_sandbox(settings)  # before any episode runs: no python tool without the isolation it promises
    contexts = {
        spec.job_id: ToolContext.for_job(spec.job_id, spec.task or "default", settings, options) for spec in specs
    }
    call_tool = registry_caller(
        registry,
        contexts,
        {spec.job_id: spec.tools for spec in specs},
        timeout_s=config.agent.tool_timeout_s,
        max_result_chars=config.agent.max_tool_result_chars,
    )
    # disable=None: a bar on a terminal, nothing in a log file or a Dagster step's captured output.
    bar = tqdm(
        total=shard.num_rows, initial=len(invalid), desc=f"shard {shard.index}", dynamic_ncols=True, disable=None
    )

    def done(outcome: EpisodeOutcome) -> None:
        bar.update(1)
        bar.set_postfix(status=outcome.result.status)

    outcomes = run_episodes(engine, tokenizer, specs, call_tool, tool_workers=config.agent.tool_workers, on_done=done)
    bar.close()
    run = RunInfo(model=config.model, config_hash=manifest.config_hash, shard=shard.index, attempt=manifest.attempt)
    results, traces = output_tables(outcomes, invalid, run, inputs)
    manifest = msgspec.structs.replace(manifest, timings={"run_s": time.perf_counter() - started})
    return write_shard_outputs(output_uri, shard.index, results, traces, manifest, options)


def _row_error(
    job_id: str | None, task: str | None, source_file: str, source_row: int, error_type: str, error: Exception
) -> Result:
    return Result(
        job_id=job_id,
        task=task,
        status="error",
        error_type=error_type,
        error_message=f"{type(error).__name__}: {error}",
        source_file=source_file,
        source_row=source_row,
    )


def output_tables(
    outcomes: list[EpisodeOutcome], invalid: list[Result], run: RunInfo, inputs: pa.Table
) -> tuple[pa.Table, pa.Table]:
    """The shard's results and traces tables. An episode whose result or spans do not fit their columns (a
    number out of int64 range, say) becomes an error row without spans, so one job cannot fail the shard."""
    try:
        return (
            results_table([o.result for o in outcomes] + invalid, run, inputs),
            traces_table([span for o in outcomes for span in o.spans]),
        )
    except Exception as error:
        log.warning("shard %d: the outputs do not encode (%s); looking for the rows at fault", run.shard, error)
    kept: list[EpisodeOutcome] = []
    for outcome in outcomes:
        try:
            results_table([outcome.result], run)
            traces_table(outcome.spans)
            kept.append(outcome)
        except Exception as error:
            result = outcome.result
            log.warning("job %s: its outputs do not encode: %s", result.job_id, error)
            failed = _row_error(
                result.job_id, result.task, result.source_file, result.source_row, "unencodable_output", error
            )
            kept.append(EpisodeOutcome(result=failed, spans=[]))
    return (
        results_table([o.result for o in kept] + invalid, run, inputs),
        traces_table([span for o in kept for span in o.spans]),
    )


def run_batch(
    input_uri: str, output_uri: str, config: BatchConfig | None = None, *, engine: Engine | None = None
) -> dict[str, Any]:
    """Run every shard not yet complete, then write the batch summary (metrics.BatchSummary) and return it as
    summary.json holds it."""
    config = config or load_config()
    options = config.storage.options
    plan = plan_shards(input_uri, config.shards.rows_per_shard, options)
    remove_stale_shards(output_uri, plan, options)
    done = completed_shards(output_uri, plan, config_hash(config), options)
    todo = [shard for shard in plan.shards if shard.index not in done]
    log.info("%d shards, %d complete, %d to run", len(plan.shards), len(done), len(todo))
    works, ranks = [], None
    if todo:
        own = engine is None  # an engine built here is stopped here (its rank processes, if it has any)
        engine = engine or Engine.from_pretrained(config.model, config.engine, config.storage.options)
        try:
            for shard in todo:
                before = msgspec.to_builtins(engine.stats)
                manifest = run_shard(engine, shard, output_uri, config)
                works.append(engine_work(before, msgspec.to_builtins(engine.stats)))
                log.info("shard %d: %s", shard.index, manifest.rows_by_status)
        finally:
            if own:
                engine.close()
        if engine.placement is not None:
            # Per rank: requests placed there (the spread over the batch), tokens, cache hits, preemptions.
            ranks = [
                {"requests": placed, **msgspec.to_builtins(stats)}
                for placed, stats in zip(engine.placement.placed, engine.rank_stats)
            ]
    summary = write_summary(output_uri, config, shards=len(plan.shards), engine=total_work(works), ranks=ranks)
    return msgspec.to_builtins(summary)
