"""The `now` tool: the batch's logical time, never the wall clock, so replays are exact."""

from typing import Any

from .context import ToolContext
from .registry import TOOLS


@TOOLS.tool(
    name="now",
    description="The current date and time (ISO 8601).",
    parameters={"type": "object", "properties": {}},
)
def now(args: dict[str, Any], ctx: ToolContext) -> str:
    return ctx.logical_time.isoformat()
