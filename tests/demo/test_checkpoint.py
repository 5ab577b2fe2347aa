"""The committed demo model: loads as a K2 Thinking checkpoint and answers held-out jobs through `k2batch demo`."""

from __future__ import annotations

import inspect
import json
import re
import shlex
import subprocess
from pathlib import Path

import pytest
import train_demo

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
    assert (
        json.loads((DEMO / "generation_config.json").read_text())["eos_token_id"][0]
        == tokenizer.special_tokens["<|im_end|>"]
    )


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
    # Greedy, so the same every run: all 6 right (the demo model gets 97-100% of held-out jobs per task), and
    # every answer's facts come from its tool results.
    assert table["correct"].all()
    assert table["traceable"].all()


def recipe(record: dict) -> list[dict]:
    """A checkpoint's training runs, last first: each run that went on from another records it as init_training."""
    runs = [record]
    while "init_training" in runs[-1]:
        runs.append(runs[-1]["init_training"])
    return runs


def settings(args) -> tuple:
    return (
        args.seed,
        args.jobs,
        args.steps,
        args.qat_steps,
        args.lr,
        args.qk_clip,
        args.fresh_worlds,
        args.tasks,
        args.balanced_lengths,
        args.echo_names,
        args.echo_digits,
        args.typos,
        args.init,
    )


def recorded_settings(run: dict) -> tuple:
    return (
        run["seed"],
        run["num_jobs"],
        run["steps"],
        run["qat_steps"],
        run["lr"],
        run["qk_clip_threshold"],
        run.get("fresh_worlds", 0),
        tuple(run.get("tasks", TASKS)),
        run.get("balanced_lengths", 0.0),
        run.get("echo_names", 0.0),
        run.get("echo_digits", 0.0),
        run.get("typos", 0.0),
        run.get("init"),
    )


def test_training_json_holds_the_commands_that_reproduce_the_committed_checkpoint():
    """The first run is `train_demo.py --seed 0` (the defaults, as workspace/README.md gives it); every later one
    recorded its command line, whose arguments parse to the settings it recorded."""
    runs = recipe(json.loads((DEMO / "training.json").read_text()))
    assert json.loads((MODELS / "k2-demo-bf16" / "training.json").read_text())["seed"] == runs[0]["seed"]
    *later, first = runs
    args = train_demo.build_parser().parse_args(["--seed", str(first["seed"])])
    assert settings(args) == recorded_settings(first)
    defaults = inspect.signature(train_demo.train_demo).parameters
    assert (
        defaults["num_jobs"].default,
        defaults["fresh_worlds"].default,
        defaults["tasks"].default,
        defaults["balanced_lengths"].default,
        defaults["echo_names"].default,
        defaults["echo_digits"].default,
        defaults["typos"].default,
    ) == (
        args.jobs,
        args.fresh_worlds,
        args.tasks,
        args.balanced_lengths,
        args.echo_names,
        args.echo_digits,
        args.typos,
    )
    for run in later:
        assert settings(train_demo.build_parser().parse_args(arguments(run["command"]))) == recorded_settings(run)
    # The newest run names the commit of the code it ran on (a run from scratch lands where the float arithmetic
    # takes it), and that commit is in this repository's history (unless the clone is shallow).
    code = runs[0]["code"]
    assert code["dirty"] is False and re.fullmatch(r"[0-9a-f]{40}", code["commit"])
    git = ["git", "-C", str(DEMO)]
    shallow = subprocess.run([*git, "rev-parse", "--is-shallow-repository"], capture_output=True, text=True).stdout
    if shallow.strip() == "false":
        found = subprocess.run([*git, "cat-file", "-e", f"{code['commit']}^{{commit}}"], capture_output=True, text=True)
        assert found.returncode == 0, found.stderr


def arguments(command: str) -> list[str]:
    """The arguments of a recorded command line: what follows the program (the first word that is an option on)."""
    words = shlex.split(command)
    return words[next(i for i, word in enumerate(words) if word.startswith("--")) :]


def test_the_product_command_has_no_training_verb(capsys):
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["train-demo", "--seed", "0"])
    assert "invalid choice: 'train-demo'" in capsys.readouterr().err


def test_train_demo_rejects_a_negative_number_of_fresh_worlds(capsys):
    with pytest.raises(SystemExit):
        train_demo.build_parser().parse_args(["--fresh-worlds", "-1"])
    assert "--fresh-worlds: must be >= 0, got -1" in capsys.readouterr().err


def test_train_demo_parses_the_task_mix_and_rejects_bad_ones(capsys):
    args = train_demo.build_parser().parse_args(["--tasks", "synthesis, retrieval", "--balanced-lengths", "1"])
    assert args.tasks == ("synthesis", "retrieval") and args.balanced_lengths == 1.0
    for flag, value, message in (
        ("--tasks", "retrieval,summary", "tasks must be a non-empty sequence of retrieval, draft, synthesis"),
        ("--balanced-lengths", "2", "must be in [0, 1], got 2.0"),
        ("--echo-names", "-0.1", "must be in [0, 1], got -0.1"),
        ("--echo-digits", "1.5", "must be in [0, 1], got 1.5"),
        ("--typos", "-1", "must be in [0, 1], got -1.0"),
    ):
        with pytest.raises(SystemExit):
            train_demo.build_parser().parse_args([flag, value])
        assert message in capsys.readouterr().err
