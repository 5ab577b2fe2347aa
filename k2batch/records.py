"""Job, result and trace records: the input columns, their validation, and the Arrow schemas of the output tables."""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Collection, Iterable, Sequence
from typing import Any, Literal, get_args

import msgspec
import msgspec.inspect as mi
import pyarrow as pa

Status = Literal["ok", "invalid", "error", "step_limit", "token_limit"]
STATUSES: tuple[str, ...] = get_args(Status)
Operation = Literal["chat", "execute_tool", "aggregate"]

JOB_COLUMNS = (
    "job_id",
    "task",
    "prompt",
    "messages",
    "system",
    "tools",
    "max_steps",
    "max_new_tokens",
    "temperature",
    "top_p",
    "seed",
    "heavy",
)
# Added by the shard reader (k2batch.shards): where a row came from, and where its job_id first occurred.
SOURCE_COLUMN = "_source"
ROW_COLUMN = "_row"
DUPLICATE_COLUMN = "_duplicate_of"
RESERVED_COLUMNS = (SOURCE_COLUMN, ROW_COLUMN, DUPLICATE_COLUMN)
MESSAGE_ROLES = ("system", "user", "assistant", "tool")
# Every text field a message may have; the chat template sees no others.
MESSAGE_TEXT_FIELDS = ("name", "reasoning_content", "tool_call_id")
MAX_SEED = 2**62
"""Seeds are integers in [0, MAX_SEED): step k of an episode samples with seed + k, which must stay an int64."""
MAX_HEAVY = 64
"""Most trajectories one job may ask for (K2's own heavy mode runs 8)."""


class Job(msgspec.Struct, frozen=True, kw_only=True):
    """One valid input row, parsed; budgets and sampling left None fall back to the config. Its other columns
    pass through to the result row by Arrow (records.results_table), keeping their types."""

    job_id: str
    task: str | None
    prompt: str | None
    messages: list[dict[str, Any]] | None
    system: str | None
    tools: tuple[str, ...]
    max_steps: int | None
    max_new_tokens: int | None
    temperature: float | None
    top_p: float | None
    seed: int | None
    heavy: int | None = None
    """Parallel trajectories, aggregated into one answer; None: the config's agent.heavy."""
    source_file: str
    source_row: int


class Candidate(msgspec.Struct, frozen=True, kw_only=True):
    """One trajectory of a heavy job, as the aggregation saw it."""

    trajectory: int
    status: Status
    answer: str | None
    error_type: str | None
    steps: int
    tool_calls: int


class Result(msgspec.Struct, frozen=True, kw_only=True):
    """One output row per input row, whatever happened to the job."""

    job_id: str | None
    task: str | None
    status: Status
    answer: str | None = None
    reasoning: str | None = None
    """The final step's reasoning_content."""
    error_type: str | None = None
    error_message: str | None = None
    steps: int = 0
    tool_calls: int = 0
    prompt_tokens: int = 0
    cached_prompt_tokens: int = 0
    completion_tokens: int = 0
    reasoning_tokens: int = 0
    latency_s: float = 0.0
    trajectories: int = 1
    """Trajectories the job ran (its `heavy`); the token and call counts above add up all of them."""
    candidates: list[Candidate] | None = None
    """Heavy jobs: every trajectory's outcome, in trajectory order, whose answers the aggregation read."""
    source_file: str
    """Input file and row of the job, so any result (an invalid one above all) leads back to its row."""
    source_row: int


class RunInfo(msgspec.Struct, frozen=True, kw_only=True):
    """Columns shared by every result of one shard attempt, stamped when the table is built."""

    model: str
    config_hash: str
    shard: int
    attempt: int


class TraceSpan(msgspec.Struct, frozen=True, kw_only=True):
    """One span of an episode (OpenTelemetry GenAI names): a chat step, a tool execution, or the aggregation of a
    heavy job's trajectories."""

    job_id: str
    trajectory: int | None = 0
    """Which of a heavy job's trajectories (0 for every other job); None on the aggregation span."""
    step: int
    span_id: str
    parent_span_id: str | None
    operation: Operation
    start_ns: int
    end_ns: int
    input_tokens: int | None = None
    cached_input_tokens: int | None = None
    output_tokens: int | None = None
    output_token_ids: list[int] | None = None
    """The generated ids, so a replay compares tokens, not only text."""
    reasoning_content: str | None = None
    content: str | None = None
    finish_reason: str | None = None
    request_temperature: float | None = None
    request_top_p: float | None = None
    request_top_k: int | None = None
    request_seed: int | None = None
    """This step's own seed (the episode's seed plus the step)."""
    request_max_tokens: int | None = None
    """Tokens this step could generate: what was left of the step, episode and context budgets."""
    input_messages: str | None = None
    """Step 0 only, JSON: the conversation the episode started from, system prompt included."""
    tool_definitions: str | None = None
    """Step 0 only, JSON: the tool declarations the model saw."""
    episode_budgets: str | None = None
    """Step 0 only, JSON: the episode's budgets (steps, tokens, context), which decide where it stops."""
    tool_call_id: str | None = None
    tool_name: str | None = None
    tool_arguments: str | None = None
    """JSON text, as the model wrote it."""
    tool_result: str | None = None
    error_type: str | None = None
    aggregation: str | None = None
    """Aggregation span only, JSON: the method, the candidates it read and, for a vote, the votes."""


_ARROW_TYPES: dict[type, pa.DataType] = {
    mi.StrType: pa.string(),
    mi.LiteralType: pa.string(),
    mi.IntType: pa.int64(),
    mi.FloatType: pa.float64(),
    mi.BoolType: pa.bool_(),
}


def _arrow_type(kind: mi.Type) -> pa.DataType:
    if isinstance(kind, mi.ListType) and isinstance(kind.item_type, mi.IntType):
        return pa.list_(pa.int32())  # token ids: vocabularies stay far below 2**31
    if isinstance(kind, mi.ListType) and isinstance(kind.item_type, mi.StructType):
        return pa.list_(pa.struct(_arrow_fields(kind.item_type.cls)))
    return _ARROW_TYPES[type(kind)]


def _arrow_fields(struct: type[msgspec.Struct]) -> list[pa.Field]:
    """Arrow fields from a Struct's annotations: the Struct is the one list of columns."""
    info = mi.type_info(struct)
    assert isinstance(info, mi.StructType)
    fields = []
    for field in info.fields:
        kind, nullable = field.type, False
        if isinstance(kind, mi.UnionType):
            others = [t for t in kind.types if not isinstance(t, mi.NoneType)]
            nullable = len(others) < len(kind.types)
            (kind,) = others
        fields.append(pa.field(field.encode_name, _arrow_type(kind), nullable=nullable))
    return fields


RESULT_SCHEMA = pa.schema(_arrow_fields(Result) + _arrow_fields(RunInfo))
TRACE_SCHEMA = pa.schema(_arrow_fields(TraceSpan))


def _records_table(records: Sequence[msgspec.Struct], fields: Iterable[pa.Field]) -> pa.Table:
    fields = list(fields)
    rows = [msgspec.structs.astuple(record) for record in records]
    nested = [pa.types.is_list(field.type) and pa.types.is_struct(field.type.value_type) for field in fields]
    columns = [
        pa.array([msgspec.to_builtins(row[i]) if nested[i] else row[i] for row in rows], field.type)
        for i, field in enumerate(fields)
    ]
    return pa.Table.from_arrays(columns, schema=pa.schema(fields))


def traces_table(spans: Sequence[TraceSpan]) -> pa.Table:
    """Spans as a table with exactly TRACE_SCHEMA (also when there are none)."""
    return _records_table(spans, TRACE_SCHEMA)


def results_table(results: Sequence[Result], run: RunInfo, inputs: pa.Table | None = None) -> pa.Table:
    """Results as RESULT_SCHEMA columns plus the pass-through columns of `inputs`, in input order.

    `inputs` is the table the jobs were validated from; each input row needs exactly one result
    (rows in == rows out). Its extra columns keep their Arrow types; one whose name clashes with a
    result column is renamed `input_{name}`."""
    if inputs is None:
        ordered = list(results)
        passthrough = None
    else:
        positions = _input_positions(results, inputs)
        order = sorted(range(len(results)), key=positions.__getitem__)
        ordered = [results[i] for i in order]
        passthrough = _passthrough(inputs).take(pa.array([positions[i] for i in order], pa.int64()))
    stamp = msgspec.structs.astuple(run)
    run_fields = _arrow_fields(RunInfo)
    table = _records_table(ordered, _arrow_fields(Result))
    for field, value in zip(run_fields, stamp, strict=True):
        table = table.append_column(field, pa.array([value] * len(ordered), field.type))
    if passthrough is not None:
        for name, column in zip(passthrough.column_names, passthrough.columns, strict=True):
            table = table.append_column(_passthrough_name(name, table.column_names), _repair_utf8(column))
    return table


def _input_positions(results: Sequence[Result], inputs: pa.Table) -> list[int]:
    sources, rows = _provenance(inputs, "")
    keyed = SOURCE_COLUMN in inputs.column_names
    position = {(sources[i] if keyed else "", rows[i]): i for i in range(inputs.num_rows)}
    found = []
    for result in results:
        key = (result.source_file if keyed else "", result.source_row)
        if key not in position:
            raise ValueError(f"result for {result.source_file} row {result.source_row} matches no input row")
        found.append(position[key])
    if len(set(found)) != len(found) or len(found) != inputs.num_rows:
        raise ValueError(
            f"{len(found)} results for {inputs.num_rows} input rows ({len(set(found))} distinct): "
            "every input row needs exactly one result"
        )
    return found


def _passthrough(table: pa.Table) -> pa.Table:
    return table.select([name for name in table.column_names if name not in JOB_COLUMNS + RESERVED_COLUMNS])


def _passthrough_name(name: str, taken: Sequence[str]) -> str:
    while name in taken:
        name = f"input_{name}"
    return name


def _provenance(table: pa.Table, source: str) -> tuple[list[str], list[int]]:
    """File and row of each row: the shard reader's columns when present, else `source` and the position."""
    n = table.num_rows
    sources = table.column(SOURCE_COLUMN).to_pylist() if SOURCE_COLUMN in table.column_names else [source] * n
    rows = table.column(ROW_COLUMN).to_pylist() if ROW_COLUMN in table.column_names else list(range(n))
    return sources, rows


def _is_text(kind: pa.DataType) -> bool:
    return pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_string_view(kind)


def _is_bytes(kind: pa.DataType) -> bool:
    return pa.types.is_binary(kind) or pa.types.is_large_binary(kind) or pa.types.is_binary_view(kind)


def _repair_utf8(column: pa.ChunkedArray) -> pa.ChunkedArray:
    """A text column with invalid UTF-8 bytes replaced (U+FFFD): polars refuses to read such files at all."""
    if not _is_text(column.type):
        return column
    try:
        column.validate(full=True)
        return column
    except pa.ArrowInvalid:
        values = column.cast(pa.large_binary()).to_pylist()
        return pa.chunked_array([pa.array([_decode(v, "replace") for v in values], column.type)], column.type)


def _decode(value: bytes | None, errors: str = "strict") -> str | None:
    return None if value is None else value.decode("utf-8", errors)


class _Problems:
    """Problems per row, in the order found: the first names the error_type, the message lists them all."""

    def __init__(self, n: int) -> None:
        self.rows: list[list[tuple[str, str]]] = [[] for _ in range(n)]
        self.unreadable: list[set[str]] = [set() for _ in range(n)]
        """Columns whose value could not be read, per row: their absence is no further problem."""

    def add(self, row: int, error_type: str, message: str, column: str = "") -> None:
        self.rows[row].append((error_type, message))
        if column:
            self.unreadable[row].add(column)

    def add_all(self, error_type: str, message: str, column: str) -> None:
        for row in range(len(self.rows)):
            self.add(row, error_type, message, column)


def _text_column(table: pa.Table, name: str, problems: _Problems) -> list[str | None]:
    """Text values of a string (or UTF-8 binary) column; wrong types and invalid bytes become problems."""
    n = table.num_rows
    if name not in table.column_names:
        return [None] * n
    column = table.column(name)
    if pa.types.is_dictionary(column.type):
        column = column.cast(column.type.value_type)
    if pa.types.is_null(column.type):
        return [None] * n
    if not (_is_text(column.type) or _is_bytes(column.type)):
        problems.add_all("wrong_type", f"column '{name}' has type {column.type}, expected string", name)
        return [None] * n
    values: list[str | None] = []
    for row, raw in enumerate(column.cast(pa.large_binary()).to_pylist()):
        try:
            values.append(_decode(raw))
        except UnicodeDecodeError:
            problems.add(row, "invalid_utf8", f"{name} is not valid UTF-8 text", name)
            values.append(None)
    return values


def _number_column(table: pa.Table, name: str, problems: _Problems, *, integer: bool) -> list[Any]:
    n = table.num_rows
    if name not in table.column_names or pa.types.is_null(table.column(name).type):
        return [None] * n
    kind = table.column(name).type
    if not (pa.types.is_integer(kind) or (not integer and pa.types.is_floating(kind))):
        expected = "an integer" if integer else "a number"
        problems.add_all("wrong_type", f"column '{name}' has type {kind}, expected {expected}", name)
        return [None] * n
    values = table.column(name).to_pylist()
    return values if integer else [None if v is None else float(v) for v in values]


def _tools_column(table: pa.Table, problems: _Problems) -> list[list[str] | None]:
    n = table.num_rows
    if "tools" not in table.column_names or pa.types.is_null(table.column("tools").type):
        return [None] * n
    column = table.column("tools")
    kind = column.type
    is_list = pa.types.is_list(kind) or pa.types.is_large_list(kind) or pa.types.is_fixed_size_list(kind)
    if not (is_list and (_is_text(kind.value_type) or _is_bytes(kind.value_type))):
        problems.add_all("wrong_type", f"column 'tools' has type {kind}, expected list<string>", "tools")
        return [None] * n
    values: list[list[str] | None] = []
    for row, raw in enumerate(column.cast(pa.large_list(pa.large_binary())).to_pylist()):
        names = None
        if raw is not None and None in raw:
            problems.add(row, "wrong_type", "tools holds a null name", "tools")
        elif raw is not None:
            try:
                names = [item.decode("utf-8") for item in raw]
            except UnicodeDecodeError:
                problems.add(row, "invalid_utf8", "tools holds a name that is not valid UTF-8 text", "tools")
        values.append(names)
    return values


def _check_passthrough_text(table: pa.Table, problems: _Problems) -> None:
    """Invalid UTF-8 in a pass-through text column is a problem of its row, as in any other text column."""
    for name in _passthrough(table).column_names:
        if _is_text(table.column(name).type):
            _text_column(table, name, problems)


def _parse_messages(text: str) -> tuple[list[dict[str, Any]] | None, str | None]:
    """The conversation, or why it is not a JSON list of {role, content} objects with text fields."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        return None, f"messages is not valid JSON ({exc})"
    except (ValueError, RecursionError) as exc:  # an integer of thousands of digits, nesting too deep
        return None, f"messages cannot be read as JSON ({type(exc).__name__}: {exc})"
    if not isinstance(value, list) or not value:
        return None, "messages must be a non-empty JSON list of {role, content} objects"
    for k, message in enumerate(value):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            return None, f"messages[{k}] is not an object with role and content"
        role, content = message["role"], message["content"]
        if role not in MESSAGE_ROLES:
            return None, f"messages[{k}] has role {role!r}, expected one of {', '.join(MESSAGE_ROLES)}"
        # An assistant turn that only calls tools may have no content.
        if not (isinstance(content, str) or (content is None and role == "assistant")):
            return None, f"messages[{k}].content must be a string"
        why = _message_fields_problem(message)
        if why:
            return None, f"messages[{k}]{why}"
    return value, None


def _message_fields_problem(message: dict[str, Any]) -> str | None:
    """Why a message's fields other than role and content are not what the chat template takes, if they are not:
    text fields are strings, tool calls are objects with a string id and a function with a string name and
    arguments as a JSON string or object."""
    unknown = sorted(set(message) - {"role", "content", "tool_calls", *MESSAGE_TEXT_FIELDS})
    if unknown:
        return f" has unknown field {unknown[0]!r}"
    for field in MESSAGE_TEXT_FIELDS:
        if field in message and not isinstance(message[field], str | None):
            return f".{field} must be a string"
    calls = message.get("tool_calls")
    if calls is None:
        return None
    if message["role"] != "assistant" or not isinstance(calls, list):
        return ".tool_calls must be a list, on an assistant message"
    for i, call in enumerate(calls):
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict) or not isinstance(call.get("id"), str):
            return f".tool_calls[{i}] must be an object with a string id and a function object"
        if not isinstance(call.get("type", "function"), str) or set(call) - {"id", "type", "function"}:
            return f".tool_calls[{i}] may hold only id, type and function"
        if not isinstance(function.get("name"), str) or set(function) - {"name", "arguments"}:
            return f".tool_calls[{i}].function must hold a string name and arguments"
        if not isinstance(function.get("arguments", ""), str | dict):
            return f".tool_calls[{i}].function.arguments must be a JSON string or object"
    return None


def validate_jobs(
    table: pa.Table,
    *,
    known_tools: Collection[str],
    default_tools: Sequence[str],
    count_tokens: Callable[[str], int] | None = None,
    max_prompt_tokens: int | None = None,
    source: str = "<input>",
) -> tuple[list[Job], list[Result]]:
    """Split input rows into runnable jobs and `invalid` results; together they cover every row once.

    Rows are named by the shard reader's `_source`/`_row` columns when present, else by `source` and
    position. A job_id seen earlier (in this table, or per `_duplicate_of` in an earlier shard) makes
    the row invalid: the first occurrence runs. The prompt length check counts the job's own text
    (system, prompt or message contents) with `count_tokens`."""
    n = table.num_rows
    problems = _Problems(n)
    sources, rows = _provenance(table, source)
    job_ids = _text_column(table, "job_id", problems)
    tasks = _text_column(table, "task", problems)
    prompts = _text_column(table, "prompt", problems)
    messages_texts = _text_column(table, "messages", problems)
    systems = _text_column(table, "system", problems)
    tool_lists = _tools_column(table, problems)
    max_steps = _number_column(table, "max_steps", problems, integer=True)
    max_new_tokens = _number_column(table, "max_new_tokens", problems, integer=True)
    temperatures = _number_column(table, "temperature", problems, integer=False)
    top_ps = _number_column(table, "top_p", problems, integer=False)
    seeds = _number_column(table, "seed", problems, integer=True)
    heavies = _number_column(table, "heavy", problems, integer=True)
    _check_passthrough_text(table, problems)
    duplicate_of = _text_column(table, DUPLICATE_COLUMN, problems)

    first_seen: dict[str, str] = {}
    messages: list[list[dict[str, Any]] | None] = [None] * n
    for row in range(n):
        where = f"{sources[row]} row {rows[row]}"
        unreadable = problems.unreadable[row]
        job_id = job_ids[row]
        if not job_id:
            if "job_id" not in table.column_names:
                problems.add(row, "missing_job_id", "the input has no job_id column")
            elif "job_id" not in unreadable:
                problems.add(row, "missing_job_id", "job_id is missing")
        elif duplicate_of[row] or job_id in first_seen:
            first = duplicate_of[row] or first_seen[job_id]
            problems.add(row, "duplicate_job_id", f"job_id {job_id!r} already used by {first}; only that row runs")
        else:
            first_seen[job_id] = where

        prompt, messages_text = prompts[row] or None, messages_texts[row] or None
        if prompt and messages_text:
            problems.add(row, "prompt_and_messages", "both prompt and messages are set; give one")
        elif not prompt and not messages_text and not unreadable & {"prompt", "messages"}:
            problems.add(row, "no_prompt", "neither prompt nor messages is set; give one")
        elif messages_text:
            messages[row], why = _parse_messages(messages_text)
            if why:
                problems.add(row, "invalid_messages", why)

        tools = tool_lists[row]
        if tools is not None:
            unknown = sorted(set(tools) - set(known_tools))
            if unknown:
                problems.add(
                    row,
                    "unknown_tool",
                    f"unknown tools {', '.join(map(repr, unknown))}; known: {', '.join(sorted(known_tools))}",
                )

        for name, value, ok, expected in (
            ("max_steps", max_steps[row], lambda v: v >= 1, "at least 1"),
            ("max_new_tokens", max_new_tokens[row], lambda v: v >= 1, "at least 1"),
            ("temperature", temperatures[row], lambda v: math.isfinite(v) and v >= 0, "a number >= 0"),
            ("top_p", top_ps[row], lambda v: 0 < v <= 1, "in (0, 1]"),
            ("seed", seeds[row], lambda v: 0 <= v < MAX_SEED, "in [0, 2**62)"),
            ("heavy", heavies[row], lambda v: 1 <= v <= MAX_HEAVY, f"in [1, {MAX_HEAVY}]"),
        ):
            if value is not None and not ok(value):
                problems.add(row, "invalid_value", f"{name} is {value}, expected {expected}")

        if count_tokens is not None and max_prompt_tokens is not None and not problems.rows[row]:
            texts = [systems[row] or "", prompt or ""] + [m["content"] or "" for m in messages[row] or []]
            tokens = sum(count_tokens(text) for text in texts if text)
            if tokens > max_prompt_tokens:
                what = "prompt has" if prompt else "messages have"
                problems.add(row, "prompt_too_long", f"{what} {tokens:,} tokens, context is {max_prompt_tokens:,}")

    jobs: list[Job] = []
    invalid: list[Result] = []
    for row in range(n):
        job_id, tools = job_ids[row], tool_lists[row]
        if problems.rows[row] or not job_id:  # (a row without job_id always has a problem)
            label = f"job {job_id!r}" if job_id else "no job_id"
            invalid.append(
                Result(
                    job_id=job_id or None,
                    task=tasks[row],
                    status="invalid",
                    error_type=problems.rows[row][0][0],
                    error_message=f"{sources[row]} row {rows[row]} ({label}): "
                    + "; ".join(message for _, message in problems.rows[row]),
                    source_file=sources[row],
                    source_row=rows[row],
                )
            )
            continue
        jobs.append(
            Job(
                job_id=job_id,
                task=tasks[row],
                prompt=prompts[row] or None,
                messages=messages[row],
                system=systems[row],
                tools=tuple(default_tools if tools is None else tools),
                max_steps=max_steps[row],
                max_new_tokens=max_new_tokens[row],
                temperature=temperatures[row],
                top_p=top_ps[row],
                seed=seeds[row],
                heavy=heavies[row],
                source_file=sources[row],
                source_row=rows[row],
            )
        )
    return jobs, invalid
