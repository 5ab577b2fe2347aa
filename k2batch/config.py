"""The batch config: frozen msgspec Structs loaded from configs/default.toml, overlaid by a user TOML file."""

from __future__ import annotations

import hashlib
import os
import tomllib
from datetime import datetime
from typing import Any, Literal

import msgspec

from k2batch import configs
from k2batch.engine.config import EngineConfig
from k2batch.records import MAX_HEAVY, MAX_SEED

DEFAULT_CONFIG = configs.path("default.toml")
# Credentials belong in the environment (AWS_ACCESS_KEY_ID, ...), where s3fs and polars both find them. Option
# names are compared in lower case with "-" as "_", at every nesting level (client_kwargs, per-protocol tables).
SECRET_OPTIONS = frozenset(
    {
        "key",
        "secret",
        "token",
        "password",
        "aws_access_key_id",
        "aws_secret_access_key",
        "aws_session_token",
        "session_token",
        "access_key",
        "secret_key",
        "account_key",
        "sas_token",
        "client_secret",
        "connection_string",
        "credentials",
    }
)


class ConfigError(Exception):
    """A config file that cannot be used; the message names the file, the key and what was expected."""


class SamplingConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """Decoding defaults for every job (K2 Thinking was evaluated with temperature 1.0, top_p 0.95)."""

    temperature: float
    top_p: float
    top_k: int
    max_new_tokens: int
    """Per step (one model turn)."""
    seed: int
    """Base seed for jobs that bring none."""

    def __post_init__(self) -> None:
        if not 0 <= self.seed < MAX_SEED:
            raise ValueError(f"seed is {self.seed}, expected an integer in [0, 2**62)")


class AgentConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """Budgets and tool execution of the episode loop."""

    max_steps: int
    max_new_tokens_per_episode: int
    tool_timeout_s: float
    max_tool_result_chars: int
    tool_workers: int
    hidden_tool_result_placeholder: str
    """Replaces earlier tool results when the context would overflow."""
    max_context_tokens: int | None = None
    """None: the engine's context length (TOML has no null, so this one may be left out)."""
    heavy: int
    """Trajectories of a job whose `heavy` column is empty; more than one makes a heavy job (k2batch.agent.heavy)."""
    heavy_aggregation: Literal["model", "vote"]
    """How a heavy job's answer is made: "model" asks the model to read the candidates and write the final answer,
    "vote" takes the most frequent answer (the earliest trajectory's among equals)."""

    def __post_init__(self) -> None:
        if not 1 <= self.heavy <= MAX_HEAVY:
            raise ValueError(f"heavy is {self.heavy}, expected an integer in [1, {MAX_HEAVY}]")


class PythonToolLimits(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    wall_s: float
    cpu_s: float
    memory_mb: int
    output_chars: int
    allow_weaker_sandbox: bool
    """Without bubblewrap, run the python tool in the weaker sandbox instead of refusing the batch."""


class ToolsConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """The built-in tools: which are on by default, and their data and limits."""

    enabled: tuple[str, ...]
    search_corpus: str
    """URI of the corpus Parquet the search tool ranks with BM25."""
    read_object_prefixes: tuple[str, ...]
    """URI prefixes read_object may read under; nothing else."""
    now: datetime
    """The batch's logical time, returned by the now tool, so replays are exact."""
    python: PythonToolLimits

    def __post_init__(self) -> None:
        if self.now.tzinfo is None:
            raise ValueError("now needs a timezone, e.g. 2025-11-06T00:00:00Z")


class StorageConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    options: dict[str, Any]
    """fsspec options for object stores (s3fs: endpoint_url, client_kwargs, ...), never secrets."""


class ShardsConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    rows_per_shard: int

    def __post_init__(self) -> None:
        if self.rows_per_shard < 1:
            raise ValueError("rows_per_shard must be at least 1")


class PricesConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """US dollars per million tokens, to report a batch's API-equivalent cost."""

    input: float
    cached_input: float
    output: float


class BatchConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    model: str
    """Checkpoint directory or fsspec URI."""
    engine: EngineConfig
    sampling: SamplingConfig
    agent: AgentConfig
    tools: ToolsConfig
    storage: StorageConfig
    shards: ShardsConfig
    prices: PricesConfig
    tasks: dict[str, str]
    """System prompt per task; `default` serves jobs whose task has none."""

    def __post_init__(self) -> None:
        if "default" not in self.tasks:
            raise ValueError("tasks needs a 'default' system prompt")

    def system_prompt(self, task: str | None) -> str:
        return self.tasks.get(task or "default", self.tasks["default"])


def _read_toml(path: str | os.PathLike[str]) -> dict[str, Any]:
    try:
        with open(path, "rb") as handle:
            return tomllib.load(handle)
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the config file ({exc.strerror})") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML ({exc})") from exc


def _overlay(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    """`base` with `top`'s keys replacing its own, table by table (lists are replaced whole)."""
    merged = dict(base)
    for key, value in top.items():
        merged[key] = (
            _overlay(base[key], value) if isinstance(value, dict) and isinstance(base.get(key), dict) else value
        )
    return merged


def secret_paths(options: Any, prefix: str = "storage.options") -> list[str]:
    """Key paths of the credentials anywhere in `options` (nested tables and lists included), sorted."""
    found: list[str] = []
    if isinstance(options, dict):
        for key, value in options.items():
            path = f"{prefix}.{key}"
            if isinstance(key, str) and key.lower().replace("-", "_") in SECRET_OPTIONS and value is not None:
                found.append(path)
            found += secret_paths(value, path)
    elif isinstance(options, list | tuple):
        for index, value in enumerate(options):
            found += secret_paths(value, f"{prefix}[{index}]")
    return sorted(found)


def _secret_key(data: dict[str, Any]) -> str | None:
    """The key path of a credential in the storage options of a config file, if any."""
    storage = data.get("storage")
    found = secret_paths(storage.get("options")) if isinstance(storage, dict) else []
    return found[0] if found else None


def _struct_at(path: list[str]) -> type[msgspec.Struct] | None:
    kind: Any = BatchConfig
    for part in path:
        fields = {field.encode_name: field.type for field in msgspec.structs.fields(kind)}
        kind = fields.get(part)
        if not (isinstance(kind, type) and issubclass(kind, msgspec.Struct)):
            return None
    return kind


def _describe(error: msgspec.ValidationError, path: str | os.PathLike[str]) -> str:
    """msgspec's "Expected `int`, got `str` - at `$.engine.block_size`" as
    "FILE: engine.block_size: expected int, got str"."""
    message, _, where = str(error).partition(" - at `")
    keys = where.rstrip("`").removeprefix("$").removeprefix(".")
    if message.startswith("Object contains unknown field `"):
        unknown = message.removeprefix("Object contains unknown field `").removesuffix("`")
        section = _struct_at(keys.split(".") if keys else [])
        allowed = ", ".join(field.encode_name for field in msgspec.structs.fields(section)) if section else ""
        key = f"{keys}.{unknown}" if keys else unknown
        return f"{path}: {key}: unknown key" + (f" (allowed here: {allowed})" if allowed else "")
    detail = message.replace("`", "")
    detail = detail[:1].lower() + detail[1:]
    return f"{path}: {keys or '(top level)'}: {detail}"


def load_config(path: str | os.PathLike[str] | None = None) -> BatchConfig:
    """configs/default.toml, overlaid by the TOML file at `path` when given."""
    data = _read_toml(DEFAULT_CONFIG)
    source: str | os.PathLike[str] = DEFAULT_CONFIG
    if path is not None:
        user = _read_toml(path)
        secret = _secret_key(user)
        if secret:
            raise ConfigError(
                f"{path}: {secret}: secrets come from the environment "
                "(AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, ...), never from the config file"
            )
        data, source = _overlay(data, user), path
    try:
        return msgspec.convert(data, BatchConfig)
    except msgspec.ValidationError as exc:
        raise ConfigError(_describe(exc, source)) from None


def config_hash(config: BatchConfig) -> str:
    """A short stable hash of everything that shapes the results. Left out: storage options (where data lives) and
    how many ranks run the engine and their timeouts (ranks give the same results, so a resume may change them)."""
    shaping = msgspec.to_builtins(config)
    del shaping["storage"]
    for name in ("data_parallel_size", "rank_timeout_s", "rank_start_timeout_s"):
        del shaping["engine"][name]
    return hashlib.sha256(msgspec.json.encode(shaping, order="sorted")).hexdigest()[:16]
