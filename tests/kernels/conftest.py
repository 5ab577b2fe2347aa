"""Kernel tests run alone still get Triton's interpreter on machines without CUDA (as the top-level conftest sets)."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
