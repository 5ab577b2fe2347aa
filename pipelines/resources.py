"""Resources: the storage root (with its fsspec options), the run settings, and the engine (one model load per run
process)."""

import os
from typing import Any

import dagster as dg
import msgspec
from pydantic import Field, PrivateAttr

from k2batch.config import BatchConfig, load_config, secret_paths
from k2batch.engine import Engine, EngineConfig

SECRET_FIELDS = ("key", "secret", "token")


class EnvVarName(dg.Config):
    """A secret by reference: the value is read from the environment of the process that uses it, so it is
    never in run config, the run's tags or the event log."""

    env: str = Field(description="Name of the environment variable holding the value.")

    def value(self, field: str) -> str:
        if self.env not in os.environ:
            raise ValueError(f"storage {field}: environment variable {self.env} is not set")
        return os.environ[self.env]


def secret_reference(field: str, value: Any) -> Any:
    """`value` as an EnvVarName: dg.EnvVar("X") (Python) and {"env": "X"} (run config) are; a literal is refused."""
    if isinstance(value, dg.EnvVar):
        return EnvVarName(env=value.env_var_name)
    if isinstance(value, str):
        raise ValueError(
            f'storage {field}: a literal value; pass it as dg.EnvVar("VARIABLE") in Python or '
            f"{{env: VARIABLE}} in run config (or leave it to the AWS_* environment)"
        )
    return value


class StorageResource(dg.ConfigurableResource):
    """Where batches live: {root}/inputs/ and {root}/outputs/.

    Credentials are only references to environment variables (dg.EnvVar, or {env: ...} in the launchpad);
    without them s3fs and polars read the AWS_* environment themselves."""

    root: str = Field(description="Storage root: a local path or fsspec URI such as s3://bucket/prefix.")
    options: dict[str, Any] = Field(
        default={},
        description="fsspec options for object stores (s3fs: endpoint_url, client_kwargs = {region_name}); "
        "no secrets here.",
    )
    key: EnvVarName | None = Field(default=None, description="S3 access key id, as {env: VARIABLE} only.")
    secret: EnvVarName | None = Field(default=None, description="S3 secret access key, as {env: VARIABLE} only.")
    token: EnvVarName | None = Field(default=None, description="S3 session token, as {env: VARIABLE} only.")

    def __init__(self, **data: Any) -> None:
        # Here, not in a pydantic validator: Dagster puts a dg.EnvVar argument back over the validated field.
        super().__init__(**{k: secret_reference(k, v) if k in SECRET_FIELDS else v for k, v in data.items()})

    def model_post_init(self, context: Any) -> None:
        super().model_post_init(context)
        leaked = secret_paths(self.options, "options")
        if leaked:
            raise ValueError(
                f"storage {', '.join(leaked)}: credentials; pass them as key/secret/token with "
                "dg.EnvVar (or leave them to the AWS_* environment), never in options"
            )

    def fsspec_options(self) -> dict[str, Any]:
        """The options with the credentials read from their environment variables, for k2batch's storage functions."""
        secrets = {name: getattr(self, name) for name in SECRET_FIELDS}
        return {**self.options, **{name: ref.value(name) for name, ref in secrets.items() if ref is not None}}


class RunSettings(dg.ConfigurableResource):
    """The settings that steps and the sensor read while they run (configs/dagster.toml; definitions.py passes
    K2BATCH_CONFIG as a dg.EnvVar when it is set). Any run may override them in the launchpad's resources section."""

    batch_config: str = Field(
        default="",
        description="Batch config TOML overlaying configs/default.toml: what a run's launchpad values overlay. "
        "Empty: default.toml alone.",
    )
    lookback_s: float = Field(
        description="The inputs sensor looks again at files this many seconds older than the newest one it saw "
        "(object stores may list a file after files stamped later)."
    )
    max_retries: int = Field(description="Retries of a failed shard step (that shard alone).")
    retry_delay_s: float = Field(description="Seconds before a shard's first retry; doubling for each later one.")
    max_error_rate: float = Field(description="The report's error-rate check fails above this fraction of rows.")
    error_statuses: list[str] = Field(description="Result statuses the error-rate check counts.")

    def base_config(self) -> BatchConfig:
        """configs/default.toml overlaid by batch_config: the config a run's values overlay."""
        return load_config(self.batch_config or None)

    def retry_delay(self, retry_number: int) -> float:
        """Seconds to wait before retry `retry_number + 1` of a shard (exponential backoff)."""
        return self.retry_delay_s * 2**retry_number


class EngineResource(dg.ConfigurableResource):
    """The offline engine. A run process loads a model once and reuses it for every shard step it runs."""

    torch_threads: int = Field(default=0, description="torch CPU threads in the run process; 0 leaves torch's default.")
    _engines: dict[bytes, Engine] = PrivateAttr(default_factory=dict)

    def load(self, model: str, config: EngineConfig, storage_options: dict[str, Any] | None = None) -> Engine:
        """The engine for `model` with `config`, built on first use in this process."""
        key = msgspec.json.encode((model, config, storage_options))
        if key not in self._engines:
            self.discard()  # one model in memory at a time
            if self.torch_threads:
                import torch

                torch.set_num_threads(self.torch_threads)
            self._engines[key] = self.build(model, config, storage_options)
        return self._engines[key]

    def build(self, model: str, config: EngineConfig, storage_options: dict[str, Any] | None = None) -> Engine:
        return Engine.from_pretrained(model, config, storage_options)

    def discard(self) -> None:
        """Drop the loaded engine: after a failure mid-shard its state is unknown, so a retry loads afresh."""
        for engine in self._engines.values():
            engine.close()
        self._engines.clear()
