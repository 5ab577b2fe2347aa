"""The Dagster definitions: `dagster dev -m k2batch.pipelines.definitions` (or dagster-webserver, or a k8s code
location)."""

from __future__ import annotations

import os
from typing import Any

import dagster as dg
import yaml

from k2batch import configs
from k2batch.config import ConfigError, load_config
from k2batch.pipelines.assets import batch_job, batch_report, shard_plan, shard_results
from k2batch.pipelines.resources import EngineResource, RunSettings, StorageResource
from k2batch.pipelines.schedules import nightly_schedule
from k2batch.pipelines.sensors import inputs_sensor
from k2batch.pipelines.settings import EXECUTORS, Executor, PipelineSettings, load_settings
from k2batch.pipelines.step_outputs import StepOutputsIOManager

K8S_EXECUTOR_CONFIG = configs.path("dagster-k8s/executor.yaml")
CREDENTIALS = (("key", "AWS_ACCESS_KEY_ID"), ("secret", "AWS_SECRET_ACCESS_KEY"), ("token", "AWS_SESSION_TOKEN"))


def executor_for(kind: str) -> dg.ExecutorDefinition:
    if kind == "in_process":
        return dg.in_process_executor
    if kind == "multiprocess":
        return dg.multiprocess_executor
    if kind == "k8s":
        from dagster_k8s import k8s_job_executor

        return k8s_job_executor.configured(yaml.safe_load(K8S_EXECUTOR_CONFIG.read_text()), name="k8s")
    raise ConfigError(f"executor {kind!r}: expected one of {', '.join(EXECUTORS)}")


def from_environment(variable: str, default: Any) -> Any:
    """dg.EnvVar(variable) when the variable is set, so the process that uses the resource reads its value (and
    the UI shows the variable's name, not its value); `default` otherwise."""
    return dg.EnvVar(variable) if os.environ.get(variable) else default


def default_storage(settings: PipelineSettings) -> StorageResource:
    """The settings' root (K2BATCH_ROOT wins) with the batch config's storage options; credentials only from the
    environment."""
    batch_config = os.environ.get("K2BATCH_CONFIG") or settings.batch_config or None
    secrets = {field: dg.EnvVar(variable) for field, variable in CREDENTIALS if os.environ.get(variable)}
    return StorageResource(
        root=from_environment("K2BATCH_ROOT", settings.root),
        options=dict(load_config(batch_config).storage.options),
        **secrets,
    )


def run_settings(settings: PipelineSettings) -> RunSettings:
    """The settings steps and the sensor read while they run (K2BATCH_CONFIG wins for the batch config)."""
    return RunSettings(
        batch_config=from_environment("K2BATCH_CONFIG", settings.batch_config),
        lookback_s=settings.sensor.lookback_s,
        max_retries=settings.shards.max_retries,
        retry_delay_s=settings.shards.retry_delay_s,
        max_error_rate=settings.checks.max_error_rate,
        error_statuses=list(settings.checks.error_statuses),
    )


def build_definitions(
    storage: StorageResource | None = None,
    engine: EngineResource | None = None,
    executor: Executor | None = None,
    settings: PipelineSettings | None = None,
) -> dg.Definitions:
    """The definitions over `storage` and `engine` (tests pass their own), from `settings` (default:
    configs/dagster.toml, overlaid by K2BATCH_DAGSTER_SETTINGS). K2BATCH_EXECUTOR picks the executor."""
    settings = settings or load_settings()
    storage = storage or default_storage(settings)
    return dg.Definitions(
        assets=[shard_plan, shard_results, batch_report],
        jobs=[batch_job],
        sensors=[inputs_sensor(settings.sensor.minimum_interval_s)],
        schedules=[nightly_schedule(settings.nightly)],
        resources={
            "storage": storage,
            "engine": engine or EngineResource(),
            "settings": run_settings(settings),
            "io_manager": StepOutputsIOManager(
                storage=storage, root=from_environment("K2BATCH_STEP_OUTPUTS", settings.step_outputs)
            ),
        },
        executor=executor_for(executor or os.environ.get("K2BATCH_EXECUTOR") or settings.executor),
    )


defs = build_definitions()
