"""One bad row never takes down a shard: seeds at the edge of their range, outputs that do not encode, a job that
cannot start. Each ends as that row's own result; the shard's other rows and its manifest are written."""

from __future__ import annotations

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from k2batch.agent import batch
from k2batch.agent.batch import output_tables, run_batch
from k2batch.agent.episode import EpisodeOutcome
from k2batch.records import MAX_SEED, Job, Result, RunInfo, TraceSpan
from tests.agent.test_batch import answering_engine, config_for, read

RUN = RunInfo(model="m", config_hash="h", shard=0, attempt=1)


def test_seeds_at_the_edge_of_their_range_run_and_past_it_are_invalid(k2_checkpoint, tmp_path):
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    table = pa.table(
        {
            "job_id": ["edge", "int64-max", "uint64-max"],
            "prompt": ["What is 2+3?"] * 3,
            "seed": pa.array([MAX_SEED - 1, 2**63 - 1, 2**64 - 1], pa.uint64()),
        }
    )
    pq.write_table(table, inputs / "jobs.parquet")
    output = str(tmp_path / "out")
    summary = run_batch(str(inputs), output, config_for(k2_checkpoint), engine=answering_engine(k2_checkpoint))
    assert summary["rows_by_status"] == {"invalid": 2, "ok": 1}
    results = read(output, "results").sort("source_row")
    assert results["error_type"].to_list() == [None, "invalid_value", "invalid_value"]
    # Step k samples with seed + k: the edge seed's second step is past MAX_SEED and still an int64.
    chats = read(output, "traces").filter(pl.col("operation") == "chat").sort("step")
    assert chats["request_seed"].to_list() == [MAX_SEED - 1, MAX_SEED]


def outcome(job_id: str, row: int, seed: int) -> EpisodeOutcome:
    result = Result(job_id=job_id, task=None, status="ok", answer="5", steps=1, source_file="f", source_row=row)
    span = TraceSpan(
        job_id=job_id,
        step=0,
        span_id=f"{job_id}/0/chat0",
        parent_span_id=None,
        operation="chat",
        start_ns=1,
        end_ns=2,
        request_seed=seed,
    )
    return EpisodeOutcome(result=result, spans=[span])


def test_an_episode_whose_outputs_do_not_encode_is_a_row_error():
    inputs = pa.table({"_source": ["f"] * 3, "_row": [0, 1, 2], "customer": ["a", "b", "c"]})
    outcomes = [outcome("a", 0, 7), outcome("b", 1, 2**63), outcome("c", 2, 9)]  # 2**63 is past int64
    results, traces = output_tables(outcomes, [], RUN, inputs)
    rows = results.select(["job_id", "status", "error_type", "customer"]).to_pylist()
    assert [tuple(row.values()) for row in rows] == [
        ("a", "ok", None, "a"),
        ("b", "error", "unencodable_output", "b"),
        ("c", "ok", None, "c"),
    ]
    assert "OverflowError" in results.column("error_message")[1].as_py()
    assert traces.column("job_id").to_pylist() == ["a", "c"]


def test_a_job_that_cannot_start_is_a_row_error(k2_checkpoint, tmp_path, monkeypatch):
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    pq.write_table(pa.table({"job_id": ["a", "b", "c"], "prompt": ["What is 2+3?"] * 3}), inputs / "jobs.parquet")
    spec = batch.episode_spec

    def failing(job, *args, **kwargs):
        if job.job_id == "b":
            raise OverflowError("a value this job brought is out of range")
        return spec(job, *args, **kwargs)

    monkeypatch.setattr(batch, "episode_spec", failing)
    output = str(tmp_path / "out")
    run_batch(str(inputs), output, config_for(k2_checkpoint), engine=answering_engine(k2_checkpoint))
    results = read(output, "results").sort("job_id")
    assert results["status"].to_list() == ["ok", "error", "ok"]
    assert results["error_message"][1] == "OverflowError: a value this job brought is out of range"


class ContextOnly:
    """What episode_spec asks of the engine: its context length."""

    max_model_len = 4096


@pytest.mark.parametrize("seed", [MAX_SEED - 1, 0])
def test_default_seeds_stay_in_range(k2_checkpoint, seed):
    # A config seed at the top of the range plus the job id's own seed wraps around, never past MAX_SEED.
    job = Job(
        job_id="x",
        task=None,
        prompt="p",
        messages=None,
        system=None,
        tools=(),
        max_steps=None,
        max_new_tokens=None,
        temperature=None,
        top_p=None,
        seed=None,
        source_file="f",
        source_row=0,
    )
    spec = batch.episode_spec(job, config_for(k2_checkpoint, seed=seed), ContextOnly())
    assert 0 <= spec.seed < MAX_SEED
