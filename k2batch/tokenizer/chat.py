"""Render chat messages to prompt text with a checkpoint's jinja chat template, sandboxed and within a budget."""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import datetime
from functools import lru_cache
from importlib.resources import files
from typing import Any

import jinja2
import msgspec
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

from k2batch.tokenizer.template_worker import WORKER

# The K2 Thinking format, for checkpoints that ship no template of their own.
BUILTIN_TEMPLATE = files("k2batch.tokenizer").joinpath("k2_thinking.jinja").read_text(encoding="utf-8")


def render_chat(
    template: str | None,
    messages: list[dict[str, Any]],
    tools: list[dict[str, Any]] | None = None,
    add_generation_prompt: bool = True,
    *,
    escape: Callable[[str], str] | None = None,
    **kwargs: Any,
) -> str:
    """Render OpenAI-shaped messages (with K2's reasoning_content) and tool schemas into prompt text.

    `template` is the checkpoint's own chat template; None uses the built-in K2 Thinking format. A template
    other than the built-in one renders in a worker process within a time, memory and output budget
    (template_worker), raising TemplateBudgetError past it. Tool-call arguments given as an object are
    written as JSON first. `escape` (a tokenizer's `escape`) is then applied to every string of every message
    (content, reasoning, name, tool_call_id, tool-call ids, names and arguments), so that special-token strings
    written by users or tools stay text when the prompt is encoded.
    Extra keyword arguments are visible to the template, as with transformers' apply_chat_template.
    """
    # Templates are untrusted code: they only ever see plain JSON-like data, never the caller's objects.
    context = msgspec.to_builtins({**kwargs, "messages": messages, "tools": tools})
    context["messages"] = [_prepare_message(m, escape) for m in context["messages"]]
    context["add_generation_prompt"] = add_generation_prompt
    if template is None or template == BUILTIN_TEMPLATE:
        return compile_template(BUILTIN_TEMPLATE).render(**context)
    return WORKER.render(template, context)


def _prepare_message(message: Any, escape: Callable[[str], str] | None) -> Any:
    if not isinstance(message, dict):
        return message
    calls = message.get("tool_calls")
    if isinstance(calls, list):
        message = {**message, "tool_calls": [_arguments_as_text(call) for call in calls]}
    return _escape_strings(message, escape) if escape is not None else message


def _arguments_as_text(call: Any) -> Any:
    function = call.get("function") if isinstance(call, dict) else None
    if not isinstance(function, dict) or "arguments" not in function or isinstance(function["arguments"], str):
        return call
    return {**call, "function": {**function, "arguments": _tojson(function["arguments"])}}


def _escape_strings(value: Any, escape: Callable[[str], str]) -> Any:
    """`value` with `escape` applied to every string in it, dictionary keys included."""
    if isinstance(value, str):
        return escape(value)
    if isinstance(value, dict):
        return {_escape_strings(key, escape): _escape_strings(item, escape) for key, item in value.items()}
    if isinstance(value, list):
        return [_escape_strings(item, escape) for item in value]
    return value


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    # Jinja's own tojson escapes HTML characters, which would change the tokens the model was trained on.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(format: str) -> str:
    return datetime.now().strftime(format)


@lru_cache(maxsize=16)
def compile_template(template: str) -> jinja2.Template:
    """The template compiled in the environment transformers gives chat templates (sandboxed, tojson, ...)."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env.from_string(template)
