"""Render chat messages to prompt text with a checkpoint's jinja chat template, sandboxed as transformers does."""

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

    `template` is the checkpoint's own chat template; None uses the built-in K2 Thinking format. `escape`
    (a tokenizer's `escape`) is applied to the messages' text (content, reasoning, tool-call arguments) first,
    so that special-token strings written by users or tools stay text when the prompt is encoded.
    Extra keyword arguments are visible to the template, as with transformers' apply_chat_template.
    """
    compiled = _compile(BUILTIN_TEMPLATE if template is None else template)
    # Templates are untrusted code: they only ever see plain JSON-like data, never the caller's objects.
    context = msgspec.to_builtins({**kwargs, "messages": messages, "tools": tools})
    if escape is not None:
        context["messages"] = [_escape_message(m, escape) for m in context["messages"]]
    return compiled.render(add_generation_prompt=add_generation_prompt, **context)


def _escape_message(message: Any, escape: Callable[[str], str]) -> Any:
    if not isinstance(message, dict):
        return message
    out = dict(message)
    for key in ("content", "reasoning_content"):
        value = out.get(key)
        if isinstance(value, str):
            out[key] = escape(value)
        elif isinstance(value, list):  # content parts: [{"type": "text", "text": ...}, ...]
            out[key] = [
                {**part, "text": escape(part["text"])} if isinstance(part, dict) and isinstance(part.get("text"), str)
                else part
                for part in value
            ]  # fmt: skip
    if isinstance(out.get("tool_calls"), list):
        out["tool_calls"] = [_escape_call(call, escape) for call in out["tool_calls"]]
    return out


def _escape_call(call: Any, escape: Callable[[str], str]) -> Any:
    function = call.get("function") if isinstance(call, dict) else None
    if not isinstance(function, dict) or not isinstance(function.get("arguments"), str):
        return call
    return {**call, "function": {**function, "arguments": escape(function["arguments"])}}


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
def _compile(template: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env.from_string(template)
