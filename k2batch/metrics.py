"""Batch figures over results rows, defined once for the batch summary, `k2batch inspect` and the Dagster report:
token totals, cache hit rate and the API-equivalent cost."""

from __future__ import annotations

import polars as pl

from k2batch.config import PricesConfig


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
        uncached * prices.input + pl.col("cached_prompt_tokens") * prices.cached_input
        + pl.col("completion_tokens") * prices.output
    ) / 1e6  # fmt: skip
