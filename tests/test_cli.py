"""The `k2batch` command without a model: `inspect` on a batch of known numbers, and clean errors for bad input."""

from __future__ import annotations

import time
from pathlib import Path

import msgspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from k2batch import storage
from k2batch.cli import inspect_table, main
from k2batch.config import load_config
from k2batch.metrics import summarize
from k2batch.records import Result, RunInfo, results_table, traces_table
from k2batch.shards import ShardManifest, results_uri, write_shard_outputs


def result(status, task, prompt=0, cached=0, completion=0, reasoning=0, row=0) -> Result:
    return Result(
        job_id=f"j{row}",
        task=task,
        status=status,
        steps=1,
        tool_calls=0,
        prompt_tokens=prompt,
        cached_prompt_tokens=cached,
        completion_tokens=completion,
        reasoning_tokens=reasoning,
        source_file="in.parquet",
        source_row=row,
    )


def write_shard(output: str, index: int, results: list[Result], run_s: float | None, started_ago: float = 0.0) -> None:
    """Shard `index` with these results, started `started_ago` seconds ago and written now; with run_s None it
    crashed after its results, before its manifest."""
    table = results_table(results, RunInfo(model="m", config_hash="c", shard=index, attempt=1))
    if run_s is None:
        storage.write_parquet_atomic(results_uri(output, index), table)
        return
    manifest = ShardManifest(
        shard=index,
        input_hash="h",
        config_hash="c",
        attempt=1,
        inputs=(),
        rows_in=len(results),
        started_at=time.time() - started_ago,
        timings={"run_s": run_s},
    )
    write_shard_outputs(output, index, table, traces_table([]), manifest)


def test_inspect_numbers_of_a_known_batch_without_summary(tmp_path: Path) -> None:
    output = str(tmp_path / "out")
    first = [result("ok", "draft", 100, 60, 40, 10, 0), result("ok", "draft", 300, 0, 60, 20, 1)]
    write_shard(output, 0, first, 2.0, 10)
    write_shard(output, 1, [result("invalid", None, row=2), result("error", "draft", 100, 40, 0, 0, 3)], 3.0, 4)
    write_shard(output, 2, [result("ok", "draft", 200, 0, 50, 0, 4)], None)  # no manifest: not in the rate
    assert not (tmp_path / "out" / "summary.json").exists()

    rows = {(r["status"], r["task"]): r for r in inspect_table(output, None).to_dicts()}
    assert list(rows) == [("error", "draft"), ("invalid", None), ("ok", "draft"), ("total", None)]
    ok, total = rows["ok", "draft"], rows["total", None]
    # Default prices: $0.60 input, $0.15 cached input, $2.50 output per million tokens.
    assert (ok["jobs"], ok["prompt_tokens"], ok["cached_prompt_tokens"], ok["reasoning_tokens"]) == (3, 600, 60, 30)
    assert ok["cache_hit_rate"] == pytest.approx(0.1)
    assert ok["cost_usd"] == pytest.approx((540 * 0.60 + 60 * 0.15 + 150 * 2.50) / 1e6)
    assert rows["error", "draft"]["cost_usd"] == pytest.approx((60 * 0.60 + 40 * 0.15) / 1e6)
    assert ok["output_tokens_per_s"] is None and ok["output_tokens_per_shard_s"] is None  # no group has its own
    assert (total["jobs"], total["prompt_tokens"], total["completion_tokens"], total["reasoning_tokens"]) == (
        5,
        700,
        150,
        30,
    )
    assert total["cache_hit_rate"] == pytest.approx(100 / 700)
    assert total["cost_usd"] == pytest.approx((600 * 0.60 + 100 * 0.15 + 150 * 2.50) / 1e6)
    # The complete shards' 100 tokens over their wall time (the first started 10 s ago, both ended now) and over
    # their 2 + 3 s of run time; the figures of the batch summary.
    assert total["output_tokens_per_s"] == pytest.approx(100 / 10.0, rel=0.05)
    assert total["output_tokens_per_shard_s"] == pytest.approx(100 / 5.0)
    summary = msgspec.to_builtins(summarize(output, load_config().prices))
    assert summary["complete_shards"] == 2 and summary["shard_run_s"] == 5.0
    assert {name: total[name] for name in ("prompt_tokens", "completion_tokens", "output_tokens_per_shard_s")} == {
        name: summary[name] for name in ("prompt_tokens", "completion_tokens", "output_tokens_per_shard_s")
    }
    assert (total["jobs"], total["cost_usd"]) == (summary["rows"], summary["api_cost_usd"])


def test_bad_input_and_config_exit_2_with_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "inputs").mkdir()
    good = tmp_path / "good.parquet"
    pq.write_table(pa.table({"job_id": ["a"] * 100, "prompt": ["p"] * 100}), good)
    (tmp_path / "inputs" / "jobs.parquet").write_bytes(good.read_bytes()[:200])
    with pytest.raises(SystemExit) as exit_info:
        main(["run", "--input", str(tmp_path / "inputs"), "--output", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith(f"k2batch: error: {tmp_path / 'inputs' / 'jobs.parquet'}: not a readable Parquet file")
    assert not (tmp_path / "out").exists()

    (tmp_path / "bad.toml").write_text("[agent]\nmax_stepz = 3\n")
    with pytest.raises(SystemExit) as exit_info:
        main(["run", "--input", str(good), "--output", str(tmp_path / "out"), "--config", str(tmp_path / "bad.toml")])
    assert exit_info.value.code == 2
    assert (
        capsys.readouterr()
        .err.strip()
        .splitlines()[-1]
        .startswith(f"k2batch: error: {tmp_path / 'bad.toml'}: agent.max_stepz: unknown key")
    )
