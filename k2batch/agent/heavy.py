"""Heavy mode: a job runs k trajectories from its one prompt, each with its own seed, and one aggregation makes the
job's answer from theirs, either a model turn that reads the candidates ("model", as K2's heavy mode does) or the
most frequent answer ("vote"). The episode loop (k2batch.agent.episode) runs the trajectories and the aggregation
turn; this module holds what they are made of: seeds, the aggregation conversation, the vote and the job's result.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from typing import Any

from k2batch.records import MAX_SEED, Candidate, Result

AGGREGATION_PROMPT = (
    "{count} independent attempts answered the request above. Read them, weigh where they agree and where they "
    "differ, and write the one final answer to the request. Answer in the request's own terms; do not mention "
    "the attempts.\n\n{candidates}"
)


def trajectory_seed(seed: int, trajectory: int) -> int:
    """Trajectory 0 samples with the job's own seed (so `heavy = 1` is the plain episode); the others, and the
    aggregation turn (trajectory k), with seeds drawn from it. Step s of a trajectory then uses seed + s."""
    if trajectory == 0:
        return seed
    return int(hashlib.sha256(f"{seed}/{trajectory}".encode()).hexdigest()[:16], 16) % MAX_SEED


def candidate(trajectory: int, result: Result) -> Candidate:
    return Candidate(
        trajectory=trajectory,
        status=result.status,
        answer=result.answer,
        error_type=result.error_type,
        steps=result.steps,
        tool_calls=result.tool_calls,
    )


def answered(candidates: list[Candidate]) -> list[Candidate]:
    """The candidates an aggregation reads: trajectories that ended with an answer."""
    return [c for c in candidates if c.status == "ok" and c.answer is not None]


def aggregation_messages(messages: list[dict[str, Any]], candidates: list[Candidate]) -> list[dict[str, Any]]:
    """The job's conversation, then one user turn that lists the answered candidates."""
    listed = "\n\n".join(f"## Attempt {n}\n{c.answer}" for n, c in enumerate(candidates, 1))
    request = AGGREGATION_PROMPT.format(count=len(candidates), candidates=listed)
    return [*messages, {"role": "user", "content": request}]


def _normalized(answer: str) -> str:
    return " ".join(answer.split()).casefold()


def vote(candidates: list[Candidate]) -> tuple[Candidate, dict[str, Any]]:
    """The winning candidate (the most frequent answer up to whitespace and case; among equals, the earliest
    trajectory's) and what the trace records of the vote."""
    counts = Counter(_normalized(c.answer or "") for c in candidates)
    best = max(counts.values())
    winner = next(c for c in candidates if counts[_normalized(c.answer or "")] == best)
    votes = [counts[_normalized(c.answer or "")] for c in candidates]
    record = {
        "method": "vote",
        "candidates": [c.trajectory for c in candidates],
        "votes": votes,
        "chosen": winner.trajectory,
    }
    return winner, record


def aggregation_record(method: str, candidates: list[Candidate]) -> str:
    return json.dumps({"method": method, "candidates": [c.trajectory for c in candidates]})


def combine(
    job: Result,
    parts: list[Result],
    candidates: list[Candidate],
    latency_s: float,
    *,
    answer: str | None,
    reasoning: str | None,
    failure: tuple[str, str, str] | None,
) -> Result:
    """The job's one result row: its aggregated answer (or `failure`: status, error type, message) and every
    trajectory's and the aggregation's token and call counts added up, as its cost is."""
    return Result(
        job_id=job.job_id,
        task=job.task,
        status="ok" if failure is None else failure[0],  # type: ignore[arg-type]
        answer=answer if failure is None else None,
        reasoning=reasoning,
        error_type=None if failure is None else failure[1],
        error_message=None if failure is None else failure[2],
        steps=sum(p.steps for p in parts),
        tool_calls=sum(p.tool_calls for p in parts),
        prompt_tokens=sum(p.prompt_tokens for p in parts),
        cached_prompt_tokens=sum(p.cached_prompt_tokens for p in parts),
        completion_tokens=sum(p.completion_tokens for p in parts),
        reasoning_tokens=sum(p.reasoning_tokens for p in parts),
        latency_s=latency_s,
        trajectories=len(candidates),
        candidates=candidates,
        source_file=job.source_file,
        source_row=job.source_row,
    )
