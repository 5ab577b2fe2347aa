"""The IO manager: step outputs as typed JSON (plain data, never pickles), kept away from the data root."""

import os
import re
from typing import Any

import dagster as dg
import msgspec
from pydantic import Field, PrivateAttr

from k2batch.pipelines.assets import BatchPlan, ShardOutcome, ShardTask
from k2batch.pipelines.resources import StorageResource
from k2batch.storage import exists, join, read_bytes, write_bytes_atomic

_GLOB = re.compile(r"[\[\]*?]+")
# Every type a step hands to another, by the name stored beside the value. Decoding builds exactly these.
STEP_TYPES: dict[str, Any] = {
    "BatchPlan": BatchPlan,
    "ShardTask": ShardTask,
    "ShardOutcome": ShardOutcome,
    "list[ShardOutcome]": list[ShardOutcome],
}


class _Stored(msgspec.Struct, frozen=True):
    type: str
    value: msgspec.Raw


def _type_name(obj: Any) -> str:
    if isinstance(obj, list) and all(isinstance(item, ShardOutcome) for item in obj):
        return "list[ShardOutcome]"
    name = type(obj).__name__
    if STEP_TYPES.get(name) is not type(obj):
        raise TypeError(f"a step output of type {type(obj).__name__} is not one of {', '.join(STEP_TYPES)}")
    return name


def _normalised(uri: str) -> str:
    return os.path.realpath(uri) if "://" not in uri else uri.rstrip("/")


class StepOutputsIOManager(dg.ConfigurableIOManager):
    """Keeps step outputs as JSON of known msgspec types, assets by key and partition, op outputs by run and step.

    A file there can change what a later step reads, never run code in it. They live under `root`: by default
    the Dagster instance's storage directory (in DAGSTER_HOME), right when every step runs on one machine; for
    steps on many machines (k8s), a URI all of them can read that only the pipeline writes. Never under the
    storage root, where whoever drops inputs can write."""

    storage: dg.ResourceDependency[StorageResource]
    root: str = Field(default="", description="Where step outputs go; empty: the Dagster instance's storage directory.")
    _base: str = PrivateAttr(default="")

    def setup_for_execution(self, context: dg.InitResourceContext) -> None:
        base = self.root
        if not base:
            if context.instance is None:
                raise dg.Failure("step outputs need a Dagster instance (DAGSTER_HOME) or a root")
            base = context.instance.storage_directory()
        data, mine = _normalised(self.storage.root), _normalised(base)
        if mine == data or mine.startswith(data + "/"):
            raise dg.Failure(
                f"step outputs under {base} would lie inside the storage root {self.storage.root}, where whoever "
                "drops inputs can write; set step_outputs in configs/dagster.toml to a place only the pipeline writes"
            )
        self._base = base

    def _uri(self, context: dg.OutputContext | dg.InputContext) -> str:
        if context.has_asset_key:
            parts = ["assets", *context.asset_key.path]
            if context.has_asset_partitions:
                parts.append(context.asset_partition_key)
        else:
            output = context if isinstance(context, dg.OutputContext) else context.upstream_output
            # Step keys of mapped steps hold brackets (run_shard[shard_00001]), which fsspec reads as globs.
            parts = ["steps", *(_GLOB.sub("-", part).rstrip("-") for part in output.get_identifier())]
        return join(self._base, *parts) + ".json"

    def _options(self) -> dict[str, Any]:
        return self.storage.fsspec_options() if "://" in self._base else {}

    def handle_output(self, context: dg.OutputContext, obj: Any) -> None:
        if obj is None:
            return
        uri = self._uri(context)
        data = msgspec.json.encode({"type": _type_name(obj), "value": obj})
        write_bytes_atomic(uri, data, self._options())
        context.add_output_metadata({"uri": uri})

    def load_input(self, context: dg.InputContext) -> Any:
        uri = self._uri(context)
        options = self._options()
        if not exists(uri, options):
            raise dg.Failure(f"{uri} is missing: materialize the upstream asset of {context.name!r} first")
        try:
            stored = msgspec.json.decode(read_bytes(uri, options), type=_Stored)
            if stored.type not in STEP_TYPES:
                raise msgspec.ValidationError(f"unknown type {stored.type!r}")
            return msgspec.json.decode(stored.value, type=STEP_TYPES[stored.type])
        except msgspec.DecodeError as error:
            raise dg.Failure(f"{uri} is not a step output this pipeline wrote ({error}); materialize again") from None
