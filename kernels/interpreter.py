"""Kernels that run compiled on CUDA and under Triton's CPU interpreter (TRITON_INTERPRET=1, read at definition)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction


def interpreted(kernel) -> bool:
    """Whether `kernel` was defined under the interpreter, which mishandles 16-bit float dots (triton#11584)."""
    return isinstance(kernel, InterpretedFunction)


def check_launch(kernel, *tensors: torch.Tensor) -> None:
    """Fail with a fix instead of a Triton crash when CPU tensors meet a compiled kernel."""
    if not interpreted(kernel) and any(t.device.type != "cuda" for t in tensors):
        devices = sorted({str(t.device) for t in tensors})
        raise RuntimeError(
            f"Triton kernels need CUDA tensors, got {devices}; on CPU set TRITON_INTERPRET=1 before importing kernels"
        )


@triton.jit
def dot(a, b, acc, INTERPRETED: tl.constexpr, PRECISION: tl.constexpr):
    """acc + a @ b; under the interpreter in fp32, since its 16-bit float dots return garbage (triton#11584)."""
    if INTERPRETED:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=PRECISION)


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 operands get full-precision dots (tf32 would lose 13 mantissa bits); 16-bit ones ignore this."""
    return "ieee" if dtype == torch.float32 else "tf32"
