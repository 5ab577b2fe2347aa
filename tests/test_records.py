"""Input validation (every bad row becomes an `invalid` result; rows in == rows out) and the output table schemas."""

from __future__ import annotations

import datetime
import decimal
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from k2batch.records import (
    DUPLICATE_COLUMN,
    RESULT_SCHEMA,
    ROW_COLUMN,
    SOURCE_COLUMN,
    TRACE_SCHEMA,
    Job,
    Result,
    RunInfo,
    TraceSpan,
    results_table,
    traces_table,
    validate_jobs,
)

TOOLS = {"search", "calculator", "python", "read_object", "now"}
RUN = RunInfo(model="k2-demo", config_hash="abc123", shard=7, attempt=1)
SOURCE = "inputs/a.parquet"


def validate(
    table: pa.Table, count_tokens: Callable[[str], int] | None = None, max_prompt_tokens: int | None = None
) -> tuple[list[Job], list[Result]]:
    jobs, invalid = validate_jobs(
        table,
        known_tools=TOOLS,
        default_tools=("search", "calculator"),
        count_tokens=count_tokens,
        max_prompt_tokens=max_prompt_tokens,
        source=SOURCE,
    )
    assert len(jobs) + len(invalid) == table.num_rows  # rows in == rows out
    assert all(r.status == "invalid" and r.error_type and r.error_message for r in invalid)
    return jobs, invalid


def errors(invalid: list[Result]) -> dict[int, tuple[str | None, str | None]]:
    return {r.source_row: (r.error_type, r.error_message) for r in invalid}


def invalid_utf8_strings(values: list[bytes | None]) -> pa.Array:
    """A string array holding bytes that are not UTF-8, as a careless Parquet writer can produce."""
    raw = pa.array(values, pa.binary())
    return pa.Array.from_buffers(pa.string(), len(raw), raw.buffers(), null_count=raw.null_count)


def test_valid_rows_become_jobs_with_defaults() -> None:
    messages = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": None},
        {"role": "tool", "content": "4"},
    ]
    table = pa.table(
        {
            "job_id": ["a", "b"],
            "task": ["retrieval", None],
            "prompt": ["What is 2+2?", None],
            "messages": [None, json.dumps(messages)],
            "system": [None, "Be brief."],
            "tools": pa.array([None, ["python"]], pa.list_(pa.string())),
            "max_steps": pa.array([None, 5], pa.int32()),
            "max_new_tokens": [None, 100],
            "temperature": [0.0, None],
            "top_p": pa.array([None, 1], pa.int8()),  # integers are numbers too
            "seed": [None, 42],
            "doc_id": pa.array([10, 11], pa.int16()),
        }
    )
    jobs, invalid = validate(table)
    assert invalid == []
    a, b = jobs
    assert a == Job(
        job_id="a",
        task="retrieval",
        prompt="What is 2+2?",
        messages=None,
        system=None,
        tools=("search", "calculator"),
        max_steps=None,
        max_new_tokens=None,
        temperature=0.0,
        top_p=None,
        seed=None,
        source_file=SOURCE,
        source_row=0,
    )
    assert b.messages == messages and b.prompt is None and b.tools == ("python",)
    assert (b.max_steps, b.max_new_tokens, b.top_p, b.seed, b.system) == (5, 100, 1.0, 42, "Be brief.")


def test_a_conversation_with_every_message_field() -> None:
    messages = [
        {"role": "user", "name": "ann", "content": "2*3?"},
        {
            "role": "assistant",
            "content": None,
            "reasoning_content": "use the tool",
            "tool_calls": [
                {
                    "id": "functions.calculator:0",
                    "type": "function",
                    "function": {"name": "calculator", "arguments": {"expression": "2*3"}},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "functions.calculator:0", "name": "calculator", "content": "6"},
    ]
    jobs, invalid = validate(pa.table({"job_id": ["a"], "messages": [json.dumps(messages)]}))
    assert invalid == [] and jobs[0].messages == messages


def test_missing_and_duplicate_job_ids() -> None:
    table = pa.table({"job_id": ["x", None, "", "x", "y", "x"], "prompt": ["p"] * 6})
    jobs, invalid = validate(table)
    assert [j.job_id for j in jobs] == ["x", "y"]
    found = errors(invalid)
    assert found[1] == ("missing_job_id", "inputs/a.parquet row 1 (no job_id): job_id is missing")
    assert found[2][0] == "missing_job_id"
    assert found[3] == (
        "duplicate_job_id",
        "inputs/a.parquet row 3 (job 'x'): job_id 'x' already used by inputs/a.parquet row 0; only that row runs",
    )
    assert found[5][0] == "duplicate_job_id"
    assert [r.job_id for r in invalid] == [None, None, "x", "x"]


def test_no_job_id_column_makes_every_row_invalid() -> None:
    jobs, invalid = validate(pa.table({"prompt": ["a", "b"]}))
    assert jobs == [] and {r.error_message for r in invalid} == {
        "inputs/a.parquet row 0 (no job_id): the input has no job_id column",
        "inputs/a.parquet row 1 (no job_id): the input has no job_id column",
    }


def test_the_first_occurrence_runs_even_when_an_earlier_shard_had_it() -> None:
    table = pa.table(
        {
            "job_id": ["a", "b"],
            "prompt": ["p", "q"],
            SOURCE_COLUMN: ["inputs/b.parquet", "inputs/b.parquet"],
            ROW_COLUMN: pa.array([40, 41], pa.int64()),
            DUPLICATE_COLUMN: pa.array([None, "inputs/a.parquet row 3"], pa.string()),
        }
    )
    jobs, invalid = validate(table)
    assert [(j.job_id, j.source_file, j.source_row) for j in jobs] == [("a", "inputs/b.parquet", 40)]
    assert errors(invalid)[41] == (
        "duplicate_job_id",
        "inputs/b.parquet row 41 (job 'b'): job_id 'b' already used by inputs/a.parquet row 3; only that row runs",
    )


def test_prompt_and_messages_exactly_one() -> None:
    table = pa.table(
        {
            "job_id": ["none", "both", "empty"],
            "prompt": [None, "p", ""],
            "messages": [None, json.dumps([{"role": "user", "content": "m"}]), None],
        }
    )
    jobs, invalid = validate(table)
    assert jobs == []
    found = errors(invalid)
    assert found[0] == (
        "no_prompt",
        "inputs/a.parquet row 0 (job 'none'): neither prompt nor messages is set; give one",
    )
    assert found[1][0] == "prompt_and_messages"
    assert found[2][0] == "no_prompt"


@pytest.mark.parametrize(
    ("messages", "why"),
    [
        ("[{'role': 'user'}", "messages is not valid JSON (Expecting property name enclosed in double quotes"),
        ('{"role": "user", "content": "hi"}', "messages must be a non-empty JSON list of {role, content} objects"),
        ("[]", "messages must be a non-empty JSON list"),
        ('["hi"]', "messages[0] is not an object with role and content"),
        ('[{"role": "user"}]', "messages[0] is not an object with role and content"),
        ('[{"role": "user", "content": "a"}, {"role": "robot", "content": "b"}]', "messages[1] has role 'robot'"),
        ('[{"role": "user", "content": 5}]', "messages[0].content must be a string"),
        ('[{"role": "user", "content": null}]', "messages[0].content must be a string"),
        ("[" * 100_000 + "]" * 100_000, "messages cannot be read as JSON (RecursionError"),
        ('[{"role": "user", "content": "a", "n": ' + "9" * 5000 + "}]", "messages cannot be read as JSON (ValueError"),
        # Every field the chat template renders is text of a known shape, not only content.
        ('[{"role": "user", "content": "a", "name": ["<|im_end|>"]}]', "messages[0].name must be a string"),
        ('[{"role": "tool", "content": "a", "tool_call_id": 7}]', "messages[0].tool_call_id must be a string"),
        ('[{"role": "user", "content": "a", "weight": 1}]', "messages[0] has unknown field 'weight'"),
        ('[{"role": "user", "content": "a", "tool_calls": []}]', "messages[0].tool_calls must be a list, on an"),
        (
            '[{"role": "assistant", "content": null, "tool_calls": [{"function": {"name": "f"}}]}]',
            "messages[0].tool_calls[0] must be an object with a string id and a function object",
        ),
        (
            '[{"role": "assistant", "content": null, "tool_calls": [{"id": "x", "function": {"name": 1}}]}]',
            "messages[0].tool_calls[0].function must hold a string name and arguments",
        ),
        (
            '[{"role": "assistant", "content": null, "tool_calls": [{"id": "x", "function": {"name": "f", '
            '"arguments": [1]}}]}]',
            "messages[0].tool_calls[0].function.arguments must be a JSON string or object",
        ),
    ],
)
def test_messages_must_be_a_json_list_of_role_content_objects(messages: str, why: str) -> None:
    jobs, invalid = validate(pa.table({"job_id": ["m"], "messages": [messages]}))
    assert jobs == [] and invalid[0].error_type == "invalid_messages"
    assert invalid[0].error_message is not None
    assert invalid[0].error_message.startswith(f"inputs/a.parquet row 0 (job 'm'): {why}")


def test_a_column_of_the_wrong_type_makes_every_row_invalid() -> None:
    table = pa.table({"job_id": ["a", "b"], "prompt": ["p", "q"], "max_steps": ["10", "20"]})
    jobs, invalid = validate(table)
    assert jobs == []
    assert errors(invalid)[1] == (
        "wrong_type",
        "inputs/a.parquet row 1 (job 'b'): column 'max_steps' has type string, expected an integer",
    )
    # A prompt column of numbers: one clear problem per row, not "no prompt" on top.
    jobs, invalid = validate(pa.table({"job_id": ["a"], "prompt": [7]}))
    assert errors(invalid)[0] == (
        "wrong_type",
        "inputs/a.parquet row 0 (job 'a'): column 'prompt' has type int64, expected string",
    )
    wrong: dict[str, Any] = {
        "tools": ["search"],
        "temperature": ["hot"],
        "seed": [1.5],
        "job_id": [1],
        "messages": pa.array([[1]], pa.list_(pa.int64())),
    }
    for name, values in wrong.items():
        jobs, invalid = validate(pa.table({"job_id": ["a"], "prompt": ["p"]} | {name: values}))
        assert jobs == [] and invalid[0].error_type == "wrong_type", name
        assert f"column '{name}' has type" in (invalid[0].error_message or "")


def test_out_of_range_values_and_all_problems_in_one_message() -> None:
    table = pa.table(
        {
            "job_id": ["a", "b"],
            "prompt": ["p", "q"],
            "max_steps": [0, 3],
            "temperature": [-1.0, float("nan")],
            "top_p": [1.5, 0.5],
            "seed": [-3, 1],
        }
    )
    _, invalid = validate(table)
    assert errors(invalid)[0] == (
        "invalid_value",
        "inputs/a.parquet row 0 (job 'a'): max_steps is 0, expected at least 1; temperature is -1.0, expected a "
        "number >= 0; top_p is 1.5, expected in (0, 1]; seed is -3, expected in [0, 2**62)",
    )
    assert errors(invalid)[1] == (
        "invalid_value",
        "inputs/a.parquet row 1 (job 'b'): temperature is nan, expected a number >= 0",
    )


@pytest.mark.parametrize(
    "seeds",
    [pa.array([2**62 - 1, 2**62, 2**63 - 1], pa.int64()), pa.array([2**62 - 1, 2**62, 2**64 - 1], pa.uint64())],
    ids=["int64", "uint64"],
)
def test_seeds_stay_below_2_to_the_62(seeds: pa.Array) -> None:
    # Step k of an episode samples with seed + k, and traces store it as int64: a seed near 2**63 would overflow.
    jobs, invalid = validate(pa.table({"job_id": ["a", "b", "c"], "prompt": ["p"] * 3, "seed": seeds}))
    assert [job.seed for job in jobs] == [2**62 - 1]
    assert [(r.job_id, r.error_type) for r in invalid] == [("b", "invalid_value"), ("c", "invalid_value")]
    assert "seed is 4611686018427387904, expected in [0, 2**62)" in (invalid[0].error_message or "")


def test_unknown_tools() -> None:
    table = pa.table({"job_id": ["a", "b"], "prompt": ["p", "q"], "tools": [["search", "shell", "browser"], []]})
    jobs, invalid = validate(table)
    assert [j.tools for j in jobs] == [()]  # an empty list means no tools, not the default
    assert errors(invalid)[0] == (
        "unknown_tool",
        "inputs/a.parquet row 0 (job 'a'): unknown tools 'browser', 'shell'; "
        "known: calculator, now, python, read_object, search",
    )


def test_prompt_longer_than_the_context() -> None:
    sizes = {"huge": 300_118, "small": 10, "sys": 5}
    table = pa.table(
        {
            "job_id": ["x", "ok", "m"],
            "prompt": ["huge", "small", None],
            "messages": [None, None, json.dumps([{"role": "user", "content": "small"}] * 3)],
            "system": [None, "sys", "sys"],
        }
    )
    jobs, invalid = validate(table, count_tokens=sizes.__getitem__, max_prompt_tokens=262_144)
    assert [j.job_id for j in jobs] == ["ok", "m"]
    assert errors(invalid)[0] == (
        "prompt_too_long",
        "inputs/a.parquet row 0 (job 'x'): prompt has 300,118 tokens, context is 262,144",
    )
    _, invalid = validate(table, count_tokens=sizes.__getitem__, max_prompt_tokens=34)
    assert errors(invalid)[2] == (
        "prompt_too_long",
        "inputs/a.parquet row 2 (job 'm'): messages have 35 tokens, context is 34",
    )


def test_text_that_is_not_utf8() -> None:
    # Binary columns are read as UTF-8 text when they are; invalid bytes in any text column invalidate the row.
    table = pa.table(
        {
            "job_id": pa.array([b"a", b"b", b"c"], pa.binary()),
            "prompt": pa.array(["fine", "also fine", "fine"]),
            "system": invalid_utf8_strings([None, b"\xff\xfe", None]),
            "notes": invalid_utf8_strings([b"ok", b"ok", b"bad \xc3\x28"]),
        }
    )
    jobs, invalid = validate(table)
    assert [j.job_id for j in jobs] == ["a"]
    assert errors(invalid) == {
        1: ("invalid_utf8", "inputs/a.parquet row 1 (job 'b'): system is not valid UTF-8 text"),
        2: ("invalid_utf8", "inputs/a.parquet row 2 (job 'c'): notes is not valid UTF-8 text"),
    }
    _, invalid = validate(pa.table({"job_id": ["x"], "prompt": pa.array([b"\x80abc"], pa.large_binary())}))
    assert errors(invalid)[0] == ("invalid_utf8", "inputs/a.parquet row 0 (job 'x'): prompt is not valid UTF-8 text")


def test_an_empty_table_gives_nothing() -> None:
    assert validate(pa.table({"job_id": pa.array([], pa.string()), "prompt": pa.array([], pa.string())})) == ([], [])


def ok_result(job: Job) -> Result:
    return Result(
        job_id=job.job_id,
        task=job.task,
        status="ok",
        answer="4",
        reasoning="2+2",
        steps=2,
        tool_calls=1,
        prompt_tokens=50,
        cached_prompt_tokens=32,
        completion_tokens=20,
        reasoning_tokens=12,
        latency_s=0.5,
        source_file=job.source_file,
        source_row=job.source_row,
    )


def passthrough_inputs(job_ids: list[str | None]) -> pa.Table:
    n = len(job_ids)
    return pa.table(
        {
            "job_id": job_ids,
            "prompt": ["p"] * n,
            "answer": ["gold"] * n,  # clashes with the result column: kept as input_answer
            "when": pa.array(
                [datetime.datetime(2025, 1, i + 1, tzinfo=datetime.UTC) for i in range(n)], pa.timestamp("ms", "UTC")
            ),
            "price": pa.array([decimal.Decimal("1.25")] * n, pa.decimal128(5, 2)),
            "labels": pa.array([[i, i + 1] for i in range(n)], pa.list_(pa.int32())),
            "kind": pa.array(["x"] * n).dictionary_encode(),
            "meta": pa.array([{"k": i} for i in range(n)], pa.struct([("k", pa.uint8())])),
        }
    )


def test_result_tables_have_one_schema_whatever_the_rows_hold(tmp_path: Path) -> None:
    all_bad = passthrough_inputs([None, None])
    some_ok = passthrough_inputs(["a", None, "b"])
    jobs_bad, invalid_bad = validate(all_bad)
    jobs_ok, invalid_ok = validate(some_ok)
    assert jobs_bad == [] and len(jobs_ok) == 2
    bad = results_table(invalid_bad, RUN, all_bad)
    # Results arrive in completion order; the table is in input order.
    good = results_table([ok_result(jobs_ok[1]), *invalid_ok, ok_result(jobs_ok[0])], RUN, some_ok)
    empty = results_table([], RUN, some_ok.slice(0, 0))
    assert bad.schema == good.schema == empty.schema
    assert bad.schema.names[: len(RESULT_SCHEMA)] == RESULT_SCHEMA.names
    assert pa.schema(list(good.schema)[: len(RESULT_SCHEMA)]) == RESULT_SCHEMA
    assert good.schema.names[len(RESULT_SCHEMA) :] == ["input_answer", "when", "price", "labels", "kind", "meta"]
    for name in ["when", "price", "labels", "kind", "meta"]:
        assert good.schema.field(name).type == some_ok.schema.field(name).type
        assert good.column(name).to_pylist() == some_ok.column(name).to_pylist()
    assert good.column("job_id").to_pylist() == ["a", None, "b"]
    assert good.column("status").to_pylist() == ["ok", "invalid", "ok"]
    assert set(good.column("shard").to_pylist()) == {7} and set(good.column("config_hash").to_pylist()) == {"abc123"}

    pq.write_table(good, tmp_path / "r.parquet")
    frame = pl.read_parquet(tmp_path / "r.parquet")
    assert frame.filter(pl.col("status") == "invalid")["error_type"].to_list() == ["missing_job_id"]


def test_results_without_inputs_have_the_bare_schema() -> None:
    table = results_table(
        [
            Result(
                job_id="a",
                task=None,
                status="error",
                error_type="engine",
                error_message="boom",
                source_file="f",
                source_row=0,
            )
        ],
        RUN,
    )
    assert table.schema == RESULT_SCHEMA and table.num_rows == 1


def test_every_input_row_needs_exactly_one_result() -> None:
    inputs = pa.table({"job_id": ["a", "b"], "prompt": ["p", "q"]})
    jobs, _ = validate(inputs)
    with pytest.raises(ValueError, match="1 results for 2 input rows"):
        results_table([ok_result(jobs[0])], RUN, inputs)
    with pytest.raises(ValueError, match="every input row needs exactly one result"):
        results_table([ok_result(jobs[0]), ok_result(jobs[0])], RUN, inputs)


def test_invalid_text_in_a_passthrough_column_is_repaired_in_the_output(tmp_path: Path) -> None:
    inputs = pa.table(
        {"job_id": ["a", "b"], "prompt": ["p", "q"], "notes": invalid_utf8_strings([b"fine", b"bad \xff"])}
    )
    jobs, invalid = validate(inputs)
    table = results_table([ok_result(jobs[0]), *invalid], RUN, inputs)
    pq.write_table(table, tmp_path / "r.parquet")
    assert pl.read_parquet(tmp_path / "r.parquet")["notes"].to_list() == ["fine", "bad \ufffd"]


def span(**fields: Any) -> TraceSpan:
    return TraceSpan(job_id="a", step=0, span_id="s1", parent_span_id=None, start_ns=1, end_ns=2, **fields)


def test_trace_tables_have_one_schema() -> None:
    chat = span(
        operation="chat",
        input_tokens=10,
        cached_input_tokens=0,
        output_tokens=5,
        finish_reason="tool_calls",
        output_token_ids=[7, 163586, 3, 3, 9],
        request_temperature=1.0,
        request_seed=12,
        input_messages="[]",
    )
    tool = span(operation="execute_tool", tool_name="search", tool_arguments='{"q": "x"}', tool_result="doc")
    spans = [chat, tool]
    table = traces_table(spans)
    assert table.schema == traces_table([]).schema == traces_table([tool]).schema == TRACE_SCHEMA
    assert table.column("operation").to_pylist() == ["chat", "execute_tool"]
    assert table.column("output_tokens").to_pylist() == [5, None]
    assert table.column("output_token_ids").to_pylist() == [[7, 163586, 3, 3, 9], None]
    assert TRACE_SCHEMA.field("output_token_ids").type == pa.list_(pa.int32())
    assert table.column("request_seed").to_pylist() == [12, None]
    assert TRACE_SCHEMA.field("start_ns").type == pa.int64() and not TRACE_SCHEMA.field("job_id").nullable
