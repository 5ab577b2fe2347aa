"""INT4 (W4A16) mixture-of-experts: the packed layout of K2 Thinking, its torch reference, one entry point.

Layout (compressed-tensors `pack-quantized`, symmetric, group 32), per linear [out, in]:
  packed  int32 [out, in // 8]   nibble j of word w holds input column 8*w + j at bits 4j..4j+3,
                                 stored as q + 8 (q in [-8, 7])
  scale   bf16  [out, in // 32]  one scale per 32 consecutive inputs
  weight = (nibble - 8) * scale
Stacked experts add a leading [E] dimension to both.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

GROUP_SIZE = 32
PACK_FACTOR = 8  # int4 values per int32 word
_SHIFTS = torch.arange(0, 32, 4, dtype=torch.int32)


@dataclass(frozen=True)
class Int4Weight:
    """A packed INT4 weight (optionally stacked over experts): `[..., out, in // 8]` + scales."""

    packed: torch.Tensor
    scale: torch.Tensor

    @property
    def out_features(self) -> int:
        return self.packed.shape[-2]

    @property
    def in_features(self) -> int:
        return self.packed.shape[-1] * PACK_FACTOR

    def __getitem__(self, expert: int) -> Int4Weight:
        return Int4Weight(self.packed[expert], self.scale[expert])

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        return unpack_int4(self.packed, self.scale, dtype)


def quantize_int4(w: torch.Tensor, scale_dtype: torch.dtype = torch.bfloat16) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric group-32 INT4 as compressed-tensors computes it: scale = amax / 7.5, q = clamp(round(w / scale)).

    Returns (q int8 [..., out, in], scale [..., out, in // 32]); the scale is rounded to `scale_dtype` first,
    so dequantization with the stored scale reproduces exactly what was quantized.
    """
    if w.shape[-1] % GROUP_SIZE:
        raise ValueError(f"INT4 needs the input dimension to be a multiple of {GROUP_SIZE}, got {w.shape[-1]}")
    groups = w.float().unflatten(-1, (-1, GROUP_SIZE))
    scale = (groups.abs().amax(-1) / 7.5).to(scale_dtype)
    safe = scale.float().clamp_min(torch.finfo(torch.float32).tiny).unsqueeze(-1)
    q = torch.clamp(torch.round(groups / safe), -8, 7).to(torch.int8).flatten(-2)
    return q, scale


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """int8 values in [-8, 7], [..., in] -> int32 words [..., in // 8] (lowest nibble first, stored + 8)."""
    nibbles = (q.to(torch.int32) + 8).unflatten(-1, (-1, PACK_FACTOR))
    return (nibbles << _SHIFTS.to(q.device)).sum(-1, dtype=torch.int32)


def unpack_int4(packed: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Dequantize `[..., out, in // 8]` int32 words with `[..., out, in // 32]` scales to `[..., out, in]`.

    The product is rounded in the scale's dtype, as compressed-tensors (and a bf16 GPU kernel) computes it, so
    the result equals the package's own decompression bit for bit.
    """
    dtype = dtype or scale.dtype
    q = ((packed.unsqueeze(-1) >> _SHIFTS.to(packed.device)) & 0xF) - 8
    q = q.flatten(-2).unflatten(-1, (-1, GROUP_SIZE))
    return (q.to(scale.dtype) * scale.unsqueeze(-1)).flatten(-2).to(dtype)


ExpertWeights = torch.Tensor | Int4Weight  # dense [E, out, in] or packed


def _expert_matrix(w: ExpertWeights, expert: int, dtype: torch.dtype) -> torch.Tensor:
    return w[expert].dequantize(dtype) if isinstance(w, Int4Weight) else w[expert].to(dtype)


def fused_moe_reference(
    x: torch.Tensor,
    w13: ExpertWeights,
    w2: ExpertWeights,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
) -> torch.Tensor:
    """sum_k topk_weights[m, k] * down_e(silu(gate_e(x_m)) * up_e(x_m)), e = topk_ids[m, k].

    w13 stacks gate and up: [E, 2 * I, H]; w2 is down: [E, H, I]. Only experts that receive tokens are
    dequantized, one at a time, so memory stays at one expert's dense weights.
    """
    out = torch.zeros_like(x)
    flat_ids = topk_ids.flatten()
    order = torch.argsort(flat_ids, stable=True)
    counts = torch.bincount(flat_ids, minlength=w13.shape[0] if isinstance(w13, torch.Tensor) else w13.packed.shape[0])
    token_of = order // topk_ids.shape[1]
    weight_of = topk_weights.flatten()[order]
    start = 0
    for expert, count in enumerate(counts.tolist()):
        if count == 0:
            continue
        tokens = token_of[start : start + count]
        h = x[tokens]
        gate, up = F.linear(h, _expert_matrix(w13, expert, x.dtype)).chunk(2, dim=-1)
        y = F.linear(F.silu(gate) * up, _expert_matrix(w2, expert, x.dtype))
        out.index_add_(0, tokens, (y * weight_of[start : start + count, None]).to(out.dtype))
        start += count
    return out


def fused_moe(
    x: torch.Tensor,
    w13: ExpertWeights,
    w2: ExpertWeights,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
) -> torch.Tensor:
    """The routed-experts MoE: Triton on CUDA for packed weights, the torch reference elsewhere."""
    return fused_moe_reference(x, w13, w2, topk_weights, topk_ids)
