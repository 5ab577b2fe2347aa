"""The batch report's numbers from a summary, without running a batch."""

from __future__ import annotations

import polars as pl

from pipelines import report

SUMMARY = {
    "rows": 4,
    "steps": 8,
    "tool_calls": 2,
    "prompt_tokens": 1000,
    "cached_prompt_tokens": 250,
    "completion_tokens": 600,
    "reasoning_tokens": 100,
    "run_s": 10.0,
    "shard_run_s": 20.0,
}


def test_throughput_over_wall_time_and_per_shard_second():
    """Two shards of 10 s side by side: 600 tokens in 10 s of wall time, 30 tokens per second of one shard."""
    totals = report.totals(SUMMARY, pl.DataFrame({"cost_usd": [0.5, 0.25]}))
    assert totals["output_tokens_per_s"] == 60.0 and totals["output_tokens_per_shard_s"] == 30.0
    assert (totals["run_s"], totals["shard_run_s"]) == (10.0, 20.0)
    assert totals["cache_hit_rate"] == 0.25 and totals["api_cost_usd"] == 0.75


def test_no_time_no_throughput():
    totals = report.totals({**SUMMARY, "run_s": 0.0, "shard_run_s": 0.0}, pl.DataFrame({"cost_usd": [0.0]}))
    assert totals["output_tokens_per_s"] == 0.0 and totals["output_tokens_per_shard_s"] == 0.0
