"""The embedded default under workspace/: the corpus, a demo input of held-out jobs, and grading of outputs."""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from k2batch.demo.tasks import grade, job_rows, make_jobs, traceable
from k2batch.demo.world import make_world, write_corpus

DEMO_SEED = 2025


def ensure_corpus(path: str | Path) -> Path:
    """The world's search corpus at `path`, written once (it is deterministic, so an existing one is the same)."""
    path = Path(path)
    if not path.exists():
        write_corpus(make_world(), path)
    return path


def write_jobs(path: str | Path, count: int, seed: int = DEMO_SEED, prefix: str = "demo") -> Path:
    """`count` jobs over held-out entities (never seen in training), the three tasks in turn, as Parquet."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    jobs = make_jobs(make_world(), count, seed, held_out=True, prefix=prefix)
    pq.write_table(pa.table(job_rows(jobs)), path)
    return path


def graded(output: str | Path) -> pl.DataFrame:
    """Per job of a finished demo batch: correct (facts and citations), traceable (facts in its tool results),
    and the count of malformed steps (a tool call that did not parse or validate, or an answer holding
    tool-call markup or cut off)."""
    results = pl.read_parquet(f"{output}/results/**/*.parquet", hive_partitioning=True)
    traces = pl.read_parquet(f"{output}/traces/**/*.parquet", hive_partitioning=True)
    tool_results = traces.filter(pl.col("operation") == "execute_tool").group_by("job_id").agg(pl.col("tool_result"))
    bad_calls = (
        traces.filter(pl.col("error_type").is_in(["invalid_arguments", "unknown_tool"]))
        .group_by("job_id", "step")
        .len()
        .group_by("job_id")
        .agg(bad_call_steps=pl.len())
    )
    chats = traces.filter(pl.col("operation") == "chat")
    bad_turns = (
        chats.filter(
            (pl.col("finish_reason") == "length")
            | ((pl.col("finish_reason") == "stop") & (pl.col("content").fill_null("").str.strip_chars() == ""))
            | pl.col("content").fill_null("").str.contains("<|", literal=True)
        )
        .group_by("job_id")
        .agg(bad_turn_steps=pl.len())
    )
    steps = chats.group_by("job_id").agg(chat_steps=pl.len())
    table = (
        results.join(tool_results, on="job_id", how="left")
        .join(bad_calls, on="job_id", how="left")
        .join(bad_turns, on="job_id", how="left")
        .join(steps, on="job_id", how="left")
        .with_columns(pl.col("bad_call_steps", "bad_turn_steps", "chat_steps").fill_null(0))
    )
    rows = table.to_dicts()
    return table.select("job_id", "task", "status", "expected", "answer", "chat_steps").with_columns(
        correct=pl.Series([grade(r["task"], json.loads(r["expected"]), r["answer"]) for r in rows]),
        traceable=pl.Series([traceable(r["answer"], r["tool_result"] or []) for r in rows]),
        malformed_steps=pl.Series([r["bad_call_steps"] + r["bad_turn_steps"] for r in rows]),
    )


def scores(output: str | Path) -> dict[str, float]:
    """Format validity over steps, accuracy per task, and the traceable share of answers."""
    table = graded(output)
    steps = int(table["chat_steps"].sum())
    out = {
        "jobs": table.height,
        "steps": steps,
        "format_valid": 1.0 - int(table["malformed_steps"].sum()) / max(steps, 1),
    }
    for task, group in table.group_by("task", maintain_order=True):
        out[f"accuracy_{task[0]}"] = float(group["correct"].mean())
    answered = table.filter(pl.col("answer").is_not_null())
    out["traceable"] = float(answered["traceable"].mean()) if answered.height else 0.0
    out["accuracy"] = float(table["correct"].mean())
    return out
