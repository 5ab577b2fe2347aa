"""A batch's figures, each computed once, here: token totals, cache hit rate, API-equivalent cost, run times and
throughput. summary.json (which `k2batch run` and the Dagster report write), `k2batch inspect` and the report's
metadata all show these numbers and no others."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import msgspec
import polars as pl

from k2batch.config import BatchConfig, PricesConfig, config_hash
from k2batch.records import RESULT_SCHEMA
from k2batch.shards import ShardManifest, read_manifests, summary_uri
from k2batch.storage import StorageOptions, join, list_uris, polars_storage_options, write_json_atomic


class BatchSummary(msgspec.Struct, frozen=True, kw_only=True):
    """summary.json: totals over every results row of a batch, and its times from the manifests of its complete
    shards (those with a manifest). The last five fields describe the run that wrote it."""

    rows: int
    rows_by_status: dict[str, int]
    steps: int
    tool_calls: int
    prompt_tokens: int
    cached_prompt_tokens: int
    completion_tokens: int
    reasoning_tokens: int
    cache_hit_rate: float
    """Share of the prompt tokens served from the prefix cache."""
    api_cost_usd: float
    """What the tokens would cost at the API's list prices ([prices] of the batch config)."""
    complete_shards: int
    run_s: float
    """Wall time: from the first complete shard's start to the last one's end. Shards may run side by side, and a
    resumed batch's shards in more than one run (the time between the runs counts)."""
    shard_run_s: float
    """The complete shards' run times added up: what one engine spent on them."""
    output_tokens_per_s: float
    """Completion tokens of the complete shards per second of run_s (0 without time)."""
    output_tokens_per_shard_s: float
    """Completion tokens of the complete shards per second of shard_run_s: one engine's rate."""
    shards: int | None = None
    """Shards in the batch's plan; None where only the outputs are known (`k2batch inspect`)."""
    model: str | None = None
    config_hash: str | None = None
    engine: dict[str, Any] | None = None
    """What the engine did for the shards this run ran (EngineStats, summed over them); None when none ran."""
    ranks: list[dict[str, Any]] | None = None
    """Per rank of a data-parallel engine: requests placed there, tokens, cache hits, preemptions."""


def token_totals() -> dict[str, pl.Expr]:
    """Aggregations over a group of results rows: jobs, steps, tool calls and tokens."""
    return {
        "jobs": pl.len(),
        "steps": pl.col("steps").sum(),
        "tool_calls": pl.col("tool_calls").sum(),
        "prompt_tokens": pl.col("prompt_tokens").sum(),
        "cached_prompt_tokens": pl.col("cached_prompt_tokens").sum(),
        "completion_tokens": pl.col("completion_tokens").sum(),
        "reasoning_tokens": pl.col("reasoning_tokens").sum(),
    }


def cache_hit_rate() -> pl.Expr:
    """Over aggregated token_totals: the share of prompt tokens that came from the prefix cache."""
    return pl.col("cached_prompt_tokens") / pl.col("prompt_tokens").clip(lower_bound=1)


def api_cost(prices: PricesConfig) -> pl.Expr:
    """Per results row: US dollars its tokens would cost at the API's list prices (cached input is cheaper)."""
    uncached = pl.col("prompt_tokens") - pl.col("cached_prompt_tokens")
    return (
        uncached * prices.input
        + pl.col("cached_prompt_tokens") * prices.cached_input
        + pl.col("completion_tokens") * prices.output
    ) / 1e6


def figures_by(results: pl.LazyFrame, prices: PricesConfig, *keys: str) -> pl.LazyFrame:
    """Per group of `keys`: token_totals, cost_usd and cache_hit_rate (one row, no keys, for all of them)."""
    sums = {**token_totals(), "cost_usd": api_cost(prices).sum()}
    grouped = results.group_by(*keys).agg(**sums) if keys else results.select(**sums)
    return grouped.with_columns(cache_hit_rate=cache_hit_rate())


def scan_results(output_uri: str, options: StorageOptions = None) -> pl.LazyFrame:
    """Every shard's results, as the documented reader glob gives them; no rows (not an error) when there are none."""
    if not list_uris(join(output_uri, "results"), options):  # a batch without rows writes no shards
        return pl.from_arrow(RESULT_SCHEMA.empty_table()).lazy()
    return pl.scan_parquet(
        join(output_uri, "results", "**", "*.parquet"),
        hive_partitioning=True,
        storage_options=polars_storage_options(output_uri, options) or None,
    )


def _per_second(count: float, seconds: float) -> float:
    return count / seconds if seconds > 0 else 0.0


def summarize(output_uri: str, prices: PricesConfig, options: StorageOptions = None) -> BatchSummary:
    """The figures of the batch under `output_uri` from its results and manifests alone, so a batch that stopped
    before its summary is summarized too (its incomplete shards' rows count, their time does not)."""
    results = scan_results(output_uri, options)
    manifests = read_manifests(output_uri, options)
    totals = figures_by(results, prices).collect().row(0, named=True)
    by_status = results.group_by("status").len().collect()
    complete = [m.shard for m in manifests]
    timed = results.filter(pl.col("shard").is_in(complete)).select(pl.col("completion_tokens").sum()).collect()
    run_s, shard_run_s = wall_time(manifests), sum(m.timings.get("run_s", 0.0) for m in manifests)
    return BatchSummary(
        rows=totals["jobs"],
        rows_by_status=dict(sorted(zip(by_status["status"], by_status["len"], strict=True))),
        steps=totals["steps"] or 0,
        tool_calls=totals["tool_calls"] or 0,
        prompt_tokens=totals["prompt_tokens"] or 0,
        cached_prompt_tokens=totals["cached_prompt_tokens"] or 0,
        completion_tokens=totals["completion_tokens"] or 0,
        reasoning_tokens=totals["reasoning_tokens"] or 0,
        cache_hit_rate=totals["cache_hit_rate"] or 0.0,
        api_cost_usd=totals["cost_usd"] or 0.0,
        complete_shards=len(manifests),
        run_s=run_s,
        shard_run_s=shard_run_s,
        output_tokens_per_s=_per_second(timed.item() or 0, run_s),
        output_tokens_per_shard_s=_per_second(timed.item() or 0, shard_run_s),
    )


def wall_time(manifests: Sequence[ShardManifest]) -> float:
    """Seconds from the first shard's start to the last one's end."""
    finished = [m.finished_at for m in manifests if m.finished_at is not None]
    return max(finished) - min(m.started_at for m in manifests) if finished else 0.0


def engine_work(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    """What an engine did between two readings of its EngineStats (as msgspec.to_builtins gives them)."""
    return {name: after[name] - before[name] for name in after}


def total_work(works: Sequence[dict[str, Any] | None]) -> dict[str, Any] | None:
    """engine_work summed over shards (their steps may have had one engine each); None when none ran."""
    ran = [work for work in works if work is not None]
    return {name: sum(work[name] for work in ran) for name in ran[0]} if ran else None


def write_summary(
    output_uri: str,
    config: BatchConfig,
    *,
    shards: int,
    engine: dict[str, Any] | None = None,
    ranks: list[dict[str, Any]] | None = None,
) -> BatchSummary:
    """Summarize the batch, stamp the run that wrote it (plan size, model, config hash, engine work) and write
    outputs/{batch}/summary.json."""
    summary = msgspec.structs.replace(
        summarize(output_uri, config.prices, config.storage.options),
        shards=shards,
        model=config.model,
        config_hash=config_hash(config),
        engine=engine,
        ranks=ranks,
    )
    write_json_atomic(summary_uri(output_uri), summary, config.storage.options)
    return summary
