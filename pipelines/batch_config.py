"""The launchpad's run config, derived from k2batch.config.BatchConfig: a dg.Config class per table of the batch
config, with every key it has ([storage] aside: the storage resource says where data lives and how to reach it).

Every value is optional: one left null keeps the batch config's (configs/default.toml overlaid by the settings
resource's batch_config TOML), so a run launched without config runs as `k2batch run` would. Descriptions are the
comments of configs/default.toml, which documents every key."""

from __future__ import annotations

import re
from typing import Any

import dagster as dg
import msgspec
import msgspec.inspect as mi
from pydantic import Field

from k2batch.config import DEFAULT_CONFIG, BatchConfig, ConfigError

LEFT_OUT = ("storage",)
_KEY = re.compile(r"#?\s*([A-Za-z_][A-Za-z0-9_]*)\s*=")
_TABLE = re.compile(r"\[([A-Za-z0-9_.]+)\]")


def toml_comments(text: str) -> dict[str, str]:
    """The comments above each key of a TOML file, by dotted key ("engine.block_size"). A comment block describes
    the keys right under it (`rank_timeout_s` and `rank_start_timeout_s` share one), up to a blank line; a
    commented-out key (`# max_model_len = 262144`) is a key too."""
    found: dict[str, str] = {}
    table, block, current = "", [], ""
    for raw in text.splitlines():
        line = raw.strip()
        key = _KEY.match(line)
        if not line:
            block, current = [], ""
        elif header := _TABLE.fullmatch(line):
            table, block, current = header.group(1) + ".", [], ""
        elif key and (block or current):
            current, block = " ".join(block) if block else current, []
            found.setdefault(table + key.group(1), current)
        elif line.startswith("#"):
            block.append(line.lstrip("#").strip())
    return found


def _python_type(kind: mi.Type, path: str, comments: dict[str, str]) -> Any:
    """The launchpad type of a BatchConfig field's type (without its None)."""
    if isinstance(kind, mi.UnionType):
        (kind,) = [t for t in kind.types if not isinstance(t, mi.NoneType)]
    if isinstance(kind, mi.StructType):
        return _config_class(kind.cls, path, comments)
    if isinstance(kind, mi.ListType | mi.VarTupleType):
        return list[_python_type(kind.item_type, path, comments)]
    if isinstance(kind, mi.DictType):
        return dict[str, _python_type(kind.value_type, path, comments)]
    scalars = {mi.StrType: str, mi.IntType: int, mi.FloatType: float, mi.BoolType: bool, mi.LiteralType: str}
    if isinstance(kind, mi.DateTimeType):
        return str  # ISO 8601 with a zone, as in the TOML
    return scalars[type(kind)]


def _description(path: str, kind: mi.Type, comments: dict[str, str]) -> str:
    if path in comments:
        return comments[path]
    if isinstance(kind, mi.StructType) and kind.cls.__doc__:
        return " ".join(kind.cls.__doc__.split())
    # A table of free keys (tasks) is described above its first key.
    return next((text for key, text in comments.items() if key.startswith(path + ".")), "")


def _config_class(struct: type[msgspec.Struct], path: str, comments: dict[str, str]) -> type[dg.Config]:
    annotations: dict[str, Any] = {}
    namespace: dict[str, Any] = {"__module__": __name__, "__doc__": struct.__doc__}
    info = mi.type_info(struct)
    for field in info.fields:
        if not path and field.encode_name in LEFT_OUT:
            continue
        where = f"{path}.{field.encode_name}" if path else field.encode_name
        kind = _python_type(field.type, where, comments)
        description = _description(where, field.type, comments)
        if isinstance(kind, type) and issubclass(kind, dg.Config):
            annotations[field.name] = kind
            namespace[field.name] = Field(default_factory=kind, description=description)
        else:
            annotations[field.name] = kind | None
            namespace[field.name] = Field(default=None, description=description)
    namespace["__annotations__"] = annotations
    name = "".join(part.title() for part in path.split(".")) + "RunConfig" if path else "BatchRunConfigBase"
    return type(name, (dg.Config,), namespace)


def _set_values(config: dg.Config) -> dict[str, Any]:
    """The values a run config sets, as nested dicts (null ones left out)."""
    values = {}
    for name, value in config:
        if isinstance(value, dg.Config):
            values[name] = _set_values(value)
        elif value is not None:
            values[name] = value
    return values


def _overlay(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in top.items():
        nested = isinstance(value, dict) and isinstance(base.get(key), dict)
        merged[key] = _overlay(base[key], value) if nested else value
    return merged


class BatchRunConfig(_config_class(BatchConfig, "", toml_comments(DEFAULT_CONFIG.read_text()))):
    """What a batch runs with: model, engine, sampling, agent budgets, tools, shard size, prices and task prompts;
    null keeps the batch config's value."""

    def batch_config(self, base: BatchConfig) -> BatchConfig:
        """`base` with the values this run sets."""
        data = _overlay(msgspec.to_builtins(base), _set_values(self))
        try:
            return msgspec.convert(data, BatchConfig)
        except msgspec.ValidationError as exc:
            raise ConfigError(f"run config: {exc}") from None
