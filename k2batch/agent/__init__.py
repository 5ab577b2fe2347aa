"""The agent: episodes of thinking and tool calls, and the tools they call."""

from k2batch.agent.batch import run_batch, run_shard
from k2batch.agent.episode import (
    Budgets,
    EpisodeOutcome,
    EpisodeSpec,
    ToolCaller,
    recorded_caller,
    registry_caller,
    run_episodes,
)

__all__ = [
    "Budgets",
    "EpisodeOutcome",
    "EpisodeSpec",
    "ToolCaller",
    "recorded_caller",
    "registry_caller",
    "run_batch",
    "run_episodes",
    "run_shard",
]
