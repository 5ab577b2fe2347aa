"""Tools the model calls during an episode: the registry, its context, and the built-ins."""

from . import calculator, now, python_sandbox, read_object, search
from .context import ToolContext, ToolSettings, parse_logical_time
from .registry import TOOLS, ToolRegistry, ToolResult

__all__ = [
    "TOOLS",
    "ToolContext",
    "ToolRegistry",
    "ToolResult",
    "ToolSettings",
    "calculator",
    "now",
    "parse_logical_time",
    "python_sandbox",
    "read_object",
    "search",
]
