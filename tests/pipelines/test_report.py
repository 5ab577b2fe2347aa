"""The batch report's numbers are the batch summary's (k2batch.metrics), without running a batch."""

from __future__ import annotations

import polars as pl
import pytest

from k2batch.config import load_config
from k2batch.metrics import BatchSummary
from k2batch.pipelines import report

FIGURES = {
    "rows": 4,
    "rows_by_status": {"ok": 4},
    "steps": 8,
    "tool_calls": 2,
    "prompt_tokens": 1000,
    "cached_prompt_tokens": 250,
    "completion_tokens": 600,
    "reasoning_tokens": 100,
    "cache_hit_rate": 0.25,
    "api_cost_usd": 0.75,
    "complete_shards": 2,
    "run_s": 10.0,
    "shard_run_s": 20.0,
    "output_tokens_per_s": 60.0,
    "output_tokens_per_shard_s": 30.0,
}
SUMMARY = BatchSummary(**FIGURES, shards=2, model="m", config_hash="c")


def test_totals_are_the_summarys_numbers():
    totals = report.totals(SUMMARY)
    assert totals["output_tokens_per_s"] == 60.0 and totals["output_tokens_per_shard_s"] == 30.0
    assert (totals["run_s"], totals["shard_run_s"]) == (10.0, 20.0)
    assert totals["cache_hit_rate"] == 0.25 and totals["api_cost_usd"] == 0.75 and totals["rows"] == 4
    assert "model" not in totals and "rows_by_status" not in totals  # text and tables go in their own entries


def test_tasks_table_groups_the_summarys_figures_by_task():
    results = pl.LazyFrame(
        {
            "task": ["a", "a", None],
            "status": ["ok"] * 3,
            "steps": [1, 2, 3],
            "tool_calls": [0, 1, 2],
            "prompt_tokens": [100, 100, 200],
            "cached_prompt_tokens": [50, 0, 0],
            "completion_tokens": [10, 20, 30],
            "reasoning_tokens": [0, 0, 0],
        }
    )
    prices = load_config().prices
    tasks = report.tasks_table(results, prices)
    assert tasks["task"].to_list() == ["(none)", "a"] and tasks["jobs"].to_list() == [1, 2]
    assert tasks["cache_hit_rate"].to_list() == [0.0, 0.25]
    expected = (150 * prices.input + 50 * prices.cached_input + 30 * prices.output) / 1e6
    assert tasks["cost_usd"].to_list()[1] == pytest.approx(expected)
