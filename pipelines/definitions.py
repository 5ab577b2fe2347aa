"""The Dagster definitions: `dagster dev -m pipelines.definitions` (or dagster-webserver, or a k8s code location)."""

from __future__ import annotations

import os
from pathlib import Path

import dagster as dg
import yaml

from pipelines.assets import batch_job, batch_report, shard_plan, shard_results
from pipelines.resources import EngineResource, StorageResource
from pipelines.schedules import nightly_batches
from pipelines.sensors import batch_inputs
from pipelines.step_outputs import StepOutputsIOManager
from pipelines.settings import EXECUTORS, Executor, base_batch_config, current_settings

K8S_EXECUTOR_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "dagster-k8s" / "executor.yaml"


def executor_for(kind: Executor) -> dg.ExecutorDefinition:
    if kind == "in_process":
        return dg.in_process_executor
    if kind == "multiprocess":
        return dg.multiprocess_executor
    if kind == "k8s":
        from dagster_k8s import k8s_job_executor

        return k8s_job_executor.configured(yaml.safe_load(K8S_EXECUTOR_CONFIG.read_text()), name="k8s")
    raise ValueError(f"executor {kind!r}: expected one of {', '.join(EXECUTORS)}")


def default_storage(root: str) -> StorageResource:
    """The settings' root with default.toml's storage options; credentials only from the environment."""
    secrets = {
        field: dg.EnvVar(variable)
        for field, variable in (("key", "AWS_ACCESS_KEY_ID"), ("secret", "AWS_SECRET_ACCESS_KEY"), ("token", "AWS_SESSION_TOKEN"))
        if os.environ.get(variable)
    }  # fmt: skip
    return StorageResource(root=root, options=dict(base_batch_config().storage.options), **secrets)


def build_definitions(
    storage: StorageResource | None = None, engine: EngineResource | None = None, executor: Executor | None = None
) -> dg.Definitions:
    """The definitions over `storage` and `engine` (tests pass their own); defaults from configs/dagster.toml."""
    settings = current_settings()
    storage = storage or default_storage(settings.root)
    return dg.Definitions(
        assets=[shard_plan, shard_results, batch_report],
        jobs=[batch_job],
        sensors=[batch_inputs],
        schedules=[nightly_batches],
        resources={
            "storage": storage,
            "engine": engine or EngineResource(),
            "io_manager": StepOutputsIOManager(storage=storage, root=settings.step_outputs),
        },
        executor=executor_for(executor or settings.executor),
    )


defs = build_definitions()
