"""Heavy mode: k trajectories from one prompt (its KV prefilled once), their own seeds, one aggregation (a vote or a
model turn); results keep the candidates, traces every trajectory and the aggregation, and replay reproduces all."""

from __future__ import annotations

import json
import shutil

import msgspec
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from k2batch.agent import run_episodes
from k2batch.agent.batch import run_batch
from k2batch.agent.heavy import aggregation_messages, trajectory_seed, vote
from k2batch.agent.replay import replay_job
from k2batch.metrics import summarize
from k2batch.records import MAX_SEED, Candidate
from tests.agent.conftest import engine_for, script_steps
from tests.agent.test_batch import config_for, read
from tests.agent.test_episode import ANSWER, CALLS, caller, spec

OTHER = "<think>the calculator says 6</think>2+3 is 6.<|im_end|>"
SPACED = "<think>again 5</think>2+3   IS 5.<|im_end|>"
AGGREGATE = "<think>three of four say 5</think>The sum is 5.<|im_end|>"


def candidate(trajectory: int, answer: str | None, status: str = "ok") -> Candidate:
    return Candidate(trajectory=trajectory, status=status, answer=answer, error_type=None, steps=1, tool_calls=0)


def test_vote_counts_answers_up_to_whitespace_and_case_and_ties_go_to_the_earliest():
    winner, record = vote([candidate(0, "six"), candidate(1, "Five"), candidate(2, " five "), candidate(3, "six")])
    assert winner.trajectory == 0 and record["votes"] == [2, 2, 2, 2]  # a tie: the earliest trajectory
    winner, record = vote([candidate(0, "six"), candidate(2, "Five"), candidate(3, "five")])
    assert (winner.trajectory, record["chosen"], record["votes"]) == (2, 2, [1, 2, 2])
    assert record["candidates"] == [0, 2, 3]


def test_trajectory_seeds_start_from_the_jobs_own_and_differ():
    seeds = [trajectory_seed(7, t) for t in range(9)]
    assert seeds[0] == 7 and len(set(seeds)) == 9 and all(0 <= s < MAX_SEED for s in seeds)
    assert seeds == [trajectory_seed(7, t) for t in range(9)]  # reproducible: replay derives them again


def test_aggregation_turn_lists_the_answered_candidates_after_the_conversation():
    messages = [{"role": "user", "content": "What is 2+3?"}]
    turn = aggregation_messages(messages, [candidate(0, "5"), candidate(2, "six")])
    assert turn[:1] == messages and turn[1]["role"] == "user"
    assert "2 independent attempts" in turn[1]["content"]
    assert "## Attempt 1\n5\n\n## Attempt 2\nsix" in turn[1]["content"]


def heavy_engine(checkpoint, aggregate: str = AGGREGATE):
    """Every trajectory calls the tools at step 0; at step 1 trajectories 0 and 2 answer 5, 1 answers 6 and 3
    answers 5 spelled otherwise; the aggregation turn writes `aggregate`."""
    engine = engine_for(checkpoint)
    encode = engine.tokenizer.encode_chat
    script_steps(
        engine,
        {
            "aggregate:0": encode(aggregate),
            ":0": encode(CALLS),
            "t1:1": encode(OTHER),
            "t3:1": encode(SPACED),
            ":1": encode(ANSWER),
        },
    )
    return engine


def heavy_spec(job_id: str, k: int, aggregation: str, **budgets):
    return msgspec.structs.replace(spec(job_id, per_episode=400, **budgets), heavy=k, aggregation=aggregation)


def test_heavy_vote_runs_k_trajectories_from_one_prefill_and_keeps_every_candidate(k2_checkpoint):
    engine = heavy_engine(k2_checkpoint)
    added = []
    add = engine.add_request
    engine.add_request = lambda ids, params, **kw: (
        added.append((kw["request_id"], list(ids), params)) or add(ids, params, **kw)
    )
    (outcome,) = run_episodes(engine, engine.tokenizer, [heavy_spec("h", 4, "vote")], caller(["h"]), tool_workers=2)
    result, spans = outcome.result, outcome.spans
    assert (result.status, result.answer, result.trajectories) == ("ok", "2+3 is 5.", 4)
    assert [(c.trajectory, c.status, c.answer) for c in result.candidates] == [
        (0, "ok", "2+3 is 5."),
        (1, "ok", "2+3 is 6."),
        (2, "ok", "2+3 is 5."),
        (3, "ok", "2+3   IS 5."),
    ]
    # Cost counts every trajectory: 2 steps and 2 calls each, and all their tokens.
    chats = [s for s in spans if s.operation == "chat"]
    assert (result.steps, result.tool_calls) == (8, 8)
    assert result.completion_tokens == sum(s.output_tokens for s in chats)
    assert result.prompt_tokens == sum(s.input_tokens for s in chats)
    assert result.reasoning == "the calculator says 5"  # the winner's (trajectory 0's) reasoning
    # Every trajectory is in the trace, under its own ids; one aggregation span records the vote.
    assert sorted({s.trajectory for s in spans}, key=lambda t: -1 if t is None else t) == [None, 0, 1, 2, 3]
    assert len({s.span_id for s in spans}) == len(spans)
    (aggregate,) = [s for s in spans if s.operation == "aggregate"]
    assert aggregate.trajectory is None and aggregate.content == "2+3 is 5."
    assert json.loads(aggregate.aggregation) == {
        "method": "vote",
        "candidates": [0, 1, 2, 3],
        "votes": [3, 1, 3, 3],
        "chosen": 0,
    }
    # Own seeds: trajectory 0 keeps the job's, step s samples with seed + s.
    firsts = sorted((s for s in chats if s.step == 0), key=lambda s: s.trajectory)
    assert [s.request_seed for s in firsts] == [trajectory_seed(7, t) for t in range(4)]
    assert all(s.request_seed == trajectory_seed(7, s.trajectory) + s.step for s in chats)
    # The conversation is recorded once, on trajectory 0.
    assert [s.input_messages is not None for s in firsts] == [True, False, False, False]
    # One prefill of the prompt: the other trajectories start from its KV (all but at most its last partial block).
    prompt = added[0][1]
    assert [ids for rid, ids, _ in added if rid.endswith(":0")] == [prompt] * 4
    block = engine.kv.block_size
    assert all(s.cached_input_tokens >= len(prompt) // block * block for s in firsts[1:])
    assert sum(s.input_tokens - s.cached_input_tokens for s in firsts) <= len(prompt) + 3 * block
    assert not engine.kv.sessions  # every trajectory's session ended


def test_heavy_model_aggregation_reads_the_candidates_in_one_more_turn(k2_checkpoint):
    engine = heavy_engine(k2_checkpoint)
    prompts = {}
    add = engine.add_request
    engine.add_request = lambda ids, params, **kw: (
        prompts.update({kw["request_id"]: list(ids)}) or add(ids, params, **kw)
    )
    (outcome,) = run_episodes(engine, engine.tokenizer, [heavy_spec("m", 3, "model")], caller(["m"]))
    result, spans = outcome.result, outcome.spans
    assert (result.status, result.answer, result.reasoning) == ("ok", "The sum is 5.", "three of four say 5")
    assert result.steps == 3 * 2 + 1 and result.trajectories == 3
    (aggregate,) = [s for s in spans if s.operation == "aggregate"]
    assert aggregate.span_id == "m/aggregate/0/chat0" and aggregate.trajectory is None
    assert engine.tokenizer.decode(aggregate.output_token_ids).startswith("<think>three of four say 5</think>")
    assert json.loads(aggregate.aggregation) == {"method": "model", "candidates": [0, 1, 2]}
    assert aggregate.request_seed == trajectory_seed(7, 3)
    assert json.loads(aggregate.tool_definitions) == []  # the aggregation turn has no tools
    # What the model read: the job's conversation, then the three answers.
    seen = engine.tokenizer.decode(prompts["m/aggregate:0"])
    assert "What is 2+3? (m)" in seen
    assert "## Attempt 1\n2+3 is 5.\n\n## Attempt 2\n2+3 is 6.\n\n## Attempt 3\n2+3 is 5." in seen
    assert result.completion_tokens == sum(s.output_tokens for s in spans if s.operation in ("chat", "aggregate"))


def test_a_failed_aggregation_keeps_the_candidates_and_says_why(k2_checkpoint):
    engine = heavy_engine(k2_checkpoint, aggregate=CALLS)  # the aggregation turn calls tools it does not have
    (outcome,) = run_episodes(engine, engine.tokenizer, [heavy_spec("f", 2, "model")], caller(["f"]))
    result = outcome.result
    assert (result.status, result.error_type, result.answer) == ("error", "aggregation_error", None)
    assert "called tools" in result.error_message
    assert [c.answer for c in result.candidates] == ["2+3 is 5.", "2+3 is 6."]


def test_a_heavy_job_whose_trajectories_all_fail_reports_the_first_ones_end(k2_checkpoint):
    engine = heavy_engine(k2_checkpoint)
    (outcome,) = run_episodes(engine, engine.tokenizer, [heavy_spec("s", 2, "vote", max_steps=1)], caller(["s"]))
    result = outcome.result
    assert (result.status, result.error_type, result.trajectories) == ("step_limit", "step_limit", 2)
    assert result.error_message.startswith("none of the 2 trajectories answered; trajectory 0: episode used its 1")
    assert [c.status for c in result.candidates] == ["step_limit", "step_limit"]
    assert not [s for s in outcome.spans if s.operation == "aggregate"]


def test_heavy_and_plain_jobs_share_a_batch_and_a_heavy_one_replays(k2_checkpoint, tmp_path):
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    table = pa.table(
        {
            "job_id": ["plain", "heavy", "bad"],
            "prompt": ["What is 2+3?", "What is 2+3?", "What is 2+3?"],
            "heavy": pa.array([None, 4, 0], pa.int64()),
        }
    )
    pq.write_table(table, inputs / "jobs.parquet")
    config = config_for(k2_checkpoint)
    config = msgspec.structs.replace(config, agent=msgspec.structs.replace(config.agent, heavy_aggregation="vote"))
    output = str(tmp_path / "out")
    run_batch(str(inputs), output, config, engine=heavy_engine(k2_checkpoint))
    results = read(output, "results").sort("source_row")
    assert results["status"].to_list() == ["ok", "ok", "invalid"]
    assert results["trajectories"].to_list() == [1, 4, 1]
    assert "heavy is 0, expected in [1, 64]" in results["error_message"][2]
    assert results["candidates"][0] is None
    # Users read the candidates with polars, one row per trajectory.
    candidates = (
        results.filter(pl.col("job_id") == "heavy").select("candidates").explode("candidates").unnest("candidates")
    )
    assert candidates["trajectory"].to_list() == [0, 1, 2, 3]
    assert candidates["answer"].to_list() == ["2+3 is 5.", "2+3 is 6.", "2+3 is 5.", "2+3   IS 5."]
    traces = read(output, "traces")
    assert traces.filter(pl.col("job_id") == "plain")["trajectory"].unique().to_list() == [0]
    heavy = traces.filter(pl.col("job_id") == "heavy")
    assert heavy.filter(pl.col("operation") == "execute_tool")["trajectory"].unique().sort().to_list() == [0, 1, 2, 3]
    # The summary's cost counts all four trajectories.
    plain, four = results["completion_tokens"][0], results["completion_tokens"][1]
    assert four > 3 * plain and summarize(output, config.prices).completion_tokens == plain + four

    shutil.rmtree(inputs)  # the trace alone replays every trajectory and the vote
    report = replay_job(output, "heavy", config, engine=heavy_engine(k2_checkpoint))
    assert report.matches, report
    assert [(s.trajectory, s.step) for s in report.steps] == [(t, s) for t in range(4) for s in (0, 1)] + [(None, 0)]


def test_sampled_heavy_trajectories_differ_and_replay_token_for_token(k2_checkpoint, tmp_path):
    """Temperature 1: after the scripted tool calls each trajectory samples its own tokens from its own seed (until
    its budget: none answers), and the replay, alone, reproduces every one of them."""
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    pq.write_table(pa.table({"job_id": ["r"], "prompt": ["Sum: 2, 3"], "heavy": [3]}), inputs / "jobs.parquet")
    config = config_for(k2_checkpoint, temperature=1.0, top_p=0.95)
    output = str(tmp_path / "out")

    def engine():
        engine = engine_for(k2_checkpoint)
        script_steps(engine, {":0": engine.tokenizer.encode_chat(CALLS)})
        return engine

    run_batch(str(inputs), output, config, engine=engine())
    chats = read(output, "traces").filter((pl.col("operation") == "chat") & (pl.col("step") == 1))
    free = chats["output_token_ids"].to_list()
    assert len(free) == 3 and len({tuple(ids) for ids in free}) == 3  # three trajectories, three samples
    report = replay_job(output, "r", config, engine=engine())
    assert report.matches and len(report.steps) == 6, report
    assert report.recorded_status == "token_limit"
