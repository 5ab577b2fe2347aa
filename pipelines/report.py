"""The batch report: totals, per-task tokens and cost, steps per episode, as numbers and markdown for Dagster."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import polars as pl

from k2batch.config import PricesConfig
from k2batch.metrics import api_cost, cache_hit_rate, token_totals

BAR_WIDTH = 30


def tasks_table(results: pl.LazyFrame, prices: PricesConfig) -> pl.DataFrame:
    """Per task: jobs, steps, tool calls, tokens, cache hit rate and API-equivalent cost."""
    return (
        results.with_columns(task=pl.col("task").fill_null("(none)"), cost_usd=api_cost(prices))
        .group_by("task")
        .agg(**token_totals(), cost_usd=pl.col("cost_usd").sum())
        .with_columns(cache_hit_rate=cache_hit_rate())
        .sort("task")
        .collect()
    )


def steps_histogram(results: pl.LazyFrame) -> pl.DataFrame:
    """Episodes per number of steps (invalid rows ran no steps and are left out)."""
    return (
        results.filter(pl.col("status") != "invalid")
        .group_by("steps")
        .agg(episodes=pl.len())
        .sort("steps")
        .collect()
    )


def bar(value: float, largest: float) -> str:
    return "█" * max(1, round(BAR_WIDTH * value / largest)) if value > 0 else ""


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value).replace("|", "\\|").replace("\n", " ")


def steps_chart(histogram: pl.DataFrame) -> str:
    largest = max(histogram["episodes"].max() or 0, 1)
    rows = [(steps, n, bar(n, largest)) for steps, n in histogram.iter_rows()]
    return markdown_table(["steps", "episodes", ""], rows)


def tokens_chart(tasks: pl.DataFrame) -> str:
    largest = max(tasks["prompt_tokens"].max() or 0, tasks["completion_tokens"].max() or 0, 1)
    rows = []
    for row in tasks.iter_rows(named=True):
        rows.append((row["task"], "prompt", row["prompt_tokens"], bar(row["prompt_tokens"], largest)))
        rows.append(("", "completion", row["completion_tokens"], bar(row["completion_tokens"], largest)))
    return markdown_table(["task", "tokens", "count", ""], rows)


def tasks_markdown(tasks: pl.DataFrame) -> str:
    columns = ["task", "jobs", "steps", "tool_calls", "prompt_tokens", "completion_tokens", "cache_hit_rate", "cost_usd"]
    return markdown_table(columns, tasks.select(columns).rows())


def per_second(count: float, seconds: float) -> float:
    return count / seconds if seconds > 0 else 0.0


def totals(summary: dict[str, Any], tasks: pl.DataFrame) -> dict[str, float]:
    """Headline numbers of a batch summary and its task table. Throughput twice: over the batch's wall time
    (run_s, first shard start to last shard end) and per second of one shard's engine (shard_run_s, the
    shards' run times summed), which differ when shards run side by side."""
    prompt = summary["prompt_tokens"] or 0
    completion = summary["completion_tokens"] or 0
    run_s, shard_run_s = summary.get("run_s") or 0.0, summary.get("shard_run_s") or 0.0
    return {
        "rows": summary["rows"],
        "steps": summary["steps"] or 0,
        "tool_calls": summary["tool_calls"] or 0,
        "prompt_tokens": prompt,
        "cached_prompt_tokens": summary["cached_prompt_tokens"] or 0,
        "completion_tokens": completion,
        "reasoning_tokens": summary["reasoning_tokens"] or 0,
        "cache_hit_rate": (summary["cached_prompt_tokens"] or 0) / max(prompt, 1),
        "output_tokens_per_s": per_second(completion, run_s),
        "output_tokens_per_shard_s": per_second(completion, shard_run_s),
        "run_s": run_s,
        "shard_run_s": shard_run_s,
        "api_cost_usd": float(tasks["cost_usd"].sum()),
    }
