"""The batch config: defaults from configs/default.toml, user overlays, and errors that name file, key and type."""

from __future__ import annotations

import tomllib
from datetime import UTC, datetime
from pathlib import Path

import pytest

from k2batch.config import DEFAULT_CONFIG, BatchConfig, ConfigError, config_hash, load_config
from k2batch.engine.config import EngineConfig


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "batch.toml"
    path.write_text(text)
    return path


def test_defaults_load() -> None:
    config = load_config()
    assert isinstance(config, BatchConfig) and isinstance(config.engine, EngineConfig)
    assert config.model == "workspace/models/k2-demo"
    assert (config.sampling.temperature, config.sampling.top_p, config.sampling.top_k) == (1.0, 0.95, 0)
    assert config.agent.max_context_tokens is None
    assert config.tools.now == datetime(2025, 11, 6, tzinfo=UTC)
    assert {"default", "retrieval", "draft", "synthesis"} <= set(config.tasks)
    assert config.system_prompt("retrieval") == config.tasks["retrieval"]
    assert config.system_prompt("unheard-of") == config.system_prompt(None) == config.tasks["default"]


def test_every_default_key_is_documented() -> None:
    # A key line sits under a comment, directly or below other keys the same comment covers.
    lines = DEFAULT_CONFIG.read_text().splitlines()
    for i, line in enumerate(lines):
        if line and not line.startswith(("#", "[")):
            above = i - 1
            while lines[above] and not lines[above].startswith(("#", "[")):
                above -= 1
            assert lines[above].startswith("#"), f"undocumented: {line}"
    assert tomllib.loads(DEFAULT_CONFIG.read_text())["model"]


def test_a_user_file_overlays_the_defaults_key_by_key(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
model = "s3://models/kimi-k2-thinking"
[engine]
max_num_seqs = 256
device = "cuda"
[agent]
max_context_tokens = 131072
[tools]
enabled = ["search"]
[tools.python]
memory_mb = 2048
[tasks]
triage = "Sort the ticket."
""",
    )
    config, defaults = load_config(path), load_config()
    assert config.model == "s3://models/kimi-k2-thinking"
    assert (config.engine.max_num_seqs, config.engine.device) == (256, "cuda")
    assert config.engine.block_size == defaults.engine.block_size
    assert config.agent.max_context_tokens == 131072 and config.agent.max_steps == defaults.agent.max_steps
    assert config.tools.enabled == ("search",) and config.tools.python.memory_mb == 2048
    assert config.tools.python.wall_s == defaults.tools.python.wall_s
    assert config.tasks["triage"] == "Sort the ticket." and config.tasks["default"] == defaults.tasks["default"]
    assert load_config(str(path)) == config


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[engine]\nmax_num_seqs = 'many'", "batch.toml: engine.max_num_seqs: expected int, got str"),
        ("[agent]\nmax_step = 3", "batch.toml: agent.max_step: unknown key (allowed here: max_steps,"),
        (
            "[tools.python]\nram = 3",
            "batch.toml: tools.python.ram: unknown key (allowed here: wall_s, cpu_s, memory_mb",
        ),
        ("color = 'blue'", "batch.toml: color: unknown key (allowed here: model, engine,"),
        ("[engine]\nturbo = true", "batch.toml: engine.turbo: unknown key (allowed here: max_num_seqs,"),
        ("[sampling]\ntop_p = [0.9]", "batch.toml: sampling.top_p: expected float, got array"),
        ("tasks = 'none'", "batch.toml: tasks: expected object, got str"),
        ("[shards]\nrows_per_shard = 0", "batch.toml: shards: rows_per_shard must be at least 1"),
        ("[tools]\nnow = '2025-01-01T00:00:00'", "batch.toml: tools: now needs a timezone"),
        ("[tools]\nnow = 'yesterday'", "batch.toml: tools.now: invalid RFC3339 encoded datetime"),
        ("[storage.options]\nsecret = 'x'", "batch.toml: storage.options.secret: secrets come from the environment"),
        (
            "[storage.options.client_kwargs]\naws_secret_access_key = 'x'",
            "batch.toml: storage.options.client_kwargs.aws_secret_access_key: secrets come from the environment",
        ),
        (
            "[storage]\noptions = {s3 = {key = 'AKIA', secret = 'SK'}}",
            "batch.toml: storage.options.s3.key: secrets come from the environment",
        ),
        (
            "[storage.options.config_kwargs.s3]\nAWS-Session-Token = 'x'",
            "batch.toml: storage.options.config_kwargs.s3.AWS-Session-Token: secrets come from the environment",
        ),
        (
            "[storage.options]\nprofiles = [{name = 'a'}, {name = 'b', password = 'x'}]",
            "batch.toml: storage.options.profiles[1].password: secrets come from the environment",
        ),
        ("[sampling]\nseed = 4611686018427387904", "batch.toml: sampling: seed is 4611686018427387904, expected an"),
        ("[engine\n", "batch.toml: not valid TOML"),
    ],
)
def test_errors_name_the_file_the_key_and_the_expected_type(tmp_path: Path, text: str, message: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as error:
        load_config(path)
    assert str(error.value).startswith(f"{path.parent}/{message}"), str(error.value)


def test_a_missing_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"missing\.toml: cannot read the config file"):
        load_config(tmp_path / "missing.toml")


def test_config_hash_is_stable_and_tracks_what_shapes_results(tmp_path: Path) -> None:
    base = config_hash(load_config())
    assert base == config_hash(load_config()) and len(base) == 16
    assert config_hash(load_config(write(tmp_path, "[sampling]\ntemperature = 0.0"))) != base
    # Where data lives does not change the results.
    assert config_hash(load_config(write(tmp_path, "[storage.options]\nendpoint_url = 'http://x'"))) == base
