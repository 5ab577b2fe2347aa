"""run_batch end to end: shards of a few jobs (some invalid) written in the documented layout, then resumed."""

from __future__ import annotations

import json
import shutil

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
from k2batch.shards import manifest_uri
from k2batch.storage import read_json
from tests.agent.conftest import engine_for, script_first_step, script_steps
from tests.agent.test_episode import ANSWER, CALLS


def config_for(checkpoint, **sampling):
    config = load_config()
    return msgspec.structs.replace(
        config,
        model=str(checkpoint),
        engine=EngineConfig(max_num_seqs=8, num_kv_blocks=512),
        sampling=msgspec.structs.replace(config.sampling, **{"temperature": 0.0, "max_new_tokens": 72, **sampling}),
        agent=msgspec.structs.replace(config.agent, max_steps=3, max_new_tokens_per_episode=120, tool_workers=2),
        tools=msgspec.structs.replace(config.tools, enabled=("calculator", "now")),
        shards=msgspec.structs.replace(config.shards, rows_per_shard=3),
    )


def answering_engine(checkpoint):
    """Step 0 calls the tools, step 1 answers: every episode that runs ends `ok`."""
    engine = engine_for(checkpoint)
    script_steps(engine, {":0": engine.tokenizer.encode_chat(CALLS), ":1": engine.tokenizer.encode_chat(ANSWER)})
    return engine


def read(output, kind):
    return pl.scan_parquet(f"{output}/{kind}/**/*.parquet", hive_partitioning=True).collect()


@pytest.fixture(scope="module")
def scripted_batch(k2_checkpoint, tmp_path_factory):
    """One batch run whose first steps call tools, shared by the tests that read its outputs."""
    tmp_path = tmp_path_factory.mktemp("batch")
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    table = pa.table(
        {
            "job_id": ["j1", "j2", "j2", None, "j5"],
            "task": ["synthesis", "retrieval", "draft", "draft", None],
            "prompt": ["What is 2+3?", "Find Paris.", "dup", "no id", "Hi"],
            "tools": [None, ["calculator"], None, None, ["teleport"]],
            "customer": ["a", "b", "c", "d", "e"],
        }
    )
    pq.write_table(table, inputs / "part-0.parquet")
    output = str(tmp_path / "out")
    config = config_for(k2_checkpoint)
    engine = answering_engine(k2_checkpoint)
    summary = run_batch(str(inputs), output, config, engine=engine)
    return tmp_path, table, output, config, engine, summary


def test_run_batch_writes_every_row_and_resumes(scripted_batch):
    tmp_path, table, output, config, engine, summary = scripted_batch
    inputs = tmp_path / "inputs"
    results = read(output, "results").sort("source_row")
    assert results.height == table.num_rows == summary["rows"]
    assert results["customer"].to_list() == ["a", "b", "c", "d", "e"]  # pass-through, rows in == rows out
    assert results["status"].to_list() == ["ok", "ok", "invalid", "invalid", "invalid"]
    assert results["answer"].to_list()[:2] == ["2+3 is 5.", "2+3 is 5."]
    assert results["error_type"].to_list()[2:] == ["duplicate_job_id", "missing_job_id", "unknown_tool"]
    assert results["shard"].to_list() == [0, 0, 0, 1, 1]
    assert results["attempt"].to_list() == [1] * 5
    traces = read(output, "traces")
    tools = traces.filter(pl.col("operation") == "execute_tool").sort("job_id", "span_id")
    assert tools["job_id"].to_list() == ["j1", "j1", "j2", "j2"]
    # j2 may call only the calculator: its "nope" call and j1's come back as tool errors, not crashes.
    assert tools["tool_result"].to_list()[0] == "5" and tools["error_type"].to_list()[1] == "unknown_tool"
    manifests = sorted(p.name for p in (tmp_path / "out" / "manifests").iterdir())
    assert manifests == ["shard=00000.json", "shard=00001.json"]
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["rows_by_status"] == {"invalid": 3, "ok": 2}

    steps_before = engine.stats.steps
    again = run_batch(str(inputs), output, config, engine=engine)
    assert engine.stats.steps == steps_before  # both shards complete: nothing runs again
    assert again["rows"] == 5


def test_replay_reproduces_a_recorded_episode(k2_checkpoint, scripted_batch):
    _, _, output, config, _, _ = scripted_batch
    report = replay_job(output, "j2", config, engine=answering_engine(k2_checkpoint))
    assert report.matches and [s.recorded_tokens for s in report.steps] == [70, 23]
    assert (report.recorded_status, report.replayed_status) == ("ok", "ok")


def test_a_sampled_batch_replays_from_its_trace_alone(k2_checkpoint, tmp_path):
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    prompts = ["What is 2+3?", "Add two and three.", "Sum: 2, 3"]
    pq.write_table(pa.table({"job_id": ["s1", "s2", "s3"], "prompt": prompts}), inputs / "jobs.parquet")
    config = config_for(k2_checkpoint, temperature=1.0, top_p=0.95)
    output = str(tmp_path / "out")

    def engine():  # step 0 calls tools; step 1 samples freely, so seeds and settings decide its tokens
        engine = engine_for(k2_checkpoint)
        script_first_step(engine, engine.tokenizer.encode_chat(CALLS))
        return engine

    run_batch(str(inputs), output, config, engine=engine())
    shutil.rmtree(inputs)  # the trace alone is enough to replay
    chats = read(output, "traces").filter(pl.col("operation") == "chat").sort("job_id", "step")
    assert chats["request_temperature"].to_list() == [1.0] * chats.height
    free = chats.filter(pl.col("step") == 1)["output_token_ids"].to_list()
    assert len({tuple(ids) for ids in free}) == 3 and all(len(ids) > 1 for ids in free)  # sampled, not scripted
    greedy = msgspec.structs.replace(config, sampling=msgspec.structs.replace(config.sampling, temperature=0.0))
    for job in ("s1", "s2", "s3"):  # the replay runs alone, not batched with the others as in the shard
        report = replay_job(output, job, greedy, engine=engine())  # the config's sampling does not matter
        assert report.matches and len(report.steps) == 2, job

    # One recorded id changed: the replay sees it.
    traces = pq.read_table(f"{output}/traces/shard=00000/part-0.parquet")
    ids = traces.column("output_token_ids").to_pylist()
    row = next(i for i, r in enumerate(traces.to_pylist()) if (r["job_id"], r["step"]) == ("s1", 1))
    ids[row] = [ids[row][0] + 1, *ids[row][1:]]
    column = traces.schema.get_field_index("output_token_ids")
    tampered = traces.set_column(column, "output_token_ids", pa.array(ids, pa.list_(pa.int32())))
    pq.write_table(tampered, f"{output}/traces/shard=00000/part-0.parquet")
    report = replay_job(output, "s1", config, engine=engine())
    assert not report.matches and [s.same for s in report.steps] == [True, False]


def test_reruns_record_their_attempt(k2_checkpoint, tmp_path):
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    pq.write_table(pa.table({"job_id": [f"a{i}" for i in range(5)], "prompt": ["Hi"] * 5}), inputs / "jobs.parquet")
    output = str(tmp_path / "out")
    config = config_for(k2_checkpoint)
    engine = answering_engine(k2_checkpoint)
    run_batch(str(inputs), output, config, engine=engine)
    (tmp_path / "out" / "manifests" / "shard=00001.json").unlink()  # as if the run died before shard 1 was done
    run_batch(str(inputs), output, config, engine=engine)
    results = read(output, "results").sort("job_id")
    assert results["attempt"].to_list() == [1, 1, 1, 2, 2]
    assert read_json(manifest_uri(output, 1))["attempt"] == 2 and read_json(manifest_uri(output, 0))["attempt"] == 1


def test_shards_an_input_no_longer_has_are_removed(k2_checkpoint, tmp_path):
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    output = str(tmp_path / "out")
    config, engine = config_for(k2_checkpoint), answering_engine(k2_checkpoint)
    pq.write_table(pa.table({"job_id": [f"a{i}" for i in range(5)], "prompt": ["Hi"] * 5}), inputs / "jobs.parquet")
    run_batch(str(inputs), output, config, engine=engine)
    # Rewritten with fewer rows and another pass-through column: shard 1 is stale (and would clash on schema).
    pq.write_table(pa.table({"job_id": ["b0", "b1"], "prompt": ["Hi"] * 2, "extra": [1, 2]}), inputs / "jobs.parquet")
    summary = run_batch(str(inputs), output, config, engine=engine)
    assert summary["rows"] == 2 and summary["shards"] == 1
    assert sorted(read(output, "results")["job_id"].to_list()) == ["b0", "b1"]
    assert sorted(p.name for p in (tmp_path / "out" / "manifests").iterdir()) == ["shard=00000.json"]
    assert read(output, "traces")["job_id"].unique().sort().to_list() == ["b0", "b1"]


def write_zero_rows(inputs):
    inputs.mkdir()
    pq.write_table(
        pa.table({"job_id": pa.array([], pa.string()), "prompt": pa.array([], pa.string())}), inputs / "jobs.parquet"
    )


def test_a_batch_without_rows_has_an_empty_result(k2_checkpoint, tmp_path, capsys):
    write_zero_rows(tmp_path / "inputs")
    output = str(tmp_path / "out")
    summary = run_batch(str(tmp_path / "inputs"), output, config_for(k2_checkpoint))
    assert (summary["rows"], summary["shards"], summary["rows_by_status"], summary["engine"]) == (0, 0, {}, None)
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["rows"] == 0

    (tmp_path / "batch.toml").write_text(f'model = "{k2_checkpoint}"\n')
    main(
        [
            "run",
            "--input",
            str(tmp_path / "inputs"),
            "--output",
            str(tmp_path / "cli"),
            "--config",
            str(tmp_path / "batch.toml"),
        ]
    )
    assert capsys.readouterr().out.startswith("0 rows: {}")
    assert json.loads((tmp_path / "cli" / "summary.json").read_text())["rows"] == 0
    table = inspect_table(str(tmp_path / "cli"), None)
    assert table["status"].to_list() == ["total"] and table["jobs"].to_list() == [0]


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
    total = table.filter(pl.col("status") == "total").row(0, named=True)
    assert total["jobs"] == 3 and table.filter(pl.col("status") != "total")["jobs"].sum() == 3
    invalid = table.filter(pl.col("status") == "invalid")
    assert invalid["jobs"].to_list() == [1] and invalid["cost_usd"].to_list() == [0.0]
    main(["inspect", output, "--config", str(tmp_path / "batch.toml")])
    assert "cache_hit_rate" in capsys.readouterr().out
    main(["replay", output, "--job", "a", "--config", str(tmp_path / "batch.toml")])
    assert capsys.readouterr().out.rstrip().endswith(": match")
