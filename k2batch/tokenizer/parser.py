"""Parse decoded K2 assistant output into reasoning, content and tool calls, and turn it back into a message."""

from __future__ import annotations

import json
import re
from typing import Any, Literal

import msgspec

THINK_BEGIN = "<think>"
THINK_END = "</think>"
SECTION_BEGIN = "<|tool_calls_section_begin|>"
SECTION_END = "<|tool_calls_section_end|>"
CALL_BEGIN = "<|tool_call_begin|>"
ARGUMENT_BEGIN = "<|tool_call_argument_begin|>"
CALL_END = "<|tool_call_end|>"
MESSAGE_END = "<|im_end|>"


class ToolCall(msgspec.Struct, frozen=True):
    """One call of a tool-call section, `index` its position there; `error` says why it cannot run as is."""

    id: str
    name: str
    arguments: str
    index: int
    error: str | None = None


class ParsedAssistant(msgspec.Struct, frozen=True):
    """One assistant output: `finish` is "tool_calls" when it ends in calls to run, else "stop"."""

    reasoning: str
    content: str
    tool_calls: list[ToolCall]
    errors: list[str]
    finish: Literal["stop", "tool_calls"]


def parse_assistant(text: str, tool_names: set[str] | None = None, thinking: bool = False) -> ParsedAssistant:
    """Split the assistant output that follows the generation prompt; never raises.

    Malformed output keeps whatever parsed and says in `errors` what is wrong. With `tool_names`, a call id that is
    not of the `functions.NAME:N` form is resolved to the one declared tool it names, and calls to other functions
    are flagged as unknown. `thinking`: the generation prompt itself opened `<think>` (the checkpoint's template
    does so), so the output starts inside the reasoning whether or not it repeats the tag.
    """
    errors: list[str] = []
    end = text.find(MESSAGE_END)
    if end >= 0:
        if text[end + len(MESSAGE_END) :].strip():
            errors.append(f"text after {MESSAGE_END} ignored: {_snippet(text[end + len(MESSAGE_END) :])}")
        text = text[:end]
    reasoning, rest = _split_reasoning(text, errors, thinking)
    section = rest.find(SECTION_BEGIN)
    content = rest if section < 0 else rest[:section]
    if CALL_BEGIN in content:
        errors.append(f"tool calls outside a tool-call section ignored (no {SECTION_BEGIN} before them)")
    elif stray := [token for token in (ARGUMENT_BEGIN, CALL_END, SECTION_END) if token in content]:
        errors.append(f"tool-call markup in the content: {', '.join(stray)} (no {SECTION_BEGIN} before it)")
    calls = [] if section < 0 else _parse_section(rest[section + len(SECTION_BEGIN) :], tool_names, errors)
    return ParsedAssistant(reasoning, content, calls, errors, "tool_calls" if calls else "stop")


def assistant_message(parsed: ParsedAssistant) -> dict[str, Any]:
    """The OpenAI-shaped assistant message (with K2's reasoning_content) that renders back to the output."""
    message: dict[str, Any] = {"role": "assistant", "content": parsed.content, "reasoning_content": parsed.reasoning}
    if parsed.tool_calls:
        message["tool_calls"] = [
            {"id": call.id, "type": "function", "function": {"name": call.name, "arguments": call.arguments}}
            for call in parsed.tool_calls
        ]
    return message


def _split_reasoning(text: str, errors: list[str], thinking: bool) -> tuple[str, str]:
    # The generation prompt may already hold <think>, so </think> ends reasoning even when the text has no opener.
    stripped = text.lstrip()
    repeated = stripped.startswith(THINK_BEGIN)
    opened = repeated or thinking
    body = stripped[len(THINK_BEGIN) :] if repeated else text
    close, section = body.find(THINK_END), body.find(SECTION_BEGIN)
    if close >= 0 and (section < 0 or close < section):
        return body[:close], body[close + len(THINK_END) :]
    if opened and section >= 0:
        # K2 Thinking may open the tool-call section straight from its reasoning, without </think>.
        return body[:section], body[section:]
    if opened:
        errors.append(f"reasoning not closed: no {THINK_END} and no tool-call section (output cut off while thinking?)")
        return body, ""
    return "", body


def _parse_section(body: str, tool_names: set[str] | None, errors: list[str]) -> list[ToolCall]:
    end = body.find(SECTION_END)
    if end < 0:
        errors.append(f"tool-call section not closed: no {SECTION_END}")
    elif body[end + len(SECTION_END) :].strip():
        errors.append(f"text after the tool-call section ignored: {_snippet(body[end + len(SECTION_END) :])}")
    chunks = (body if end < 0 else body[:end]).split(CALL_BEGIN)
    if chunks[0].strip():
        errors.append(f"text before the first tool call ignored: {_snippet(chunks[0])}")
    calls = [call for index, chunk in enumerate(chunks[1:]) if (call := _parse_call(chunk, index, tool_names, errors))]
    if len(chunks) == 1:
        errors.append("tool-call section holds no tool calls")
    return calls


def _parse_call(chunk: str, index: int, tool_names: set[str] | None, errors: list[str]) -> ToolCall | None:
    problems: list[str] = []
    end = chunk.find(CALL_END)
    if end < 0:
        problems.append(f"not closed: no {CALL_END}")
    elif chunk[end + len(CALL_END) :].strip():
        errors.append(f"tool call {index}: text after it ignored: {_snippet(chunk[end + len(CALL_END) :])}")
    body = chunk if end < 0 else chunk[:end]
    marker = body.find(ARGUMENT_BEGIN)
    if marker < 0:
        errors.append(f"tool call {index} {_snippet(body)}: missing {ARGUMENT_BEGIN}; call dropped")
        return None
    call_id, arguments = body[:marker].strip(), body[marker + len(ARGUMENT_BEGIN) :]
    name = call_id.split(":")[0].split(".")[-1]
    if tool_names is not None and name not in tool_names:
        name = _declared_name(call_id, tool_names) or name
    if not name:
        problems.append(f"id {call_id!r} names no function")
    elif tool_names is not None and name not in tool_names:
        problems.append(f"unknown tool {name!r}; available: {', '.join(sorted(tool_names)) or 'none'}")
    try:
        if not isinstance(json.loads(arguments), dict):
            problems.append(f"arguments must be a JSON object, got {_snippet(arguments)}")
    except json.JSONDecodeError as error:
        problems.append(f"arguments are not valid JSON ({error}): {_snippet(arguments)}")
    errors.extend(f"tool call {index} {call_id!r}: {problem}" for problem in problems)
    return ToolCall(call_id, name, arguments, index, "; ".join(problems) or None)


def _declared_name(call_id: str, tool_names: set[str]) -> str | None:
    """The one declared tool an id of another form names ("search_0", "call-search", "tools/read_object#1"): a
    tool name standing between non-alphanumeric characters, a name inside a longer matching one left out. None when
    no tool or several fit."""
    found = [t for t in tool_names if t and re.search(rf"(?<![A-Za-z0-9]){re.escape(t)}(?![A-Za-z0-9])", call_id)]
    outermost = [t for t in found if not any(t != other and t in other for other in found)]
    return outermost[0] if len(outermost) == 1 else None


def _snippet(text: str, limit: int = 80) -> str:
    text = text.strip()
    return repr(text if len(text) <= limit else text[:limit] + "…")
