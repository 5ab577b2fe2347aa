"""`k2batch run` on the demo model with two ranks: agent episodes with real tool calls end token for token as on one."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

import polars as pl
import pytest

from k2batch import cli
from k2batch.demo.workspace import ensure_corpus, write_jobs

DEMO = Path(cli.WORKSPACE) / "models" / "k2-demo"
DEMO_CONFIG = cli.DEMO_CONFIG

pytestmark = pytest.mark.skipif(not (DEMO / "config.json").exists(), reason="no committed demo model")


def _toml(table: dict) -> str:
    """A config overlay as TOML text (scalars and one level of tables, all this test needs)."""

    def value(v):
        return ("true" if v else "false") if isinstance(v, bool) else json.dumps(v)

    lines = [f"{k} = {value(v)}" for k, v in table.items() if not isinstance(v, dict)]
    for name, section in ((k, v) for k, v in table.items() if isinstance(v, dict)):
        lines += [f"[{name}]", *(f"{k} = {value(v)}" for k, v in section.items())]
    return "\n".join(lines) + "\n"


def _run(tmp_path: Path, inputs: Path, ranks: int) -> tuple[pl.DataFrame, pl.DataFrame]:
    overlay = tomllib.loads(DEMO_CONFIG.read_text())
    overlay["model"] = str(DEMO)
    overlay.setdefault("tools", {})["search_corpus"] = str(ensure_corpus(tmp_path / "corpus.parquet"))
    overlay["engine"].update(data_parallel_size=ranks, rank_timeout_s=120.0, max_num_seqs=8)
    config = tmp_path / f"ranks{ranks}.toml"
    config.write_text(_toml(overlay))
    output = tmp_path / f"out{ranks}"
    cli.main(["run", "--input", str(inputs), "--output", str(output), "--config", str(config)])
    results = pl.read_parquet(output / "results" / "**" / "*.parquet", hive_partitioning=False).sort("job_id")
    traces = pl.read_parquet(output / "traces" / "**" / "*.parquet", hive_partitioning=False).sort("job_id", "span_id")
    return results, traces


@pytest.mark.slow
def test_two_ranks_run_a_batch_as_one_does(tmp_path):
    inputs = write_jobs(tmp_path / "inputs" / "jobs.parquet", 9)
    one, one_traces = _run(tmp_path, inputs, 1)
    two, two_traces = _run(tmp_path, inputs, 2)
    columns = ["job_id", "status", "answer", "steps", "tool_calls", "prompt_tokens", "completion_tokens"]
    assert one.height == 9 and (one["tool_calls"] > 0).all() and (one["status"] == "ok").all()
    assert two.select(columns).equals(one.select(columns))
    chats = pl.col("operation") == "chat"
    assert (
        two_traces.filter(chats)["output_token_ids"].to_list() == one_traces.filter(chats)["output_token_ids"].to_list()
    )
    tools = pl.col("operation") == "execute_tool"
    assert two_traces.filter(tools)["tool_result"].to_list() == one_traces.filter(tools)["tool_result"].to_list()
    # Both ranks ran episodes (every step of an episode is a request on its session's rank).
    ranks = json.loads((tmp_path / "out2" / "summary.json").read_text())["ranks"]
    assert len(ranks) == 2 and all(r["requests"] > 0 and r["decode_tokens"] > 0 for r in ranks)
    assert sum(r["requests"] for r in ranks) == one_traces.filter(chats).height
    # The same configuration but for the ranks: the results are interchangeable, so a resume may change ranks.
    assert two["config_hash"].unique().to_list() == one["config_hash"].unique().to_list()
