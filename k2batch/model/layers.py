"""The building blocks of a DeepSeek-V3 / K2 decoder layer: RMSNorm, MLA, dense MLP, noaux_tc MoE."""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from k2batch.kernels.int4_moe import PACK_FACTOR, ExpertWeights, Int4Weight, fused_moe
from k2batch.model.config import ModelConfig
from k2batch.model.rope import RotaryEmbedding, softmax_scale


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


class Attention(Protocol):
    """Where keys and values come from: the current tokens only (scoring) or a paged KV cache (the engine).

    Gets one layer's queries and the new tokens' latents, returns the attention output per head [N, H, v_dim].
    """

    def __call__(
        self,
        layer: int,
        mla: MLAttention,
        q_nope: torch.Tensor,  # [N, H, qk_nope]
        q_pe: torch.Tensor,  # [N, H, qk_rope], rotated
        latent: torch.Tensor,  # [N, kv_lora_rank], normed
        k_pe: torch.Tensor,  # [N, qk_rope], rotated
    ) -> torch.Tensor: ...


class MLAttention(nn.Module):
    """Multi-head latent attention: K/V compressed to one latent vector per token plus a shared rope key."""

    def __init__(self, config: ModelConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.num_heads = config.num_attention_heads
        self.qk_nope_dim = config.qk_nope_head_dim
        self.qk_rope_dim = config.qk_rope_head_dim
        self.v_dim = config.v_head_dim
        self.kv_lora_rank = config.kv_lora_rank
        self.scale = softmax_scale(config)
        q_dim = self.num_heads * config.qk_head_dim
        hidden = config.hidden_size
        if config.q_lora_rank is None:
            self.q_proj = nn.Linear(hidden, q_dim, bias=False)
        else:
            self.q_a_proj = nn.Linear(hidden, config.q_lora_rank, bias=False)
            self.q_a_layernorm = RMSNorm(config.q_lora_rank)
            self.q_b_proj = nn.Linear(config.q_lora_rank, q_dim, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(hidden, self.kv_lora_rank + self.qk_rope_dim, bias=False)
        self.kv_a_layernorm = RMSNorm(self.kv_lora_rank)
        self.kv_b_proj = nn.Linear(self.kv_lora_rank, self.num_heads * (self.qk_nope_dim + self.v_dim), bias=False)
        self.o_proj = nn.Linear(self.num_heads * self.v_dim, hidden, bias=False)

    def forward(
        self, x: torch.Tensor, positions: torch.Tensor, rope: RotaryEmbedding, attention: Attention
    ) -> torch.Tensor:
        n = x.shape[0]
        if hasattr(self, "q_proj"):
            q = self.q_proj(x)
        else:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        q_nope, q_pe = q.view(n, self.num_heads, -1).split([self.qk_nope_dim, self.qk_rope_dim], dim=-1)
        latent, k_pe = self.kv_a_proj_with_mqa(x).split([self.kv_lora_rank, self.qk_rope_dim], dim=-1)
        latent = self.kv_a_layernorm(latent)
        q_pe = rope(q_pe, positions)
        k_pe = rope(k_pe, positions)
        out = attention(self.layer, self, q_nope, q_pe, latent, k_pe)
        return self.o_proj(out.reshape(n, self.num_heads * self.v_dim))

    def expand_qkv(
        self, q_nope: torch.Tensor, q_pe: torch.Tensor, latent: torch.Tensor, k_pe: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per-head queries [Nq, H, qk_head], keys [Nk, H, qk_head] and values [Nk, H, v] for attention with
        up-projected K/V: the keys' latents [Nk, L] go through kv_b_proj, their shared rope key [Nk, R] is
        repeated for every head. Queries and keys may be different tokens (a prefill chunk over its context)."""
        kv = self.kv_b_proj(latent).view(latent.shape[0], self.num_heads, self.qk_nope_dim + self.v_dim)
        k_nope, v = kv.split([self.qk_nope_dim, self.v_dim], dim=-1)
        q = torch.cat((q_nope, q_pe), dim=-1)
        k = torch.cat((k_nope, k_pe.unsqueeze(1).expand(-1, self.num_heads, -1)), dim=-1)
        return q, k, v

    def absorbed(self) -> tuple[torch.Tensor, torch.Tensor]:
        """kv_b_proj split per head as W_UK [H, qk_nope, L] and W_UV [H, v, L], for attention in latent space."""
        w = self.kv_b_proj.weight.view(self.num_heads, self.qk_nope_dim + self.v_dim, self.kv_lora_rank)
        return w[:, : self.qk_nope_dim], w[:, self.qk_nope_dim :]


class MLP(nn.Module):
    def __init__(self, hidden: int, intermediate: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Router(nn.Module):
    """Sigmoid scores, group-limited top-k chosen with the load-balancing bias (noaux_tc), weights without it."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.top_k = config.num_experts_per_tok
        self.n_group = config.n_group
        self.topk_group = config.topk_group
        self.norm_topk_prob = config.norm_topk_prob
        self.scaling = config.routed_scaling_factor
        self.weight = nn.Parameter(torch.empty(config.n_routed_experts, config.hidden_size))
        # Kept in float32 whatever the model dtype: the bias is tiny relative to the scores.
        self.register_buffer("e_score_correction_bias", torch.zeros(config.n_routed_experts, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        scores = F.linear(x.float(), self.weight.float()).sigmoid()
        choice = scores + self.e_score_correction_bias
        n = x.shape[0]
        if self.n_group > 1:
            group_scores = choice.view(n, self.n_group, -1).topk(2, dim=-1)[0].sum(-1)
            group_idx = group_scores.topk(self.topk_group, dim=-1, sorted=False)[1]
            group_mask = torch.zeros_like(group_scores).scatter_(1, group_idx, 1).bool()
            choice = choice.masked_fill(
                ~group_mask.repeat_interleave(choice.shape[1] // self.n_group, 1), float("-inf")
            )
        topk_ids = choice.topk(self.top_k, dim=-1, sorted=False)[1]
        topk_weights = scores.gather(1, topk_ids)
        if self.norm_topk_prob:
            topk_weights = topk_weights / (topk_weights.sum(-1, keepdim=True) + 1e-20)
        return topk_weights * self.scaling, topk_ids


class RoutedExperts(nn.Module):
    """All routed experts of a layer, stacked: gate||up as w13 [E, 2I, H], down as w2 [E, H, I].

    Dense (float parameters) or packed INT4 (int32 words + scales, dequantized per use on CPU, read by the
    Triton kernel on GPU).
    """

    def __init__(self, num_experts: int, hidden: int, intermediate: int, int4_scale_dtype: torch.dtype | None):
        super().__init__()
        self.quantized = int4_scale_dtype is not None
        if self.quantized:
            e, h, i = num_experts, hidden, intermediate
            self.register_buffer("w13_packed", torch.empty(e, 2 * i, h // PACK_FACTOR, dtype=torch.int32))
            self.register_buffer("w13_scale", torch.empty(e, 2 * i, h // 32, dtype=int4_scale_dtype))
            self.register_buffer("w2_packed", torch.empty(e, h, i // PACK_FACTOR, dtype=torch.int32))
            self.register_buffer("w2_scale", torch.empty(e, h, i // 32, dtype=int4_scale_dtype))
        else:
            self.w13 = nn.Parameter(torch.empty(num_experts, 2 * intermediate, hidden))
            self.w2 = nn.Parameter(torch.empty(num_experts, hidden, intermediate))

    def dequantize_(self, dtype: torch.dtype) -> None:
        """Replace packed INT4 weights by dense `dtype` ones holding the same values (as rounded per use)."""
        if not self.quantized:
            return
        w13, w2 = self.weights()
        self.w13 = nn.Parameter(w13.dequantize(dtype), requires_grad=False)
        self.w2 = nn.Parameter(w2.dequantize(dtype), requires_grad=False)
        for name in ("w13_packed", "w13_scale", "w2_packed", "w2_scale"):
            delattr(self, name)
        self.quantized = False

    def weights(self) -> tuple[ExpertWeights, ExpertWeights]:
        if self.quantized:
            return Int4Weight(self.w13_packed, self.w13_scale), Int4Weight(self.w2_packed, self.w2_scale)
        return self.w13, self.w2

    def forward(self, x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor) -> torch.Tensor:
        w13, w2 = self.weights()
        return fused_moe(x, w13, w2, topk_weights, topk_ids)


class ExpertExchange(Protocol):
    """Runs a layer's routed experts when they are split over ranks (expert parallelism): sends each token to the
    ranks owning its top-k experts and returns the weighted sum of their outputs [N, hidden]."""

    def __call__(
        self, x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor, experts: RoutedExperts
    ) -> torch.Tensor: ...


class MoE(nn.Module):
    def __init__(self, config: ModelConfig, int4_scale_dtype: torch.dtype | None, experts: range | None = None):
        super().__init__()
        self.gate = Router(config)
        experts = experts if experts is not None else range(config.n_routed_experts)
        self.experts = RoutedExperts(len(experts), config.hidden_size, config.moe_intermediate_size, int4_scale_dtype)
        self.expert_range = experts
        """The routed experts this module holds: all of them, or one rank's share under expert parallelism."""
        self.exchange: ExpertExchange | None = None
        self.shared_experts = (
            MLP(config.hidden_size, config.moe_intermediate_size * config.n_shared_experts)
            if config.n_shared_experts
            else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        topk_weights, topk_ids = self.gate(x)
        if self.exchange is not None:
            out = self.exchange(x, topk_weights, topk_ids, self.experts)
        else:
            out = self.experts(x, topk_weights, topk_ids)
        if self.shared_experts is not None:
            out = out + self.shared_experts(x)
        return out


class DecoderLayer(nn.Module):
    def __init__(
        self, config: ModelConfig, layer: int, int4_scale_dtype: torch.dtype | None, experts: range | None = None
    ):
        super().__init__()
        self.self_attn = MLAttention(config, layer)
        self.mlp = (
            MoE(config, int4_scale_dtype, experts)
            if config.is_moe_layer(layer)
            else MLP(config.hidden_size, config.intermediate_size)
        )
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(
        self, x: torch.Tensor, positions: torch.Tensor, rope: RotaryEmbedding, attention: Attention
    ) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), positions, rope, attention)
        return x + self.mlp(self.post_attention_layernorm(x))
