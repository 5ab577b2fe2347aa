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
from k2batch.pipelines.batch_config import BatchRunConfig
from k2batch.pipelines.definitions import K8S_EXECUTOR_CONFIG, build_definitions
from k2batch.pipelines.settings import DAGSTER_CONFIG, load_settings

REPO = Path(__file__).resolve().parents[2]
DAGSTER = str(Path(sys.executable).with_name("dagster"))


def validate_definitions(tmp_path: Path, **env: str) -> subprocess.CompletedProcess:
    """`dagster definitions validate -m k2batch.pipelines.definitions`: loads the code location as dagster dev does."""
    return subprocess.run(
        [DAGSTER, "definitions", "validate", "-m", "k2batch.pipelines.definitions"],
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
    assert step.pool == "gpu" and step.required_resource_keys >= {"settings", "engine", "storage"}


def test_settings_are_read_when_the_definitions_are_built_not_on_import(tmp_path):
    """Importing the modules of pipelines reads no settings; build_definitions reads them, each kind where Dagster
    takes it: the schedule and sensor interval on the definitions, the rest as resource config."""
    overlay = tmp_path / "settings.toml"
    overlay.write_text(
        '[nightly]\ncron = "0 5 * * *"\n[sensor]\nminimum_interval_s = 7\n[checks]\nmax_error_rate = 0.5\n'
    )
    code = (
        "import os, k2batch.pipelines.assets, k2batch.pipelines.sensors, k2batch.pipelines.schedules\n"
        "import k2batch.pipelines.batch_config\n"
        "os.environ['K2BATCH_DAGSTER_SETTINGS'] = os.environ.pop('LATER')\n"
        "from k2batch.pipelines.definitions import build_definitions\n"
        "defs = build_definitions()\n"
        "print(defs.resolve_schedule_def('nightly_batches').cron_schedule,"
        " defs.resolve_sensor_def('batch_inputs').minimum_interval_seconds,"
        " defs.resources['settings'].max_error_rate, sep='|')\n"
    )
    env = {key: value for key, value in os.environ.items() if key != "K2BATCH_DAGSTER_SETTINGS"}
    env["LATER"] = str(overlay)
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().split("|") == ["0 5 * * *", "7", "0.5"]


def test_environment_overrides_are_env_vars_of_the_resources(monkeypatch, tmp_path):
    """K2BATCH_ROOT, K2BATCH_STEP_OUTPUTS and K2BATCH_CONFIG reach the resources as dg.EnvVar: the process that
    uses a resource reads the variable, and the definitions hold only its name."""
    monkeypatch.setenv("K2BATCH_ROOT", "s3://bucket/prefix")
    monkeypatch.setenv("K2BATCH_STEP_OUTPUTS", "s3://ops/steps")
    (tmp_path / "batch.toml").write_text('model = "s3://models/k2"\n')
    monkeypatch.setenv("K2BATCH_CONFIG", str(tmp_path / "batch.toml"))
    resources = build_definitions().resources
    assert resources["storage"].root == dg.EnvVar("K2BATCH_ROOT")
    assert resources["io_manager"].root == dg.EnvVar("K2BATCH_STEP_OUTPUTS")
    assert resources["settings"].batch_config == dg.EnvVar("K2BATCH_CONFIG")
    with dg.build_resources({"settings": resources["settings"]}) as built:
        assert built.settings.base_config().model == "s3://models/k2"
    monkeypatch.delenv("K2BATCH_ROOT")
    assert build_definitions().resources["storage"].root == load_settings().root


def test_settings_file_parses():
    settings = load_settings(DAGSTER_CONFIG)
    assert settings.root == "workspace/storage" and settings.executor == "in_process"
    assert settings.shards.retry_delay_s == 0.05  # the tests' overlay (K2BATCH_DAGSTER_SETTINGS)


def test_launchpad_defaults_are_the_cli_config():
    assert config_hash(BatchRunConfig().batch_config(load_config())) == config_hash(load_config())


def test_launchpad_values_map_onto_batch_config():
    run = BatchRunConfig(
        model="s3://models/k2",
        shards={"rows_per_shard": 7},
        sampling={"temperature": 0.0, "top_p": 1.0},
        agent={"max_steps": 5, "hidden_tool_result_placeholder": "[hidden]"},
        tools={"enabled": ["calculator"], "now": "2026-01-01T00:00:00Z", "python": {"allow_weaker_sandbox": True}},
        engine={"max_num_seqs": 4, "num_kv_blocks": 64},
        tasks={"triage": "Sort the tickets."},
    )
    default = load_config()
    config = run.batch_config(default)
    assert (config.model, config.shards.rows_per_shard, config.sampling.temperature) == ("s3://models/k2", 7, 0.0)
    assert config.agent.max_steps == 5 and config.tools.enabled == ("calculator",)
    assert config.engine.num_kv_blocks == 64 and config.tools.now.year == 2026
    assert config.agent.hidden_tool_result_placeholder == "[hidden]" and config.tools.python.allow_weaker_sandbox
    assert config.tools.python.wall_s == default.tools.python.wall_s  # a table's other keys stay
    assert config.tasks == {**default.tasks, "triage": "Sort the tickets."} and config.prices == default.prices
    assert config.sampling.top_k == default.sampling.top_k and config.engine.block_size == default.engine.block_size


def leaf_fields(config_type, path=""):
    """(dotted key, field) of every leaf of a Dagster config schema."""
    for name, field in config_type.fields.items():
        if hasattr(field.config_type, "fields") and field.config_type.fields:
            yield from leaf_fields(field.config_type, f"{path}{name}.")
        else:
            yield f"{path}{name}", field


def test_launchpad_schema_has_every_key_of_the_batch_config_but_storage_with_a_description():
    schema = BatchRunConfig.to_config_schema().as_field().config_type
    launchpad = dict(leaf_fields(schema))
    keys = set()

    def walk(value, path):
        for key, item in value.items():
            if isinstance(item, dict) and path + key != "tasks":
                walk(item, f"{path}{key}.")
            else:
                keys.add(path + key)

    walk({k: v for k, v in msgspec.to_builtins(load_config()).items() if k != "storage"}, "")
    assert set(launchpad) == keys
    assert {"tools.python.allow_weaker_sandbox", "agent.hidden_tool_result_placeholder"} <= set(launchpad)
    assert [key for key, field in launchpad.items() if not field.description] == []
    for name in ("engine", "sampling", "tools", "shards", "tasks"):
        assert schema.fields[name].description
