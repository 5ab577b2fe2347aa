"""Rotary position embedding for MLA's rope dims: plain or YaRN, interleaved pairs or rotate-half."""

from __future__ import annotations

import math

import torch

from k2batch.model.config import ModelConfig, RopeConfig


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def softmax_scale(config: ModelConfig) -> float:
    """1/sqrt(qk_head_dim), times YaRN's mscale(factor, mscale_all_dim)^2 as DeepSeek-V3 applies it to the logits."""
    scale = config.qk_head_dim**-0.5
    rope = config.rope
    if rope.rope_type != "default" and rope.mscale_all_dim:
        m = _yarn_mscale(rope.factor, rope.mscale_all_dim)
        scale = scale * m * m
    return scale


def inv_freq_and_attention_factor(rope: RopeConfig, dim: int) -> tuple[torch.Tensor, float]:
    base = rope.theta
    # Explicit CPU: models are built under torch.device("meta"), and these are real numbers.
    pos_freqs = base ** (torch.arange(0, dim, 2, dtype=torch.float32, device="cpu") / dim)
    if rope.rope_type == "default":
        return 1.0 / pos_freqs, 1.0

    factor = rope.factor
    if rope.attention_factor is not None:
        attention_factor = float(rope.attention_factor)
    elif rope.mscale and rope.mscale_all_dim:
        attention_factor = _yarn_mscale(factor, rope.mscale) / _yarn_mscale(factor, rope.mscale_all_dim)
    else:
        attention_factor = _yarn_mscale(factor)

    original = rope.original_max_position_embeddings

    def correction_dim(rotations: float) -> float:
        return (dim * math.log(original / (rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(rope.beta_fast), correction_dim(rope.beta_slow)
    if rope.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32, device="cpu") - low) / (high - low), 0, 1)
    extrapolation = 1 - ramp  # 1 where the original frequency is kept (high frequencies)
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation
    return inv_freq, attention_factor


class RotaryEmbedding:
    """cos/sin tables per position, computed once up to the context length and grown on demand."""

    def __init__(self, config: ModelConfig):
        self.interleave = config.rope_interleave
        self.inv_freq, self.attention_factor = inv_freq_and_attention_factor(config.rope, config.qk_rope_head_dim)
        self._cos = self._sin = torch.empty(0, device="cpu")

    def _grow(self, length: int, device: torch.device) -> None:
        t = torch.arange(length, dtype=torch.float32, device="cpu")
        freqs = torch.outer(t, self.inv_freq)
        self._cos = (freqs.cos() * self.attention_factor).to(device)
        self._sin = (freqs.sin() * self.attention_factor).to(device)

    def __call__(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Rotate x [N, ..., rope_dim] at positions [N]. Interleaved output is de-interleaved (evens then odds),
        exactly as the reference does; q and k get the same permutation, so their dot products are unchanged."""
        needed = int(positions.max()) + 1 if positions.numel() else 0
        if needed > self._cos.shape[0] or self._cos.device != x.device:
            self._grow(max(needed, 2 * self._cos.shape[0], 4096), x.device)
        shape = (positions.shape[0],) + (1,) * (x.dim() - 2) + (-1,)
        cos = self._cos[positions].view(shape).to(x.dtype)
        sin = self._sin[positions].view(shape).to(x.dtype)
        if self.interleave:
            x1, x2 = x[..., 0::2], x[..., 1::2]
        else:
            half = x.shape[-1] // 2  # rotate-half pairs dim i with dim i + half
            x1, x2 = x[..., :half], x[..., half:]
        return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
