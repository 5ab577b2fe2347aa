"""The tool registry: registration, schemas, and every failure turned into a readable result."""

import json
import threading
import time
from datetime import UTC, datetime

import pytest

from k2batch.agent.tools import TOOLS, ToolContext, ToolRegistry, ToolSettings
from k2batch.agent.tools.schema import validate


def make_ctx() -> ToolContext:
    return ToolContext.for_job("job-1", "draft", ToolSettings(now="2031-05-06T07:08:09Z"))


@pytest.fixture()
def registry() -> ToolRegistry:
    registry = ToolRegistry()

    @registry.tool(
        name="echo",
        description="Repeat the text.",
        parameters={
            "type": "object",
            "properties": {
                "text": {"type": "string"},
                "times": {"type": "integer", "minimum": 1, "maximum": 3},
                "style": {"type": "string", "enum": ["plain", "loud"]},
                "tags": {"type": "array", "items": {"type": "string"}},
            },
            "required": ["text"],
        },
    )
    def echo(args: dict, ctx: ToolContext) -> str:
        return args["text"] * args.get("times", 1)

    @registry.tool(name="boom", description="Fails.", parameters={"type": "object", "properties": {}})
    def boom(args: dict, ctx: ToolContext) -> str:
        raise RuntimeError("disk on fire")

    @registry.tool(name="slow", description="Sleeps.", parameters={"type": "object", "properties": {}})
    def slow(args: dict, ctx: ToolContext) -> str:
        time.sleep(5)
        return "done"

    @registry.tool(name="number", description="Not text.", parameters={"type": "object", "properties": {}})
    def number(args: dict, ctx: ToolContext) -> str:
        return 42  # type: ignore[return-value]

    return registry


def call(registry: ToolRegistry, name: str, arguments: str, timeout_s: float = 5.0, max_chars: int = 1000):
    return registry.call(name, arguments, make_ctx(), timeout_s, max_chars)


def test_decorator_registers_and_schemas_follow_the_openai_format(registry: ToolRegistry) -> None:
    assert registry.names() == ["boom", "echo", "number", "slow"]
    assert "echo" in registry and "nope" not in registry
    [schema] = registry.schemas(["echo"])
    assert schema["type"] == "function"
    assert schema["function"]["name"] == "echo"
    assert schema["function"]["description"] == "Repeat the text."
    assert schema["function"]["parameters"]["required"] == ["text"]
    assert [s["function"]["name"] for s in registry.schemas(["slow", "boom"])] == ["slow", "boom"]
    assert len(registry.schemas()) == 4
    with pytest.raises(KeyError, match="unknown tools \\['nope'\\]"):
        registry.schemas(["nope"])


def test_registration_refuses_bad_names_duplicates_and_unsupported_schemas(registry: ToolRegistry) -> None:
    params = {"type": "object", "properties": {}}
    with pytest.raises(ValueError, match="already registered"):
        registry.tool(name="echo", description="", parameters=params)
    with pytest.raises(ValueError, match="must match"):
        registry.tool(name="functions.x:0", description="", parameters=params)
    with pytest.raises(ValueError, match="unsupported schema keywords \\['pattern'\\]"):
        registry.tool(name="x", description="", parameters={"type": "object", "properties": {"a": {"pattern": "x"}}})
    with pytest.raises(ValueError, match="type 'object'"):
        registry.tool(name="x", description="", parameters={"type": "string"})
    with pytest.raises(ValueError, match="not in properties"):
        registry.tool(name="x", description="", parameters={"type": "object", "required": ["a"]})


def test_successful_call(registry: ToolRegistry) -> None:
    result = call(registry, "echo", json.dumps({"text": "ab", "times": 2}))
    assert (result.content, result.error_type) == ("abab", None)
    assert result.duration_s >= 0


def test_unknown_tool_lists_the_available_ones(registry: ToolRegistry) -> None:
    result = call(registry, "ecko", "{}")
    assert result.error_type == "unknown_tool"
    assert result.content == "error: unknown tool 'ecko'; available: boom, echo, number, slow"
    limited = registry.call("boom", "{}", make_ctx(), 1.0, 1000, enabled=["echo"])
    assert limited.error_type == "unknown_tool"
    assert limited.content.endswith("available: echo")


def test_builtin_unknown_tool_message() -> None:
    result = TOOLS.call("serch", "{}", make_ctx(), 1.0, 1000)
    assert result.content == "error: unknown tool 'serch'; available: calculator, now, python, read_object, search"


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ("{text: 1}", "not valid JSON"),
        ("[1, 2]", "arguments: expected object, got array"),
        ("{}", "arguments: missing required property 'text'"),
        ('{"text": 3}', "arguments.text: expected string, got integer"),
        ('{"text": "a", "times": "2"}', "arguments.times: expected integer, got string"),
        ('{"text": "a", "times": true}', "arguments.times: expected integer, got boolean"),
        ('{"text": "a", "times": 9}', "arguments.times: 9 is greater than the maximum 3"),
        ('{"text": "a", "style": "quiet"}', "arguments.style: 'quiet' is not one of ['plain', 'loud']"),
        ('{"text": "a", "tags": ["x", 1]}', "arguments.tags[1]: expected string, got integer"),
    ],
)
def test_invalid_arguments(registry: ToolRegistry, arguments: str, message: str) -> None:
    result = call(registry, "echo", arguments)
    assert result.error_type == "invalid_arguments"
    assert result.content.startswith("error: ")
    assert message in result.content


def test_empty_arguments_mean_no_arguments() -> None:
    assert TOOLS.call("now", "", make_ctx(), 1.0, 1000).error_type is None


def test_exception_inside_a_tool(registry: ToolRegistry) -> None:
    result = call(registry, "boom", "{}")
    assert result.error_type == "tool_error"
    assert result.content == "error: tool 'boom' failed: RuntimeError: disk on fire"


def test_non_text_result_is_a_tool_error(registry: ToolRegistry) -> None:
    result = call(registry, "number", "{}")
    assert (result.error_type, result.content) == (
        "tool_error",
        "error: tool 'number' returned int, not text",
    )


def test_timeout_returns_without_waiting_for_the_tool(registry: ToolRegistry) -> None:
    start = time.monotonic()
    result = call(registry, "slow", "{}", timeout_s=0.2)
    assert time.monotonic() - start < 1.0
    assert result.error_type == "timeout"
    assert result.content == "error: tool 'slow' timed out after 0.2 s"


def test_oversized_result_is_cut_with_a_marker(registry: ToolRegistry) -> None:
    result = call(registry, "echo", json.dumps({"text": "x" * 2500}), max_chars=1000)
    assert result.error_type == "result_truncated"
    assert result.content.startswith("x" * 1000 + "\n[truncated: 1,500 of 2,500 characters cut]")


def test_the_call_sees_its_deadline_and_the_jobs_context(registry: ToolRegistry) -> None:
    seen: list[ToolContext] = []

    @registry.tool(name="peek", description="", parameters={"type": "object", "properties": {}})
    def peek(args: dict, ctx: ToolContext) -> str:
        seen.append(ctx)
        return "ok"

    ctx = make_ctx()
    before = time.monotonic()
    registry.call("peek", "{}", ctx, 3.0, 100)
    [inner] = seen
    assert inner.job_id == "job-1" and inner.documents is ctx.documents
    assert inner.deadline is not None and before + 3.0 <= inner.deadline <= time.monotonic() + 3.0
    assert ctx.deadline is None  # the job's context itself is unchanged
    assert ctx.logical_time == datetime(2031, 5, 6, 7, 8, 9, tzinfo=UTC)


def test_concurrent_calls_do_not_interfere(registry: ToolRegistry) -> None:
    results: dict[int, str] = {}

    def worker(i: int) -> None:
        results[i] = call(registry, "echo", json.dumps({"text": str(i)})).content

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results == {i: str(i) for i in range(16)}


def test_validator_accepts_numbers_for_number_and_rejects_extra_properties() -> None:
    schema = {"type": "object", "properties": {"x": {"type": "number"}}, "additionalProperties": False}
    assert validate({"x": 1}, schema) is None
    assert validate({"x": 1.5}, schema) is None
    assert validate({"x": 1, "y": 2}, schema) == "arguments: unexpected properties ['y']; allowed: ['x']"
