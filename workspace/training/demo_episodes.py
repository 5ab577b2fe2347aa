"""Training data of the demo model: gold episodes with real tool results, cut into prompt and assistant pieces
exactly as the episode loop tokenizes them at inference."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import msgspec

from k2batch.agent.tools import TOOLS, ToolContext, ToolSettings
from k2batch.config import BatchConfig
from k2batch.demo.tasks import DemoJob, ToolRunner, gold_episode, misspell
from k2batch.demo.world import World
from k2batch.tokenizer.chat import render_chat
from k2batch.tokenizer.parser import ARGUMENT_BEGIN, CALL_BEGIN, CALL_END, MESSAGE_END, SECTION_BEGIN, SECTION_END


def tool_runner(config: BatchConfig, corpus: str | Path) -> ToolRunner:
    """The registry's own search and calculator over `corpus`: the results the model will read at inference."""
    settings = msgspec.structs.replace(ToolSettings.from_config(config.tools), search_corpus=str(corpus))
    ctx = ToolContext.for_job("train", "default", settings)

    def run(name: str, arguments: str) -> str:
        return TOOLS.call(name, arguments, ctx, config.agent.tool_timeout_s, config.agent.max_tool_result_chars).content

    return run


def initial_messages(job: DemoJob, config: BatchConfig) -> list[dict[str, Any]]:
    """What the batch path starts an episode from: the task's system prompt, then the user turn."""
    return [{"role": "system", "content": config.system_prompt(job.task)}, {"role": "user", "content": job.prompt}]


def assistant_text(message: dict[str, Any]) -> str:
    """One generated model turn, as the model emits it after the generation prompt (reasoning kept)."""
    calls = message.get("tool_calls") or []
    section = "".join(f"{CALL_BEGIN}{c['id']}{ARGUMENT_BEGIN}{c['function']['arguments']}{CALL_END}" for c in calls)
    section = f"{SECTION_BEGIN}{section}{SECTION_END}" if calls else ""
    return f"<think>{message['reasoning_content']}</think>{message['content']}{section}{MESSAGE_END}"


def episode_pieces(
    template: str | None, tools: list[dict[str, Any]], initial: list[dict[str, Any]], steps: list[dict[str, Any]]
) -> list[tuple[str, bool]]:
    """(text, is_generated) pieces: the first prompt, each model turn, each rendered delta of tool results plus
    the next generation prompt. The episode loop tokenizes exactly these pieces, one at a time. A turn marked
    `"mistake": True` (`gold_episode` with a typo) is context the model reads, not generated: no loss on it."""
    pieces = [(render_chat(template, initial, tools, add_generation_prompt=True), False)]
    conversation = list(initial)
    i = 0
    while i < len(steps):
        assistant = steps[i]
        pieces.append((assistant_text(assistant), not assistant.get("mistake", False)))
        conversation.append(assistant)
        i += 1
        results = []
        while i < len(steps) and steps[i]["role"] == "tool":
            results.append(steps[i])
            i += 1
        if results:
            before = render_chat(template, conversation, tools, add_generation_prompt=False)
            conversation.extend(results)
            after = render_chat(template, conversation, tools, add_generation_prompt=True)
            pieces.append((after[len(before) :], False))
    return pieces


def training_pieces(
    jobs: list[DemoJob],
    world: World,
    config: BatchConfig,
    corpus: str | Path,
    template: str | None,
    typos: float = 0.0,
    seed: int = 0,
) -> list[list[tuple[str, bool]]]:
    """Pieces of every job whose gold episode exists (its search finds the entity's document). A `typos` fraction
    of the episodes (drawn from `seed`) starts with a search for a miscopied name and recovers (`gold_episode`)."""
    if not 0.0 <= typos <= 1.0:
        raise ValueError(f"typos must be in [0, 1], got {typos}")
    rng = random.Random(seed)
    run_tool = tool_runner(config, corpus)
    episodes = []
    for job in jobs:
        typo = None
        if typos and rng.random() < typos:  # no draw at all when 0
            name = rng.choice(job.entities)
            typo = (name, misspell(name, rng))
        steps = gold_episode(job, world, run_tool, typo)
        if steps is not None:
            episodes.append(episode_pieces(template, TOOLS.schemas(job.tools), initial_messages(job, config), steps))
    return episodes
