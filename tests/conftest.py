"""Test-wide setup: Triton's interpreter on machines without CUDA, before any kernel is defined; offline hubs; and
the import name `kernels` kept for Hugging Face's distribution of that name."""

import importlib
import importlib.util
import os
import sys
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("AWS_EC2_METADATA_DISABLED", "true")  # never probe 169.254.169.254
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def _import_installed(name: str, checkout: Path) -> None:
    """Import the installed top-level package `name` while the checkout's root is off sys.path.

    The tests import each other as the package `tests`, so the checkout's root is on sys.path while they run, and
    its folders kernels/ and pipelines/ (installed as k2batch.kernels and k2batch.pipelines) would shadow
    installed distributions of those names: transformers imports Hugging Face's `kernels`. Imported first, the
    installed one is the module every later `import kernels` gets."""
    saved = sys.path[:]
    sys.path[:] = [entry for entry in saved if Path(entry or ".").resolve() != checkout]
    try:
        if importlib.util.find_spec(name) is not None:
            importlib.import_module(name)
    finally:
        sys.path[:] = saved


_import_installed("kernels", Path(__file__).resolve().parents[1])
