"""Render chat messages to prompt text with a checkpoint's jinja chat template, sandboxed as transformers does."""

from __future__ import annotations

import json
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
    **kwargs: Any,
) -> str:
    """Render OpenAI-shaped messages (with K2's reasoning_content) and tool schemas into prompt text.

    `template` is the checkpoint's own chat template; None uses the built-in K2 Thinking format.
    Extra keyword arguments are visible to the template, as with transformers' apply_chat_template.
    """
    compiled = _compile(BUILTIN_TEMPLATE if template is None else template)
    # Templates are untrusted code: they only ever see plain JSON-like data, never the caller's objects.
    context = msgspec.to_builtins({**kwargs, "messages": messages, "tools": tools})
    return compiled.render(add_generation_prompt=add_generation_prompt, **context)


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
