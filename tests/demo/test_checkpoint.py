"""The committed demo model: loads as a K2 Thinking checkpoint and answers held-out jobs through `k2batch demo`."""

from __future__ import annotations

import inspect
import json
from pathlib import Path

import pytest

from k2batch import cli
from k2batch.demo.tasks import TASKS
from k2batch.demo.workspace import graded
from k2batch.model import load_model
from k2batch.tokenizer import load_tokenizer

MODELS = Path(cli.WORKSPACE) / "models"
DEMO = MODELS / "k2-demo"

pytestmark = pytest.mark.skipif(not (DEMO / "config.json").exists(), reason="no committed demo model")


def test_demo_checkpoint_is_k2_thinking_format():
    raw = json.loads((DEMO / "config.json").read_text())
    assert raw["model_type"] == "kimi_k2" and raw["architectures"] == ["DeepseekV3ForCausalLM"]
    assert raw["quantization_config"]["quant_method"] == "compressed-tensors"
    model = load_model(DEMO)
    assert all(layer.mlp.experts.quantized for layer in model.layers[1:])
    assert model.layers[1].mlp.shared_experts is not None and model.config.q_lora_rank
    tokenizer = load_tokenizer(str(DEMO))
    assert tokenizer.chat_template and "<|tool_calls_section_begin|>" in tokenizer.special_tokens
    assert json.loads((DEMO / "generation_config.json").read_text())["eos_token_id"][0] == tokenizer.special_tokens["<|im_end|>"]


def test_demo_command_answers_held_out_jobs(tmp_path, monkeypatch, capsys):
    workspace = tmp_path / "workspace"
    workspace.mkdir()
    (workspace / "models").symlink_to(MODELS)
    monkeypatch.setattr(cli, "WORKSPACE", workspace)
    cli.main(["demo", "--jobs", "6"])
    out = capsys.readouterr().out
    assert "6 jobs" in out and "cache_hit_rate" in out and "correct answers" in out
    (output,) = (workspace / "storage" / "outputs").iterdir()
    table = graded(output)
    assert table.height == 6 and set(table["task"]) == {"retrieval", "draft", "synthesis"}
    assert table["malformed_steps"].sum() == 0
    # Greedy, so the same every run: all 6 right (the demo model gets 89-98% of held-out jobs per task), and
    # every answer's facts come from its tool results.
    assert table["correct"].all()
    assert table["traceable"].all()


def test_train_demo_defaults_reproduce_the_committed_checkpoint():
    """`k2batch train-demo --seed 0`, the command workspace/README.md gives, runs the recipe training.json records."""
    recorded = json.loads((DEMO / "training.json").read_text())
    args = cli.build_parser().parse_args(["train-demo", "--seed", str(recorded["seed"])])
    assert (args.jobs, args.steps, args.qat_steps, args.qk_clip, args.fresh_worlds, args.tasks,
            args.balanced_lengths) == (
        recorded["num_jobs"], recorded["steps"], recorded["qat_steps"], recorded["qk_clip_threshold"],
        recorded.get("fresh_worlds", 0), tuple(recorded.get("tasks", TASKS)), recorded.get("balanced_lengths", 0.0),
    )  # fmt: skip
    from k2batch.demo.train import train_demo

    defaults = inspect.signature(train_demo).parameters
    assert (defaults["num_jobs"].default, defaults["fresh_worlds"].default, defaults["tasks"].default,
            defaults["balanced_lengths"].default) == (args.jobs, args.fresh_worlds, args.tasks, args.balanced_lengths)  # fmt: skip


def test_train_demo_rejects_a_negative_number_of_fresh_worlds(capsys):
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["train-demo", "--fresh-worlds", "-1"])
    assert "--fresh-worlds: must be >= 0, got -1" in capsys.readouterr().err


def test_train_demo_parses_the_task_mix_and_rejects_bad_ones(capsys):
    args = cli.build_parser().parse_args(["train-demo", "--tasks", "synthesis, retrieval", "--balanced-lengths", "1"])
    assert args.tasks == ("synthesis", "retrieval") and args.balanced_lengths == 1.0
    for flag, value, message in (("--tasks", "retrieval,summary", "tasks must be a non-empty sequence of retrieval, draft, synthesis"),
                                 ("--balanced-lengths", "2", "must be in [0, 1], got 2.0")):  # fmt: skip
        with pytest.raises(SystemExit):
            cli.build_parser().parse_args(["train-demo", flag, value])
        assert message in capsys.readouterr().err
