"""The batch report: the summary's figures (k2batch.metrics), per-task tokens and cost, steps per episode, as numbers
and markdown for Dagster."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import msgspec
import polars as pl

from k2batch.config import PricesConfig
from k2batch.metrics import BatchSummary, figures_by

BAR_WIDTH = 30


def tasks_table(results: pl.LazyFrame, prices: PricesConfig) -> pl.DataFrame:
    """Per task: jobs, steps, tool calls, tokens, cache hit rate and API-equivalent cost."""
    named = results.with_columns(task=pl.col("task").fill_null("(none)"))
    return figures_by(named, prices, "task").sort("task").collect()


def steps_histogram(results: pl.LazyFrame) -> pl.DataFrame:
    """Episodes per number of steps (invalid rows ran no steps and are left out)."""
    return (
        results.filter(pl.col("status") != "invalid").group_by("steps").agg(episodes=pl.len()).sort("steps").collect()
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
    columns = [
        "task",
        "jobs",
        "steps",
        "tool_calls",
        "prompt_tokens",
        "completion_tokens",
        "cache_hit_rate",
        "cost_usd",
    ]
    return markdown_table(columns, tasks.select(columns).rows())


def totals(summary: BatchSummary) -> dict[str, float]:
    """The summary's numbers, as metadata: counts, tokens, cache hit rate, cost, both run times and both throughputs
    (over the batch's wall time, and per second of one shard's run)."""
    figures = msgspec.to_builtins(summary)
    return {name: value for name, value in figures.items() if isinstance(value, int | float)}
