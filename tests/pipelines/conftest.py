"""Dagster test setup: test settings (retries without delay), the model to run, a scripted engine, inputs."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

# The settings overlay of every definitions the tests build (load_settings reads it).
os.environ.setdefault("K2BATCH_DAGSTER_SETTINGS", str(Path(__file__).with_name("settings.toml")))

from k2batch import configs
from k2batch.engine import Engine, EngineConfig
from k2batch.pipelines.definitions import run_settings
from k2batch.pipelines.resources import EngineResource
from k2batch.pipelines.settings import load_settings
from tests.agent.conftest import k2_checkpoint, one_torch_thread, script_first_step  # noqa: F401
from tests.agent.test_episode import CALLS

RUN_SETTINGS = run_settings(load_settings())
"""The `settings` resource of the tests' runs: configs/dagster.toml with the overlay (retries without delay)."""

JOBS = pa.table(
    {
        "job_id": ["j1", "j2", "j2", None, "j5"],
        "task": ["synthesis", "retrieval", "draft", "draft", None],
        "prompt": ["What is 2+3?", "Find Paris.", "dup", "no id", "Hi"],
        "tools": [None, ["calculator"], None, None, ["teleport"]],
        "customer": ["a", "b", "c", "d", "e"],
    }
)
"""Five jobs, three of them invalid (duplicate id, missing id, unknown tool): two shards of three rows."""


@pytest.fixture(scope="session")
def batch_model(k2_checkpoint) -> str:
    """The checkpoint the pipeline tests run: K2BATCH_TEST_MODEL (say workspace/models/k2-demo), else a tiny
    random K2 checkpoint whose first steps are scripted to call tools."""
    return os.environ.get("K2BATCH_TEST_MODEL") or str(k2_checkpoint)


class ScriptedEngine(EngineResource):
    """The real engine, with every episode's first step forced to call tools (tests/agent's policy)."""

    def build(self, model: str, config: EngineConfig, storage_options=None) -> Engine:
        engine = super().build(model, config, storage_options)
        if not os.environ.get("K2BATCH_TEST_MODEL"):
            script_first_step(engine, engine.tokenizer.encode_chat(CALLS))
        return engine


def batch_run_config(model: str, **report: Any) -> dict[str, Any]:
    """Run config of batch_job (and dg.materialize): small budgets, greedy, two tools, three rows per shard."""
    config: dict[str, Any] = {
        "shard_plan": {
            "config": {
                "model": model,
                "engine": {"max_num_seqs": 8, "num_kv_blocks": 512},
                "sampling": {"temperature": 0.0, "max_new_tokens": 72},
                "agent": {"max_steps": 3, "max_new_tokens_per_episode": 76, "tool_workers": 2},
                "tools": {"enabled": ["calculator", "now"]},
                "shards": {"rows_per_shard": 3},
            }
        }
    }
    if report:
        config["batch_report"] = {"config": report}
    return {"ops": config}


REPO = Path(__file__).resolve().parents[2]
DEMO_MODEL = REPO / "workspace" / "models" / "k2-demo"
DEMO_CONFIG = configs.path("demo.toml")
DEMO_CORPUS = REPO / "workspace" / "data" / "corpus.parquet"


def demo_run_config(rows_per_shard: int) -> dict[str, Any]:
    """Run config of batch_job for the demo model as `k2batch demo` runs it (configs/demo.toml: greedy, INT4
    experts dequantized once), with a KV cache sized for a few jobs."""
    from k2batch.config import load_config
    from k2batch.demo.workspace import ensure_corpus

    demo = load_config(DEMO_CONFIG)
    config = {
        "model": str(DEMO_MODEL),
        "engine": {"dequantize_int4": demo.engine.dequantize_int4, "max_num_seqs": 8, "num_kv_blocks": 512},
        "sampling": {"temperature": demo.sampling.temperature, "max_new_tokens": demo.sampling.max_new_tokens},
        "agent": {"max_steps": demo.agent.max_steps},
        "tools": {"search_corpus": str(ensure_corpus(DEMO_CORPUS))},
        "shards": {"rows_per_shard": rows_per_shard},
    }
    return {"ops": {"shard_plan": {"config": config}}}


def write_jobs(path: Path, table: pa.Table = JOBS) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path)
    return path
