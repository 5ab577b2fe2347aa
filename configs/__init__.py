"""The shipped defaults, installed as package data of `k2batch.configs`: default.toml (every batch setting),
demo.toml (the demo batch), dagster.toml (the Dagster definitions) and dagster-k8s/ (instance and executor for
Kubernetes). `k2batch.configs.path(name)` finds one wherever the package is installed."""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path


def path(name: str) -> Path:
    """The shipped file `name` (e.g. "default.toml", "dagster-k8s/executor.yaml")."""
    found = Path(str(files(__name__).joinpath(name)))
    if not found.is_file():
        raise FileNotFoundError(f"k2batch ships no config {name!r} (looked in {found.parent})")
    return found
