"""Step outputs are typed JSON in Dagster's own storage: a planted pickle runs nothing, and nothing of Dagster's
lies under the data root, where whoever drops inputs can write."""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import dagster as dg
import pytest

from k2batch.config import load_config
from k2batch.pipelines.assets import BatchPlan, ShardOutcome, ShardTask
from k2batch.pipelines.resources import StorageResource
from k2batch.pipelines.step_outputs import StepOutputsIOManager
from k2batch.shards import new_manifest, plan_shards
from tests.pipelines.conftest import write_jobs


class RunsCode:
    """A pickle that runs code when loaded: it creates `marker`."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture
def plan(tmp_path: Path) -> BatchPlan:
    inputs = write_jobs(tmp_path / "root" / "inputs" / "b1" / "jobs.parquet")
    return BatchPlan(
        batch="b1",
        input_uri=str(inputs.parent),
        output_uri=str(tmp_path / "root" / "outputs" / "b1"),
        config=load_config(),
        plan=plan_shards(str(inputs.parent), 3),
    )


def manager_for(data_root: Path, instance: dg.DagsterInstance, **fields: str) -> StepOutputsIOManager:
    manager = StepOutputsIOManager(storage=StorageResource(root=str(data_root)), **fields)
    manager.setup_for_execution(dg.build_init_resource_context(instance=instance))
    return manager


def contexts(key: str = "shard_plan") -> tuple[dg.OutputContext, dg.InputContext]:
    output = dg.build_output_context(asset_key=dg.AssetKey(key), partition_key="b1")
    return output, dg.build_input_context(asset_key=dg.AssetKey(key), partition_key="b1", upstream_output=output)


def test_every_step_type_round_trips_as_json(plan: BatchPlan, tmp_path: Path) -> None:
    shard = plan.plan.shards[0]
    outcome = ShardOutcome(manifest=new_manifest(shard, "hash"), engine={"decode_tokens": 3.0})
    values = {
        "BatchPlan": plan,
        "ShardTask": ShardTask(output_uri=plan.output_uri, config=plan.config, shard=shard),
        "ShardOutcome": outcome,
        "list[ShardOutcome]": [outcome, outcome],
    }
    with dg.instance_for_test() as instance:
        manager = manager_for(tmp_path / "root", instance)
        stored = Path(instance.storage_directory()) / "assets" / "shard_plan" / "b1.json"
        for name, value in values.items():
            output, load = contexts()
            manager.handle_output(output, value)
            assert json.loads(stored.read_text())["type"] == name
            assert manager.load_input(load) == value
        with pytest.raises(TypeError, match="not one of BatchPlan, ShardTask, ShardOutcome"):
            manager.handle_output(contexts()[0], {"any": "dict"})


def test_a_planted_pickle_is_refused_and_runs_nothing(plan: BatchPlan, tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    with dg.instance_for_test() as instance:
        manager = manager_for(tmp_path / "root", instance)
        output, load = contexts()
        manager.handle_output(output, plan)
        stored = Path(instance.storage_directory()) / "assets" / "shard_plan" / "b1.json"
        stored.write_bytes(pickle.dumps(RunsCode(marker)))
        with pytest.raises(dg.Failure, match="is not a step output this pipeline wrote"):
            manager.load_input(load)
        # JSON of another type, or of the right type with a changed shape, is refused the same way.
        stored.write_text(json.dumps({"type": "builtins.eval", "value": "1"}))
        with pytest.raises(dg.Failure, match="unknown type 'builtins.eval'"):
            manager.load_input(load)
    assert not marker.exists()


def test_step_outputs_never_lie_under_the_data_root(tmp_path: Path) -> None:
    with dg.instance_for_test() as instance:
        for inside in (tmp_path / "root", tmp_path / "root" / "dagster"):
            with pytest.raises(dg.Failure, match="inside the storage root"):
                manager_for(tmp_path / "root", instance, root=str(inside))
        manager_for(tmp_path / "root", instance, root=str(tmp_path / "steps"))
