"""OneThreadArithmetic: a torch dispatch mode under which a CPU training step on N threads gives the bits it gives on
one thread, with most of its time still spread over the N threads."""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode

# Ops whose every output element is computed the same way however many threads share the work: matrix products and
# the fused attention (split over rows, columns and heads, never along a sum), products and quotients (rounded once
# whichever code computes them), maxima, and data movement. Not in it: sums with a factor (`add(alpha=)`, which
# vectorized code may fuse), reductions, accumulating scatters, and transcendental functions, whose vectorized and
# scalar code round differently, so a split that moves where a thread's vectorized loop ends changes bits (sigmoid on
# 4130 x 8 router scores does). Over 40 training steps of the demo model, with every op of a step (forward,
# backward, optimizers) run on two threads and on one with the same inputs, the router's sigmoid is the only op whose
# bits differ (benchmarks/results/train-demo-one-thread-arithmetic-cpu-2core-2026-12-05.txt).
_aten = torch.ops.aten
THREAD_INVARIANT_OPS = frozenset(
    (
        _aten.mm.default,
        _aten.addmm.default,
        _aten.bmm.default,
        _aten._scaled_dot_product_flash_attention_for_cpu.default,
        _aten._scaled_dot_product_flash_attention_for_cpu_backward.default,
        _aten.mul.Tensor,
        _aten.mul_.Tensor,
        _aten.mul.Scalar,
        _aten.div.Tensor,
        _aten.div.Scalar,
        _aten.amax.default,
        _aten.copy_.default,
        _aten.slice_backward.default,
        _aten.select_backward.default,
        _aten.new_zeros.default,
        _aten.clone.default,
        _aten.cat.default,
        _aten.stack.default,
        _aten.fill_.Scalar,
        _aten.zero_.default,
        _aten.masked_fill_.Scalar,
        _aten.index.Tensor,
        _aten.index_select.default,
        _aten.gather.default,
        _aten.where.self,
        _aten.constant_pad_nd.default,
        _aten.embedding.default,
        _aten.empty.memory_format,
        _aten.empty_strided.default,
        _aten.zeros.default,
        _aten.view.default,
        _aten._unsafe_view.default,
        _aten.t.default,
        _aten.transpose.int,
        _aten.permute.default,
        _aten.slice.Tensor,
        _aten.select.int,
        _aten.expand.default,
        _aten.unsqueeze.default,
        _aten.squeeze.dim,
        _aten.detach.default,
        _aten.alias.default,
        _aten.split.Tensor,
        _aten.split_with_sizes.default,
        _aten.unbind.int,
        _aten.as_strided.default,
    )
)
# a + b and a - b round once however computed; a + alpha * b may be fused in vectorized code and not in scalar code.
_ADD_OPS = frozenset((_aten.add.Tensor, _aten.add_.Tensor, _aten.sub.Tensor))
_POW = _aten.pow.Tensor_Scalar  # x ** 2 is x * x in both codes; other powers are transcendental


class OneThreadArithmetic(TorchDispatchMode):
    """The bits of a one-thread run, computed with `threads`: the ops of THREAD_INVARIANT_OPS (most of a training
    step's time) run on all of them, every other op on one. A run under it gives the same checkpoint as the same run
    under `torch.set_num_threads(1)` (tested), in less time."""

    def __init__(self, threads: int):
        super().__init__()
        self.threads = threads

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if (
            func in THREAD_INVARIANT_OPS
            or (func in _ADD_OPS and kwargs.get("alpha", 1) == 1)
            or (func is _POW and args[1] == 2)
        ):
            return func(*args, **kwargs)
        torch.set_num_threads(1)
        try:
            return func(*args, **kwargs)
        finally:
            torch.set_num_threads(self.threads)
