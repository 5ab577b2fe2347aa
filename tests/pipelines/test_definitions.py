"""The definitions load (as `dagster dev` loads them, and under dagster-k8s), the instance configs are valid, and
the launchpad config maps onto BatchConfig."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import dagster as dg
import msgspec
import pytest
import yaml
from dagster._config import validate_config
from dagster._core.instance.config import dagster_instance_config
from dagster_k8s import K8sRunLauncher, k8s_job_executor

from k2batch.config import config_hash, load_config
from pipelines.batch_config import BatchRunConfig
from pipelines.definitions import K8S_EXECUTOR_CONFIG, build_definitions
from pipelines.settings import DAGSTER_CONFIG, load_settings

REPO = Path(__file__).resolve().parents[2]
DAGSTER = str(Path(sys.executable).with_name("dagster"))


def validate_definitions(tmp_path: Path, **env: str) -> subprocess.CompletedProcess:
    """`dagster definitions validate -m pipelines.definitions`: loads the code location as dagster dev does."""
    return subprocess.run(
        [DAGSTER, "definitions", "validate", "-m", "pipelines.definitions"],
        cwd=REPO,
        env={**os.environ, "DAGSTER_HOME": str(tmp_path), **env},
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.slow
def test_definitions_load_as_dagster_dev_loads_them(tmp_path):
    done = validate_definitions(tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.slow
def test_k8s_definitions_load_with_no_code_change(tmp_path):
    done = validate_definitions(tmp_path, K2BATCH_EXECUTOR="k8s", K2BATCH_ROOT="s3://bucket/k2batch")
    assert done.returncode == 0, done.stdout + done.stderr


def test_k8s_executor_requests_a_gpu_per_shard_step():
    defs = build_definitions(executor="k8s")
    job = defs.resolve_job_def("batch_job")
    assert job.executor_def.name == "k8s"
    config = yaml.safe_load(K8S_EXECUTOR_CONFIG.read_text())
    # The executor keys per-step config by op name: the shard steps' op is run_shard.
    assert "run_shard" in {node.name for node in job.graph.node_named("shard_results").definition.node_defs}
    # (k8s_job_executor takes step.node_handle.name, the op's own name inside the graph asset.)
    resources = config["per_step_k8s_config"]["run_shard"]["container_config"]["resources"]
    assert resources["limits"]["nvidia.com/gpu"] == "1"
    checked = validate_config(k8s_job_executor.config_schema.config_type, config)
    assert checked.success, checked.errors


def test_k8s_instance_config_is_valid():
    config, _ = dagster_instance_config(str(REPO / "configs" / "dagster-k8s"))
    launcher = config["run_launcher"]
    assert launcher["class"] == "K8sRunLauncher"
    checked = validate_config(K8sRunLauncher.config_type(), launcher["config"])
    assert checked.success, checked.errors
    assert config["run_retries"]["enabled"]


def test_workspace_instance_has_sqlite_run_retries_and_the_gpu_pool(tmp_path, monkeypatch):
    shutil.copy(REPO / "workspace" / "dagster_home" / "dagster.yaml", tmp_path / "dagster.yaml")
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path))
    with dg.DagsterInstance.get() as instance:
        assert type(instance.run_storage).__name__ == "SqliteRunStorage"
        assert instance.run_retries_enabled and instance.run_retries_max_retries == 1
        concurrency = instance.get_concurrency_config()
        # One engine in memory: one gpu slot, and one run (its process keeps its engine for the whole run).
        assert concurrency.pool_config.default_pool_limit == 1
        assert concurrency.run_queue_config.max_concurrent_runs == 1
        assert type(instance.run_coordinator).__name__ == "QueuedRunCoordinator"
    job = build_definitions().resolve_job_def("batch_job")
    step = job.graph.node_named("shard_results").definition.node_named("run_shard").definition
    assert step.pool == "gpu" and step.retry_policy.max_retries == load_settings().shards.max_retries


def test_settings_file_parses_and_env_overrides(monkeypatch):
    monkeypatch.delenv("K2BATCH_DAGSTER_SETTINGS")
    monkeypatch.setenv("K2BATCH_ROOT", "s3://bucket/prefix")
    settings = load_settings(DAGSTER_CONFIG)
    assert settings.root == "s3://bucket/prefix" and settings.executor == "in_process"
    assert settings.shards.retry_delay_s > 1  # the test overlay (no delay) is gone


def test_launchpad_defaults_are_the_cli_config():
    assert config_hash(BatchRunConfig().batch_config()) == config_hash(load_config())


def test_launchpad_values_map_onto_batch_config():
    run = BatchRunConfig(
        model="s3://models/k2",
        rows_per_shard=7,
        sampling={"temperature": 0.0, "top_p": 1.0},
        agent={"max_steps": 5},
        tools={"enabled": ["calculator"], "now": "2026-01-01T00:00:00Z"},
        engine={"max_num_seqs": 4, "num_kv_blocks": 64},
    )
    config = run.batch_config()
    assert (config.model, config.shards.rows_per_shard, config.sampling.temperature) == ("s3://models/k2", 7, 0.0)
    assert config.agent.max_steps == 5 and config.tools.enabled == ("calculator",)
    assert config.engine.num_kv_blocks == 64 and config.tools.now.year == 2026
    default = load_config()
    assert config.prices == default.prices and config.tasks == default.tasks  # not on the launchpad: unchanged
    assert msgspec.structs.replace(config, model=default.model) != default


def test_launchpad_config_has_descriptions():
    schema = BatchRunConfig.to_config_schema().as_field().config_type
    for name in ("model", "engine", "sampling", "agent", "tools", "rows_per_shard"):
        assert schema.fields[name].description
    assert schema.fields["sampling"].config_type.fields["temperature"].description
