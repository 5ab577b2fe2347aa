"""INT4 (W4A16) mixture-of-experts: the packed layout of K2 Thinking, a fused Triton kernel, its torch reference.

Layout (compressed-tensors `pack-quantized`, symmetric, group 32), per linear [out, in]:
  packed  int32 [out, in // 8]   nibble j of word w holds input column 8*w + j at bits 4j..4j+3,
                                 stored as q + 8 (q in [-8, 7])
  scale   bf16  [out, in // 32]  one scale per 32 consecutive inputs
  weight = (nibble - 8) * scale
Stacked experts add a leading [E] dimension to both.

The Triton path reads this layout as stored, without a repack: a weight tile of BLOCK_N rows already reads BLOCK_K // 8
contiguous words per row (64 bytes at decode's BLOCK_K of 128) plus BLOCK_K // 32 scales, unpacked and scaled in
registers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from k2batch.kernels.interpreter import check_launch, dot, dot_precision, interpreted

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


def fused_moe_grouped_reference(
    x: torch.Tensor,
    w13: ExpertWeights,
    w2: ExpertWeights,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    experts_per_chunk: int = 32,
) -> torch.Tensor:
    """fused_moe_reference's math the way a torch-only MoE runs it, the kernels' baseline: dequantize every expert
    that got tokens to x's dtype, then one grouped matmul per projection over the assignments sorted by expert.

    Dequantization goes `experts_per_chunk` experts at a time (unpacking 384 of K2's experts at once would need
    tens of GB of int32 temporaries). Expert groups are padded to 16 rows, the alignment grouped GEMMs need.
    """
    top_k = topk_ids.shape[1]
    flat = topk_ids.flatten()
    used, counts = torch.unique(flat, return_counts=True)
    order = torch.argsort(flat, stable=True)
    padded = (counts + 15) // 16 * 16
    ends = padded.cumsum(0)
    # Row r of the padded, expert-sorted assignments holds assignment order[...] or nothing (padding).
    starts = ends - padded
    rank = torch.arange(flat.numel(), device=x.device) - (counts.cumsum(0) - counts).repeat_interleave(counts)
    rows = starts.repeat_interleave(counts) + rank
    assignment = torch.full((int(ends[-1]),), -1, dtype=torch.long, device=x.device)
    assignment[rows] = order
    real = assignment >= 0
    a = torch.zeros(assignment.numel(), x.shape[1], dtype=x.dtype, device=x.device)
    a[real] = x[assignment[real] // top_k]

    def dense(w: ExpertWeights) -> torch.Tensor:
        if not isinstance(w, Int4Weight):
            return w[used].to(x.dtype)
        out = torch.empty(used.numel(), w.out_features, w.in_features, dtype=x.dtype, device=x.device)
        for i in range(0, used.numel(), experts_per_chunk):
            chunk = used[i : i + experts_per_chunk]
            out[i : i + chunk.numel()] = unpack_int4(w.packed[chunk], w.scale[chunk], x.dtype)
        return out

    offs = ends.to(torch.int32)
    gate, up = _grouped_mm(a, dense(w13).transpose(-2, -1), offs).chunk(2, dim=-1)
    y = _grouped_mm(F.silu(gate) * up, dense(w2).transpose(-2, -1), offs)
    weights = topk_weights.flatten()[assignment[real]].unsqueeze(-1)
    out = torch.zeros_like(x)
    out.index_add_(0, assignment[real] // top_k, (y[real] * weights).to(x.dtype))
    return out


def _grouped_mm(a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """a [rows, K] (groups end at offs) times b [groups, K, N]: torch's grouped GEMM where it runs (CPU, and bf16
    on Hopper or newer), else one matmul per group."""
    if hasattr(torch, "_grouped_mm") and (
        not a.is_cuda or (a.dtype == torch.bfloat16 and torch.cuda.get_device_capability(a.device)[0] >= 9)
    ):
        return torch._grouped_mm(a, b, offs=offs)
    out = a.new_empty(a.shape[0], b.shape[-1])
    start = 0
    for group, end in enumerate(offs.tolist()):
        out[start:end] = a[start:end] @ b[group]
        start = end
    return out


@dataclass(frozen=True)
class ExpertBlocks:
    """Token-to-expert alignment: assignment ids (token * top_k + slot) grouped by expert, each group padded to
    whole blocks of `block_m` rows so that a GEMM tile never mixes experts."""

    sorted_ids: torch.Tensor  # int32 [max_blocks * block_m]; slots past an expert's count are never read
    block_expert: torch.Tensor  # int32 [max_blocks]: the expert of each block, -1 past the last used one
    expert_end: torch.Tensor  # int32 [E]: where each expert's real rows end in sorted_ids
    block_m: int
    top_k: int


@triton.jit
def _count_kernel(ids_ptr, counts_ptr, numel, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < numel
    tl.atomic_add(counts_ptr + tl.load(ids_ptr + offs, mask=ok, other=0), 1, mask=ok, sem="relaxed")


@triton.jit
def _layout_kernel(
    counts_ptr,
    cursor_ptr,
    expert_end_ptr,
    block_expert_ptr,
    num_experts,
    max_blocks,
    BLOCK_M: tl.constexpr,
    EXPERTS: tl.constexpr,
    BLOCKS: tl.constexpr,
):
    e = tl.arange(0, EXPERTS)
    e_ok = e < num_experts
    counts = tl.load(counts_ptr + e, mask=e_ok, other=0)
    padded = (counts + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    ends = tl.cumsum(padded, axis=0)
    starts = ends - padded
    tl.store(cursor_ptr + e, starts, mask=e_ok)
    tl.store(expert_end_ptr + e, starts + counts, mask=e_ok)
    total = tl.sum(padded, axis=0)
    for first in range(0, max_blocks, BLOCKS):
        b = first + tl.arange(0, BLOCKS)
        row = b * BLOCK_M
        # A block's expert is the number of padded runs ending at or before its first row.
        expert = tl.sum((ends[None, :] <= row[:, None]).to(tl.int32), axis=1)
        tl.store(block_expert_ptr + b, tl.where(row < total, expert, -1), mask=b < max_blocks)


@triton.jit
def _scatter_kernel(ids_ptr, cursor_ptr, sorted_ids_ptr, numel, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < numel
    # The order within an expert's run varies between runs; each row's result does not depend on it.
    slot = tl.atomic_add(cursor_ptr + tl.load(ids_ptr + offs, mask=ok, other=0), 1, mask=ok, sem="relaxed")
    tl.store(sorted_ids_ptr + slot, offs, mask=ok)


def align_tokens_to_experts(topk_ids: torch.Tensor, num_experts: int, block_m: int) -> ExpertBlocks:
    """Group the (token, slot) assignments of `topk_ids` [M, top_k] (ids in [0, num_experts)) by expert."""
    ids = topk_ids.contiguous().view(-1)
    numel = ids.numel()
    # Each expert with tokens pads at most one partial block: a bound that needs no host sync on the counts.
    max_blocks = triton.cdiv(numel, block_m) + min(numel, num_experts)
    counts = torch.zeros(num_experts, dtype=torch.int32, device=ids.device)
    cursor = torch.empty_like(counts)
    blocks = ExpertBlocks(
        sorted_ids=torch.empty(max_blocks * block_m, dtype=torch.int32, device=ids.device),
        block_expert=torch.empty(max_blocks, dtype=torch.int32, device=ids.device),
        expert_end=torch.empty_like(counts),
        block_m=block_m,
        top_k=topk_ids.shape[1],
    )
    check_launch(_count_kernel, ids)
    # Counting and scattering are one thread per assignment over 1024-wide programs; the prefix sum over experts
    # and the block map are one program, as they are a few hundred elements.
    grid = (triton.cdiv(numel, 1024),)
    _count_kernel[grid](ids, counts, numel, BLOCK=1024)
    _layout_kernel[(1,)](
        counts,
        cursor,
        blocks.expert_end,
        blocks.block_expert,
        num_experts,
        max_blocks,
        BLOCK_M=block_m,
        EXPERTS=triton.next_power_of_2(num_experts),
        BLOCKS=64,
    )
    _scatter_kernel[grid](ids, cursor, blocks.sorted_ids, numel, BLOCK=1024)
    return blocks


@triton.jit
def _round_to_bf16(x):
    """Round fp32 to the nearest-even bf16 value (kept in fp32): the interpreter's fp32->bf16 cast truncates."""
    bits = x.to(tl.uint32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _dequantize(words, scales, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, INTERPRETED: tl.constexpr):
    """[BLOCK_N, BLOCK_K // 8] int32 words, [BLOCK_N, BLOCK_K // 32] scales -> [BLOCK_N, BLOCK_K] weights, rounded
    in the scale's dtype as unpack_int4 does."""
    nibbles = (words[:, :, None] >> (tl.arange(0, 8) * 4)[None, None, :]) & 0xF
    q = tl.reshape(nibbles - 8, (BLOCK_N, BLOCK_K // 32, 32)).to(tl.float32)
    w = q * scales.to(tl.float32)[:, :, None]  # exact for 16-bit scales: 4 bits times 11 at most
    if INTERPRETED and scales.dtype == tl.bfloat16:
        w = _round_to_bf16(w)
    else:
        w = w.to(scales.dtype)
    return tl.reshape(w, (BLOCK_N, BLOCK_K))


@triton.jit
def _expert_gemm_kernel(
    a_ptr,
    packed_ptr,
    scale_ptr,
    out_ptr,
    router_weight_ptr,
    sorted_ids_ptr,
    block_expert_ptr,
    expert_end_ptr,
    N,
    K,
    max_blocks,
    stride_packed_e,
    stride_packed_n,
    stride_scale_e,
    stride_scale_n,
    GATE_UP: tl.constexpr,
    A_ROW_DIV: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    INTERPRETED: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """One [BLOCK_M assignments x BLOCK_N outputs] tile of one expert's INT4 GEMM.

    GATE_UP: out[id, n] = silu(gate_n . a[id // top_k]) * (up_n . a[id // top_k]), up rows N below the gate rows;
    else:    out[id, n] = router_weight[id] * (w_n . a[id]).
    """
    # Grouped ordering (Triton matmul tutorial): programs running together share token blocks and weight tiles in L2.
    pid = tl.program_id(0)
    per_group = GROUP_M * tl.cdiv(N, BLOCK_N)
    first_m = pid // per_group * GROUP_M
    group_m = tl.minimum(max_blocks - first_m, GROUP_M)
    pid_m = first_m + pid % per_group % group_m
    pid_n = pid % per_group // group_m

    expert = tl.load(block_expert_ptr + pid_m)
    if expert < 0:
        return
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < tl.load(expert_end_ptr + expert)
    ids = tl.load(sorted_ids_ptr + rows, mask=row_ok, other=0).to(tl.int64)
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = n < N
    k = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + (ids // A_ROW_DIV)[:, None] * K + k[None, :]
    packed_ptrs = (
        packed_ptr
        + expert.to(tl.int64) * stride_packed_e
        + n[:, None] * stride_packed_n
        + tl.arange(0, BLOCK_K // 8)[None, :]
    )
    scale_ptrs = (
        scale_ptr
        + expert.to(tl.int64) * stride_scale_e
        + n[:, None] * stride_scale_n
        + tl.arange(0, BLOCK_K // 32)[None, :]
    )
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for _ in range(0, K, BLOCK_K):
        a = tl.load(a_ptrs, mask=row_ok[:, None], other=0.0)
        words = tl.load(packed_ptrs, mask=n_ok[:, None], other=0)
        scales = tl.load(scale_ptrs, mask=n_ok[:, None], other=0.0)
        w = _dequantize(words, scales, BLOCK_N, BLOCK_K, INTERPRETED).to(a.dtype)
        acc = dot(a, tl.trans(w), acc, INTERPRETED, PRECISION)
        if GATE_UP:
            words = tl.load(packed_ptrs + N * stride_packed_n, mask=n_ok[:, None], other=0)
            scales = tl.load(scale_ptrs + N * stride_scale_n, mask=n_ok[:, None], other=0.0)
            w = _dequantize(words, scales, BLOCK_N, BLOCK_K, INTERPRETED).to(a.dtype)
            acc_up = dot(a, tl.trans(w), acc_up, INTERPRETED, PRECISION)
        a_ptrs += BLOCK_K
        packed_ptrs += BLOCK_K // 8
        scale_ptrs += BLOCK_K // 32
    if GATE_UP:
        out = acc / (1.0 + tl.exp(-acc)) * acc_up
    else:
        out = acc * tl.load(router_weight_ptr + ids, mask=row_ok, other=0.0)[:, None]
    out_ptrs = out_ptr + ids[:, None] * N + n[None, :]
    tl.store(out_ptrs, out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & n_ok[None, :])


def _block_m(num_assignments: int, num_experts: int) -> int:
    """Token rows per tile: the mean tokens per expert, from 16 (the smallest tl.dot side) to 128."""
    return min(128, max(16, triton.next_power_of_2(triton.cdiv(num_assignments, num_experts))))


@dataclass(frozen=True)
class GemmConfig:
    """Launch shape of one expert GEMM: output columns and inputs per step of a tile, warps, pipeline depth."""

    block_n: int
    block_k: int
    num_warps: int
    num_stages: int


def default_config(block_m: int, gate_up: bool) -> GemmConfig:
    """Decode (block_m <= 32: a few tokens per expert) streams weights: 64-row tiles give enough programs to cover
    the SMs at batch 1, and 4 stages of 128-input steps keep loads in flight. Prefill is compute-bound: 128-token
    tiles reuse each dequantized weight tile across more tokens; gate/up keeps two accumulators, hence 64 rows
    against 128 for down."""
    if block_m <= 32:
        return GemmConfig(64, 128, 4, 4)
    return GemmConfig(64 if gate_up else 128, 64, 8, 3)


def _expert_gemm(
    a: torch.Tensor,
    w: Int4Weight,
    blocks: ExpertBlocks,
    out: torch.Tensor,
    gate_up: bool,
    router_weights: torch.Tensor | None,
    config: GemmConfig | None = None,
) -> torch.Tensor:
    n = w.out_features // 2 if gate_up else w.out_features
    k = w.in_features
    check_launch(_expert_gemm_kernel, a, w.packed, w.scale, out, blocks.sorted_ids)
    config = config or default_config(blocks.block_m, gate_up)
    block_k = config.block_k
    while k % block_k:  # the largest power of two dividing K, at most the configured step
        block_k //= 2
    max_blocks = blocks.block_expert.numel()
    grid = (max_blocks * triton.cdiv(n, config.block_n),)
    _expert_gemm_kernel[grid](
        a,
        w.packed,
        w.scale,
        out,
        out if router_weights is None else router_weights,
        blocks.sorted_ids,
        blocks.block_expert,
        blocks.expert_end,
        n,
        k,
        max_blocks,
        w.packed.stride(0),
        w.packed.stride(1),
        w.scale.stride(0),
        w.scale.stride(1),
        GATE_UP=gate_up,
        A_ROW_DIV=blocks.top_k if gate_up else 1,
        BLOCK_M=blocks.block_m,
        BLOCK_N=config.block_n,
        BLOCK_K=block_k,
        GROUP_M=8,
        INTERPRETED=interpreted(_expert_gemm_kernel),
        PRECISION=dot_precision(a.dtype),
        num_warps=config.num_warps,
        num_stages=config.num_stages,
    )
    return out


def _check_packed(w: Int4Weight, name: str) -> None:
    if w.packed.stride(-1) != 1 or w.scale.stride(-1) != 1:
        raise ValueError(f"{name}: packed words and scales must be contiguous along the input dimension")


def expert_gate_up(
    x: torch.Tensor,
    w13: Int4Weight,
    blocks: ExpertBlocks,
    out: torch.Tensor | None = None,
    config: GemmConfig | None = None,
) -> torch.Tensor:
    """silu(gate_e(x_t)) * up_e(x_t) for every assignment (t, e), at row t * top_k + slot of `out` [M * top_k, I]."""
    _check_packed(w13, "w13")
    x = x.contiguous()
    if out is None:
        out = x.new_empty(x.shape[0] * blocks.top_k, w13.out_features // 2)
    return _expert_gemm(x, w13, blocks, out, gate_up=True, router_weights=None, config=config)


def expert_down(
    h: torch.Tensor,
    w2: Int4Weight,
    topk_weights: torch.Tensor,
    blocks: ExpertBlocks,
    out: torch.Tensor | None = None,
    config: GemmConfig | None = None,
) -> torch.Tensor:
    """topk_weights[t, slot] * down_e(h[row]) for every assignment row of `h` [M * top_k, I]: `out` [M * top_k, H]."""
    _check_packed(w2, "w2")
    h = h.contiguous()
    if out is None:
        out = h.new_empty(h.shape[0], w2.out_features)
    router_weights = topk_weights.reshape(-1).float().contiguous()
    return _expert_gemm(h, w2, blocks, out, gate_up=False, router_weights=router_weights, config=config)


def fused_moe_triton(
    x: torch.Tensor,
    w13: Int4Weight,
    w2: Int4Weight,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    out: torch.Tensor | None = None,
    block_m: int | None = None,
    configs: tuple[GemmConfig, GemmConfig] | None = None,
) -> torch.Tensor:
    """fused_moe_reference's math in Triton: align to experts, gate/up GEMM with SiLU-and-multiply, down GEMM
    with the router weight, then the top-k sum. Never syncs with the host, so it can sit in a CUDA graph.
    `block_m` and `configs` (gate/up, down) override the launch shapes picked from the token count."""
    num_tokens, hidden = x.shape
    num_experts, top_k = w13.packed.shape[0], topk_ids.shape[1]
    inter = w2.in_features
    if w13.in_features != hidden or w13.out_features != 2 * inter or w2.out_features != hidden:
        raise ValueError(
            f"expert weights do not match x [{num_tokens}, {hidden}]: w13 is [{num_experts}, {w13.out_features}, "
            f"{w13.in_features}], w2 is [{w2.packed.shape[0]}, {w2.out_features}, {w2.in_features}]; "
            f"want [E, 2 * I, {hidden}] and [E, {hidden}, I]"
        )
    if num_tokens == 0:
        return x.new_zeros(0, hidden) if out is None else out
    block_m = block_m or _block_m(topk_ids.numel(), num_experts)
    blocks = align_tokens_to_experts(topk_ids, num_experts, block_m)
    gate_up_config, down_config = configs or (None, None)
    h = expert_gate_up(x, w13, blocks, config=gate_up_config)
    y = expert_down(h, w2, topk_weights, blocks, config=down_config)
    return torch.sum(y.view(num_tokens, top_k, hidden), dim=1, out=out)


def fused_moe(
    x: torch.Tensor,
    w13: ExpertWeights,
    w2: ExpertWeights,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
) -> torch.Tensor:
    """The routed-experts MoE: Triton on CUDA for packed weights, the torch reference elsewhere."""
    if x.is_cuda and isinstance(w13, Int4Weight) and isinstance(w2, Int4Weight):
        return fused_moe_triton(x, w13, w2, topk_weights, topk_ids)
    return fused_moe_reference(x, w13, w2, topk_weights, topk_ids)
