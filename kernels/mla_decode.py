"""MLA decode attention over the paged latent cache (weight-absorbed): a split-KV Triton kernel, its torch reference."""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

from k2batch.kernels.interpreter import check_launch, dot, dot_precision, interpreted


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
    first L dims: every head shares them (MQA in latent space). Returns [B, H, L] in q's dtype, fp32 inside; a
    sequence with no cached tokens (a padding slot of a fixed-size decode batch) gets zeros.
    """
    batch, _, dim = q.shape
    block_size = kv_cache.shape[1]
    width = max(1, int(seq_lens.max()))
    positions = torch.arange(width, device=q.device)
    slots = (
        block_table.long().gather(1, (positions // block_size).expand(batch, -1)) * block_size + positions % block_size
    )
    kv = kv_cache.reshape(-1, dim)[slots].float()  # [B, T, L + R]
    scores = torch.einsum("bhd,btd->bht", q.float(), kv) * sm_scale
    scores = scores.masked_fill((positions >= seq_lens.unsqueeze(1).long()).unsqueeze(1), float("-inf"))
    probs = scores.softmax(-1).nan_to_num(0.0)  # an empty sequence's row is all -inf: NaN, then zeros
    return torch.einsum("bht,btl->bhl", probs, kv[..., :kv_lora_rank]).to(q.dtype)


@triton.jit
def _split_kernel(
    q_ptr,
    kv_ptr,
    block_table_ptr,
    seq_lens_ptr,
    out_ptr,
    lse_ptr,
    num_heads,
    num_splits,
    qk_scale,
    stride_qb,
    stride_qh,
    stride_kv,
    stride_table,
    stride_ob,
    stride_oh,
    stride_os,
    stride_lb,
    stride_lh,
    PAGE_SIZE: tl.constexpr,
    LATENT: tl.constexpr,
    ROPE: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_L: tl.constexpr,
    BLOCK_R: tl.constexpr,
    FINAL: tl.constexpr,
    INTERPRETED: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """BLOCK_H heads of one sequence over one split of its tokens, online softmax in base 2 (qk_scale has log2 e).

    FINAL (one split): writes the normalized output. Otherwise writes the split's normalized output and its
    log-sum-exp; a split past the end of a short sequence writes zeros and -inf. An empty sequence gets zeros.
    """
    head_block, split, b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    heads = head_block * BLOCK_H + tl.arange(0, BLOCK_H)
    h_ok = heads < num_heads
    dl = tl.arange(0, BLOCK_L)
    dr = tl.arange(0, BLOCK_R)
    l_ok = dl < LATENT
    r_ok = dr < ROPE
    kv_dtype = kv_ptr.dtype.element_ty
    q_rows = q_ptr + b * stride_qb + heads[:, None] * stride_qh
    q_nope = tl.load(q_rows + dl[None, :], mask=h_ok[:, None] & l_ok[None, :], other=0.0).to(kv_dtype)
    q_rope = tl.load(q_rows + LATENT + dr[None, :], mask=h_ok[:, None] & r_ok[None, :], other=0.0).to(kv_dtype)

    seq_len = tl.load(seq_lens_ptr + b)
    # Splits are whole BLOCK_N chunks, so only a sequence's last chunk is partial.
    per_split = tl.cdiv(tl.cdiv(seq_len, num_splits), BLOCK_N) * BLOCK_N
    start = split * per_split
    end = tl.minimum(start + per_split, seq_len)
    m = tl.full((BLOCK_H,), float("-inf"), dtype=tl.float32)
    denom = tl.zeros((BLOCK_H,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_H, BLOCK_L), dtype=tl.float32)
    for first in range(start, end, BLOCK_N):
        t = first + tl.arange(0, BLOCK_N)
        t_ok = t < end
        page = tl.load(block_table_ptr + b * stride_table + t // PAGE_SIZE, mask=t_ok, other=0)
        rows = kv_ptr + (page.to(tl.int64) * PAGE_SIZE + t % PAGE_SIZE) * stride_kv
        c_kv = tl.load(rows[:, None] + dl[None, :], mask=t_ok[:, None] & l_ok[None, :], other=0.0)
        k_pe = tl.load(rows[:, None] + LATENT + dr[None, :], mask=t_ok[:, None] & r_ok[None, :], other=0.0)
        scores = dot(q_nope, tl.trans(c_kv), tl.zeros((BLOCK_H, BLOCK_N), dtype=tl.float32), INTERPRETED, PRECISION)
        scores = dot(q_rope, tl.trans(k_pe), scores, INTERPRETED, PRECISION)
        scores = tl.where(t_ok[None, :], scores * qk_scale, float("-inf"))
        m_new = tl.maximum(m, tl.max(scores, axis=1))
        alpha = tl.exp2(m - m_new)
        p = tl.exp2(scores - m_new[:, None])
        denom = denom * alpha + tl.sum(p, axis=1)
        # The latent rows just loaded as keys are also the values (MQA in latent space): one read serves both.
        acc = dot(p.to(kv_dtype), c_kv, acc * alpha[:, None], INTERPRETED, PRECISION)
        m = m_new

    out_ptrs = out_ptr + b * stride_ob + heads[:, None] * stride_oh + split * stride_os + dl[None, :]
    out_mask = h_ok[:, None] & l_ok[None, :]
    has_tokens = denom > 0
    if FINAL:
        tl.store(
            out_ptrs, (acc / tl.where(has_tokens, denom, 1.0)[:, None]).to(out_ptr.dtype.element_ty), mask=out_mask
        )
    else:
        tl.store(out_ptrs, acc / tl.where(has_tokens, denom, 1.0)[:, None], mask=out_mask)
        lse = tl.where(has_tokens, m + tl.log2(tl.where(has_tokens, denom, 1.0)), float("-inf"))
        tl.store(lse_ptr + b * stride_lb + heads * stride_lh + split, lse, mask=h_ok)


@triton.jit
def _merge_kernel(
    part_ptr,
    lse_ptr,
    out_ptr,
    num_splits,
    stride_pb,
    stride_ph,
    stride_ps,
    stride_lb,
    stride_lh,
    stride_ob,
    stride_oh,
    LATENT: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_L: tl.constexpr,
):
    """out = sum_s exp2(lse_s) * part_s / sum_s exp2(lse_s) for one (head, sequence)."""
    head, b = tl.program_id(0), tl.program_id(1)
    s = tl.arange(0, BLOCK_S)
    dl = tl.arange(0, BLOCK_L)
    s_ok = s < num_splits
    lse = tl.load(lse_ptr + b * stride_lb + head * stride_lh + s, mask=s_ok, other=float("-inf"))
    # Split 0 has tokens unless the sequence is empty; then every weight is 0 and so is the output.
    top = tl.max(lse, axis=0)
    weights = tl.exp2(lse - tl.where(top == float("-inf"), 0.0, top))
    parts_ptrs = part_ptr + b * stride_pb + head * stride_ph + s[:, None] * stride_ps + dl[None, :]
    parts = tl.load(parts_ptrs, mask=s_ok[:, None] & (dl < LATENT)[None, :], other=0.0)
    total = tl.sum(weights, axis=0)
    out = tl.sum(parts * weights[:, None], axis=0) / tl.where(total > 0, total, 1.0)
    tl.store(out_ptr + b * stride_ob + head * stride_oh + dl, out.to(out_ptr.dtype.element_ty), mask=dl < LATENT)


def _num_splits(batch: int, head_blocks: int, max_len: int, device: torch.device, min_split: int = 256) -> int:
    """Enough (head block, split, sequence) programs to give every SM two, with splits of at least `min_split` tokens
    so the merge stays small; from the block table's width rather than seq_lens, which would need a host sync."""
    cores = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else os.cpu_count()
    return max(1, min(triton.cdiv(2 * cores, batch * head_blocks), triton.cdiv(max_len, min_split)))


def mla_decode_triton(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    sm_scale: float,
    kv_lora_rank: int,
    out: torch.Tensor | None = None,
    num_splits: int | None = None,
    *,
    block_n: int = 32,
    num_stages: int = 2,
    num_warps: int | None = None,
    min_split: int = 256,
) -> torch.Tensor:
    """mla_decode_reference's math in Triton, split along the KV length and merged by log-sum-exp.

    Dots run in the cache's dtype (q is cast to it), accumulation and softmax in fp32. Never syncs with the host.
    `block_n` (tokens per step), `num_stages`, `num_warps` and `min_split` (fewest tokens per split) are the launch
    shape; the defaults are the tuned ones.
    """
    q, block_table = q.contiguous(), block_table.contiguous()
    batch, heads, dim = q.shape
    page_size = kv_cache.shape[1]
    rope = dim - kv_lora_rank
    if kv_cache.shape[-1] != dim or kv_cache.stride(-1) != 1 or kv_cache.stride(0) != page_size * kv_cache.stride(1):
        raise ValueError(f"kv_cache must be [blocks, block_size, {dim}], rows contiguous; got {tuple(kv_cache.shape)}")
    if out is None:
        out = q.new_empty(batch, heads, kv_lora_rank)
    check_launch(_split_kernel, q, kv_cache, block_table, seq_lens, out)
    # All of K2's 64 heads in one program (16 at least: tl.dot's smallest side), so each cached token is read once
    # from HBM; its [64, 576] q and 2 stages of [32, 576] latent tiles fit in shared memory (144 KiB), the 64 x 512
    # fp32 accumulator in 8 warps' registers, and the dots run as wgmma. Grid (head block, split, sequence): with
    # fewer heads per program the head blocks vary fastest, so programs reading the same tokens run together and
    # share them in L2. fp32 caches take 16 heads, their tiles needing twice the shared memory.
    block_h = min(64 if kv_cache.element_size() <= 2 else 16, max(16, triton.next_power_of_2(heads)))
    head_blocks = triton.cdiv(heads, block_h)
    if num_splits is None:
        num_splits = _num_splits(batch, head_blocks, block_table.shape[1] * page_size, q.device, min_split)
    final = num_splits == 1
    partial = out if final else q.new_empty(batch, heads, num_splits, kv_lora_rank, dtype=torch.float32)
    lse = q.new_empty(batch, heads, num_splits, dtype=torch.float32)
    _split_kernel[(head_blocks, num_splits, batch)](
        q,
        kv_cache,
        block_table,
        seq_lens,
        partial,
        lse,
        heads,
        num_splits,
        sm_scale * math.log2(math.e),
        q.stride(0),
        q.stride(1),
        kv_cache.stride(1),
        block_table.stride(0),
        partial.stride(0),
        partial.stride(1),
        0 if final else partial.stride(2),
        lse.stride(0),
        lse.stride(1),
        PAGE_SIZE=page_size,
        LATENT=kv_lora_rank,
        ROPE=rope,
        BLOCK_H=block_h,
        BLOCK_N=block_n,
        BLOCK_L=triton.next_power_of_2(kv_lora_rank),
        BLOCK_R=max(16, triton.next_power_of_2(rope)),
        FINAL=final,
        INTERPRETED=interpreted(_split_kernel),
        PRECISION=dot_precision(kv_cache.dtype),
        num_warps=num_warps or (8 if block_h == 64 else 4),
        num_stages=num_stages,
    )
    if not final:
        _merge_kernel[(heads, batch)](
            partial,
            lse,
            out,
            num_splits,
            partial.stride(0),
            partial.stride(1),
            partial.stride(2),
            lse.stride(0),
            lse.stride(1),
            out.stride(0),
            out.stride(1),
            LATENT=kv_lora_rank,
            BLOCK_S=triton.next_power_of_2(num_splits),
            BLOCK_L=triton.next_power_of_2(kv_lora_rank),
        )
    return out


def mla_decode(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    sm_scale: float,
    kv_lora_rank: int,
) -> torch.Tensor:
    """MLA decode: the Triton kernel on CUDA, the torch reference elsewhere."""
    if q.is_cuda:
        return mla_decode_triton(q, kv_cache, block_table, seq_lens, sm_scale, kv_lora_rank)
    return mla_decode_reference(q, kv_cache, block_table, seq_lens, sm_scale, kv_lora_rank)
