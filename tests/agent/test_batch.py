"""run_batch end to end: shards of a few jobs (some invalid) written in the documented layout, then resumed."""

from __future__ import annotations

import json

import msgspec
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from k2batch.agent.batch import run_batch
from k2batch.agent.replay import replay_job
from k2batch.cli import inspect_table, main
from k2batch.config import load_config
from k2batch.engine import EngineConfig
from tests.agent.conftest import engine_for, script_first_step
from tests.agent.test_episode import CALLS


def config_for(checkpoint):
    config = load_config()
    return msgspec.structs.replace(
        config,
        model=str(checkpoint),
        engine=EngineConfig(max_num_seqs=8, num_kv_blocks=512),
        sampling=msgspec.structs.replace(config.sampling, temperature=0.0, max_new_tokens=72),
        agent=msgspec.structs.replace(config.agent, max_steps=3, max_new_tokens_per_episode=76, tool_workers=2),
        tools=msgspec.structs.replace(config.tools, enabled=("calculator", "now")),
        shards=msgspec.structs.replace(config.shards, rows_per_shard=3),
    )


@pytest.fixture(scope="module")
def scripted_batch(k2_checkpoint, tmp_path_factory):
    """One batch run whose first steps call tools, shared by the tests that read its outputs."""
    tmp_path = tmp_path_factory.mktemp("batch")
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    table = pa.table({
        "job_id": ["j1", "j2", "j2", None, "j5"],
        "task": ["synthesis", "retrieval", "draft", "draft", None],
        "prompt": ["What is 2+3?", "Find Paris.", "dup", "no id", "Hi"],
        "tools": [None, ["calculator"], None, None, ["teleport"]],
        "customer": ["a", "b", "c", "d", "e"],
    })  # fmt: skip
    pq.write_table(table, inputs / "part-0.parquet")
    output = str(tmp_path / "out")
    config = config_for(k2_checkpoint)
    engine = engine_for(k2_checkpoint)
    script_first_step(engine, engine.tokenizer.encode_chat(CALLS))

    summary = run_batch(str(inputs), output, config, engine=engine)
    return tmp_path, table, output, config, engine, summary


def test_run_batch_writes_every_row_and_resumes(scripted_batch):
    tmp_path, table, output, config, engine, summary = scripted_batch
    inputs = tmp_path / "inputs"
    results = pl.scan_parquet(f"{output}/results/**/*.parquet", hive_partitioning=True).collect().sort("source_row")
    assert results.height == table.num_rows == summary["rows"]
    assert results["customer"].to_list() == ["a", "b", "c", "d", "e"]  # pass-through, rows in == rows out
    assert results["status"].to_list()[2:] == ["invalid", "invalid", "invalid"]
    assert results["error_type"].to_list()[2:] == ["duplicate_job_id", "missing_job_id", "unknown_tool"]
    assert set(results["status"].to_list()[:2]) <= {"ok", "step_limit", "token_limit"}
    assert results["shard"].to_list() == [0, 0, 0, 1, 1]
    traces = pl.scan_parquet(f"{output}/traces/**/*.parquet", hive_partitioning=True).collect()
    tools = traces.filter(pl.col("operation") == "execute_tool").sort("job_id", "span_id")
    assert tools["job_id"].to_list() == ["j1", "j1", "j2", "j2"]
    # j2 may call only the calculator: its "nope" call and j1's come back as tool errors, not crashes.
    assert tools["tool_result"].to_list()[0] == "5" and tools["error_type"].to_list()[1] == "unknown_tool"
    manifests = sorted(p.name for p in (tmp_path / "out" / "manifests").iterdir())
    assert manifests == ["shard=00000.json", "shard=00001.json"]
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["rows_by_status"]["invalid"] == 3

    steps_before = engine.stats.steps
    again = run_batch(str(inputs), output, config, engine=engine)
    assert engine.stats.steps == steps_before  # both shards complete: nothing runs again
    assert again["rows"] == 5


def test_replay_reproduces_a_recorded_episode(k2_checkpoint, scripted_batch):
    _, _, output, config, _, _ = scripted_batch
    replayer = engine_for(k2_checkpoint)
    script_first_step(replayer, replayer.tokenizer.encode_chat(CALLS))
    report = replay_job(output, "j1", config, engine=replayer)
    assert report.matches and len(report.steps) >= 2
    assert report.steps[0].recorded_tokens == len(replayer.tokenizer.encode_chat(CALLS))


def test_cli_run_then_inspect(k2_checkpoint, tmp_path, capsys):
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    pq.write_table(
        pa.table({"job_id": ["a", "b", "b"], "task": ["draft", "retrieval", None], "prompt": ["x", "y", "z"]}),
        inputs / "jobs.parquet",
    )
    (tmp_path / "batch.toml").write_text(
        f'model = "{k2_checkpoint}"\n[engine]\nmax_num_seqs = 4\nnum_kv_blocks = 256\n'
        "[sampling]\ntemperature = 0.0\nmax_new_tokens = 6\n[agent]\nmax_steps = 2\n"
        '[tools]\nenabled = ["calculator"]\n'
    )
    output = str(tmp_path / "out")
    main(["run", "--input", str(inputs), "--output", output, "--config", str(tmp_path / "batch.toml")])
    assert "3 rows" in capsys.readouterr().out

    table = inspect_table(output, str(tmp_path / "batch.toml"))
    assert table["jobs"].sum() == 3
    invalid = table.filter(pl.col("status") == "invalid")
    assert invalid["jobs"].to_list() == [1] and invalid["cost_usd"].to_list() == [0.0]
    ran = table.filter(pl.col("status") != "invalid")
    prices = load_config().prices
    expected = sum(
        (r["prompt_tokens"] - r["cached_prompt_tokens"]) * prices.input
        + r["cached_prompt_tokens"] * prices.cached_input + r["completion_tokens"] * prices.output
        for r in ran.to_dicts()
    ) / 1e6  # fmt: skip
    assert abs(ran["cost_usd"].sum() - expected) < 1e-12 and ran["completion_tokens"].sum() > 0
    main(["inspect", output, "--config", str(tmp_path / "batch.toml")])
    assert "cache_hit_rate" in capsys.readouterr().out
    main(["replay", output, "--job", "a", "--config", str(tmp_path / "batch.toml")])  # greedy run: replays exactly
    assert capsys.readouterr().out.rstrip().endswith(": match")
