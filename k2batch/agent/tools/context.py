"""What a tool call may know: the tool settings and the job's context (id, task, logical time)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import msgspec

if TYPE_CHECKING:
    from k2batch.config import ToolsConfig


class ToolSettings(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """Settings of the built-in tools, flat; `from_config` converts the batch config's ToolsConfig.

    The defaults serve tests and library use; a batch takes its values from configs/.
    """

    enabled: tuple[str, ...] = ("search", "calculator", "python", "read_object", "now")
    search_corpus: str = ""  # URI of a Parquet with columns doc_id, title, text
    python_wall_s: float = 10.0
    python_cpu_s: float = 5.0
    python_memory_mb: int = 512
    python_output_chars: int = 8000
    python_allow_weaker_sandbox: bool = False
    """Run the python tool without bubblewrap, in the weaker sandbox (python_sandbox says what it keeps)."""
    read_object_prefixes: tuple[str, ...] = ()
    now: str = "2025-01-01T00:00:00+00:00"  # the batch's logical "now", fixed so replays are exact

    @classmethod
    def from_config(cls, config: ToolsConfig) -> ToolSettings:
        return cls(
            enabled=tuple(config.enabled),
            search_corpus=config.search_corpus,
            python_wall_s=config.python.wall_s,
            python_cpu_s=config.python.cpu_s,
            python_memory_mb=config.python.memory_mb,
            python_output_chars=config.python.output_chars,
            python_allow_weaker_sandbox=config.python.allow_weaker_sandbox,
            read_object_prefixes=tuple(config.read_object_prefixes),
            now=config.now.isoformat(),
        )


def parse_logical_time(text: str) -> datetime:
    """Parse an ISO 8601 timestamp; one without a zone is taken as UTC."""
    try:
        moment = datetime.fromisoformat(text)
    except ValueError as error:
        raise ValueError(f"tools.now: {text!r} is not an ISO 8601 timestamp") from error
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


class ToolContext(msgspec.Struct, frozen=True):
    """One job's view of the world, passed to every tool call of its episode."""

    job_id: str
    task: str
    logical_time: datetime
    settings: ToolSettings = msgspec.field(default_factory=ToolSettings)
    storage_options: dict[str, Any] = msgspec.field(default_factory=dict)
    # Objects read during this episode, by normalised URI: a second read returns the same text.
    documents: dict[str, str] = msgspec.field(default_factory=dict)
    # time.monotonic() by which the current call must finish; the registry sets it per call.
    deadline: float | None = None

    @classmethod
    def for_job(
        cls,
        job_id: str,
        task: str,
        settings: ToolSettings,
        storage_options: dict[str, Any] | None = None,
    ) -> ToolContext:
        return cls(
            job_id=job_id,
            task=task,
            logical_time=parse_logical_time(settings.now),
            settings=settings,
            storage_options=dict(storage_options or {}),
        )
