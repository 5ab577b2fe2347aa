"""Settings of the Dagster definitions: configs/dagster.toml, overlaid by the TOML named in K2BATCH_DAGSTER_SETTINGS.

Read once, when definitions.build_definitions builds the definitions (the code location loads), never when a module
is imported. What shapes the definitions themselves (executor, sensor interval, schedule) is fixed there; what steps
and the sensor read while they run goes into resource config (resources.StorageResource, RunSettings and the step
outputs' IO manager), with K2BATCH_ROOT, K2BATCH_STEP_OUTPUTS and K2BATCH_CONFIG as dg.EnvVar, resolved where a run
or tick uses them."""

from __future__ import annotations

import os
import tomllib
from typing import Any, Literal, get_args

import msgspec

from k2batch import configs
from k2batch.config import ConfigError

DAGSTER_CONFIG = configs.path("dagster.toml")
Executor = Literal["in_process", "multiprocess", "k8s"]
EXECUTORS: tuple[str, ...] = get_args(Executor)


class SensorSettings(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    minimum_interval_s: int
    lookback_s: float
    """Files this much older than the newest one seen are looked at again (late listings on object stores)."""


class NightlySettings(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    cron: str
    timezone: str


class ShardRetrySettings(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    max_retries: int
    retry_delay_s: float


class CheckSettings(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    max_error_rate: float
    error_statuses: tuple[str, ...]


class PipelineSettings(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    root: str
    """Storage root: {root}/inputs/, {root}/outputs/."""
    step_outputs: str
    """Where steps leave their outputs for later steps; empty: the Dagster instance's storage directory."""
    batch_config: str
    """TOML overlaying configs/default.toml; empty for none."""
    executor: Executor
    sensor: SensorSettings
    nightly: NightlySettings
    shards: ShardRetrySettings
    checks: CheckSettings


def _read(path: str | os.PathLike[str]) -> dict[str, Any]:
    try:
        with open(path, "rb") as handle:
            return tomllib.load(handle)
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read the Dagster settings ({exc})") from exc


def load_settings(path: str | os.PathLike[str] = DAGSTER_CONFIG) -> PipelineSettings:
    """The TOML at `path`, overlaid table by table by the TOML named in K2BATCH_DAGSTER_SETTINGS."""
    data = _read(path)
    if os.environ.get("K2BATCH_DAGSTER_SETTINGS"):
        for key, value in _read(os.environ["K2BATCH_DAGSTER_SETTINGS"]).items():
            data[key] = {**data[key], **value} if isinstance(value, dict) and isinstance(data.get(key), dict) else value
    try:
        return msgspec.convert(data, PipelineSettings)
    except msgspec.ValidationError as exc:
        raise ConfigError(f"{path} (with K2BATCH_DAGSTER_SETTINGS): {exc}") from None
