"""The tool registry: registration with a JSON schema, schemas for the chat template, safe calls."""

import json
import logging
import re
import threading
import time
from collections.abc import Callable, Collection, Iterable
from typing import Any

import msgspec

from .context import ToolContext
from .schema import check_schema, validate

log = logging.getLogger(__name__)

ToolFn = Callable[[dict[str, Any], ToolContext], str]

# K2's tool-call ids are "functions.NAME:IDX", so a name must not contain "." or ":".
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_-]{0,63}$")


class ToolResult(msgspec.Struct, frozen=True):
    """What a call returns to the model; error_type is None on success."""

    content: str
    # None, or one of: unknown_tool, invalid_arguments, tool_error, timeout, result_truncated
    error_type: str | None = None
    duration_s: float = 0.0


class Tool(msgspec.Struct, frozen=True):
    name: str
    description: str
    parameters: dict[str, Any]
    fn: ToolFn


def _truncate(text: str, max_chars: int) -> str:
    cut = len(text) - max_chars
    return f"{text[:max_chars]}\n[truncated: {cut:,} of {len(text):,} characters cut]"


class ToolRegistry:
    """Tools by name. Calls never raise: every failure becomes a ToolResult the model can read."""

    def __init__(self) -> None:
        self._tools: dict[str, Tool] = {}

    def tool(self, *, name: str, description: str, parameters: dict[str, Any]) -> Callable[[ToolFn], ToolFn]:
        """Register `fn(args, ctx) -> str` under `name`, with a JSON schema for its arguments."""
        if not _NAME.match(name):
            raise ValueError(f"tool name {name!r} must match {_NAME.pattern}")
        if name in self._tools:
            raise ValueError(f"tool {name!r} is already registered")
        check_schema(parameters)
        if parameters.get("type") != "object":
            raise ValueError(f"tool {name!r}: parameters must be a schema of type 'object'")

        def register(fn: ToolFn) -> ToolFn:
            self._tools[name] = Tool(name, description, parameters, fn)
            return fn

        return register

    def names(self) -> list[str]:
        return sorted(self._tools)

    def __contains__(self, name: object) -> bool:
        return name in self._tools

    def schemas(self, names: Iterable[str] | None = None) -> list[dict[str, Any]]:
        """Declarations in the OpenAI tools format, in the order given (default: all, by name)."""
        wanted = self.names() if names is None else list(names)
        unknown = [name for name in wanted if name not in self._tools]
        if unknown:
            raise KeyError(f"unknown tools {unknown}; registered: {', '.join(self.names())}")
        return [
            {
                "type": "function",
                "function": {
                    "name": name,
                    "description": self._tools[name].description,
                    "parameters": self._tools[name].parameters,
                },
            }
            for name in wanted
        ]

    def call(
        self,
        name: str,
        arguments: str,
        ctx: ToolContext,
        timeout_s: float,
        max_result_chars: int,
        enabled: Collection[str] | None = None,
    ) -> ToolResult:
        """Run one tool call; `enabled` restricts the call to the job's tools."""
        start = time.monotonic()

        def result(content: str, error_type: str | None) -> ToolResult:
            if len(content) > max_result_chars:
                content = _truncate(content, max_result_chars)
                error_type = error_type or "result_truncated"
            return ToolResult(content, error_type, time.monotonic() - start)

        available = [n for n in self.names() if enabled is None or n in enabled]
        if name not in available:
            return result(f"error: unknown tool {name!r}; available: {', '.join(available)}", "unknown_tool")
        tool = self._tools[name]
        try:
            # Models emit an empty string for tools without parameters; that means {}.
            args = json.loads(arguments) if arguments.strip() else {}
        except json.JSONDecodeError as error:
            return result(f"error: arguments for {name!r} are not valid JSON: {error}", "invalid_arguments")
        problem = validate(args, tool.parameters)
        if problem:
            return result(f"error: invalid arguments for {name!r}: {problem}", "invalid_arguments")

        call_ctx = msgspec.structs.replace(ctx, deadline=start + timeout_s)
        outcome: list[Any] = []

        def run() -> None:
            try:
                outcome.append(tool.fn(args, call_ctx))
            except BaseException as error:  # a tool's failure, whatever it is, goes back to the model
                outcome.append(error)

        # A daemon thread per call: a tool stuck past its timeout cannot hold up the episode or
        # the process exit; it is abandoned (the python tool kills its own subprocess by then).
        # The calling thread (a worker of the episode loop's pool, which bounds concurrent calls)
        # cannot be the one abandoned: concurrent.futures joins its workers at shutdown and at exit.
        worker = threading.Thread(target=run, name=f"tool-{name}-{ctx.job_id}", daemon=True)
        worker.start()
        worker.join(timeout_s)
        if not outcome:
            return result(f"error: tool {name!r} timed out after {timeout_s:g} s", "timeout")
        value = outcome[0]
        if isinstance(value, BaseException):
            log.debug("job %s: tool %s raised", ctx.job_id, name, exc_info=value)
            return result(f"error: tool {name!r} failed: {type(value).__name__}: {value}", "tool_error")
        if not isinstance(value, str):
            return result(f"error: tool {name!r} returned {type(value).__name__}, not text", "tool_error")
        return result(value, None)


TOOLS = ToolRegistry()
