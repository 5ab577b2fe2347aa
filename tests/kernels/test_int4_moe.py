"""The fused INT4 MoE kernels against the torch reference, and the token-to-expert alignment they rely on."""

import pytest
import torch

from k2batch.kernels.int4_moe import (
    Int4Weight,
    align_tokens_to_experts,
    expert_down,
    expert_gate_up,
    fused_moe,
    fused_moe_grouped_reference,
    fused_moe_reference,
    fused_moe_triton,
    pack_int4,
    quantize_int4,
)

# Max |kernel - reference| over max |reference|, the reference in fp32 on the same inputs. bf16: 8-bit mantissas
# for x, the gate/up activations and the per-expert outputs (and the interpreter truncates rather than rounds).
TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def packed_experts(experts: int, out_features: int, in_features: int, device="cpu") -> Int4Weight:
    q, scale = quantize_int4(torch.randn(experts, out_features, in_features) * in_features**-0.5)
    return Int4Weight(pack_int4(q).to(device), scale.to(device))


def routing(tokens: int, experts: int, top_k: int, unused: set[int]):
    """Distinct random experts per token, never those in `unused`; positive router weights."""
    scores = torch.rand(tokens, experts)
    scores[:, list(unused)] = -1.0
    return torch.rand(tokens, top_k) + 0.1, scores.topk(top_k, dim=1).indices


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.float() - ref.float()).abs().max() / ref.float().abs().max()).item()


@pytest.mark.parametrize("tokens", [1, 5, 37])
def test_alignment_places_every_assignment_once_in_its_experts_blocks(tokens):
    experts, top_k, block_m = 16, 3, 16
    _, topk_ids = routing(tokens, experts, top_k, unused={0, 7, 15})
    blocks = align_tokens_to_experts(topk_ids, experts, block_m)
    flat = topk_ids.flatten()
    counts = torch.bincount(flat, minlength=experts)
    seen = []
    for b, expert in enumerate(blocks.block_expert.tolist()):
        if expert < 0:
            assert all(e < 0 for e in blocks.block_expert[b:].tolist())  # only trailing blocks are unused
            break
        rows = range(b * block_m, min((b + 1) * block_m, int(blocks.expert_end[expert])))
        ids = blocks.sorted_ids[list(rows)].long()
        assert (flat[ids] == expert).all()
        seen.append(ids)
    seen = torch.cat(seen)
    assert sorted(seen.tolist()) == list(range(flat.numel()))
    used_blocks = int((blocks.block_expert >= 0).sum())
    assert used_blocks == int(((counts + block_m - 1) // block_m).sum())
    assert (blocks.expert_end[counts == 0] % block_m == 0).all()  # an empty expert has an empty, aligned run


@pytest.mark.parametrize(
    ("tokens", "experts", "top_k", "hidden", "inter", "dtype"),
    [
        (1, 8, 2, 64, 32, torch.float32),  # decode, one token
        (1, 8, 2, 64, 32, torch.bfloat16),
        (37, 8, 3, 128, 64, torch.bfloat16),  # rows not a multiple of the 16-row block
        (37, 8, 3, 96, 64, torch.float16),  # hidden 96: 32-input steps
        (300, 4, 2, 64, 64, torch.float32),  # 150 rows per expert: 128-row prefill tiles, N not a tile multiple
        (300, 4, 2, 64, 64, torch.bfloat16),
    ],
)
def test_fused_moe_triton_matches_reference(tokens, experts, top_k, hidden, inter, dtype):
    torch.manual_seed(tokens + experts + hidden)
    w13, w2 = packed_experts(experts, 2 * inter, hidden), packed_experts(experts, hidden, inter)
    x = torch.randn(tokens, hidden).to(dtype)
    topk_weights, topk_ids = routing(tokens, experts, top_k, unused={experts - 1} if experts > top_k + 1 else set())
    out = torch.full((tokens, hidden), float("nan"), dtype=dtype)
    result = fused_moe_triton(x, w13, w2, topk_weights, topk_ids, out=out)
    ref = fused_moe_reference(x.float(), w13, w2, topk_weights, topk_ids)
    assert result.data_ptr() == out.data_ptr()
    assert out.isfinite().all()
    assert rel_err(out, ref) < TOLERANCE[dtype]


@pytest.mark.parametrize(("tokens", "dtype"), [(1, torch.float32), (37, torch.float32), (37, torch.bfloat16)])
def test_grouped_baseline_matches_reference(tokens, dtype):
    # The benchmark's torch baseline (dequantize, then grouped matmuls) computes the same MoE.
    torch.manual_seed(tokens)
    w13, w2 = packed_experts(8, 64, 32), packed_experts(8, 32, 32)
    topk_weights, topk_ids = routing(tokens, 8, 3, unused={4})
    x = torch.randn(tokens, 32).to(dtype)
    out = fused_moe_grouped_reference(x, w13, w2, topk_weights.to(dtype), topk_ids, experts_per_chunk=3)
    ref = fused_moe_reference(x.float(), w13, w2, topk_weights, topk_ids)
    assert rel_err(out, ref) < TOLERANCE[dtype]


def test_gemm_stages_write_every_assignment_row():
    tokens, experts, top_k, hidden, inter = 21, 8, 2, 64, 32
    torch.manual_seed(1)
    w13, w2 = packed_experts(experts, 2 * inter, hidden), packed_experts(experts, hidden, inter)
    x = torch.randn(tokens, hidden)
    topk_weights, topk_ids = routing(tokens, experts, top_k, unused={2, 3})
    blocks = align_tokens_to_experts(topk_ids, experts, block_m=16)
    h = expert_gate_up(x, w13, blocks, out=torch.full((tokens * top_k, inter), float("nan")))
    y = expert_down(h, w2, topk_weights, blocks, out=torch.full((tokens * top_k, hidden), float("nan")))
    assert h.isfinite().all() and y.isfinite().all()
    for row, expert in enumerate(topk_ids.flatten().tolist()):
        gate, up = (x[row // top_k] @ w13[expert].dequantize(torch.float32).T).chunk(2)
        expected_h = torch.nn.functional.silu(gate) * up
        torch.testing.assert_close(h[row], expected_h, rtol=1e-5, atol=1e-5)
        expected_y = topk_weights.flatten()[row] * (h[row] @ w2[expert].dequantize(torch.float32).T)
        torch.testing.assert_close(y[row], expected_y, rtol=1e-5, atol=1e-5)


def test_fused_moe_rejects_mismatched_weights():
    w13, w2 = packed_experts(4, 64, 64), packed_experts(4, 64, 32)
    topk_weights, topk_ids = routing(2, 4, 2, unused=set())
    with pytest.raises(ValueError, match="want \\[E, 2 \\* I, 96\\]"):
        fused_moe_triton(torch.randn(2, 96), w13, w2, topk_weights, topk_ids)


def test_fused_moe_on_cpu_is_the_reference():
    torch.manual_seed(2)
    w13, w2 = packed_experts(4, 64, 64), packed_experts(4, 64, 32)
    x = torch.randn(3, 64)
    topk_weights, topk_ids = routing(3, 4, 2, unused=set())
    out = fused_moe(x, w13, w2, topk_weights, topk_ids)
    assert torch.equal(out, fused_moe_reference(x, w13, w2, topk_weights, topk_ids))


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("tokens", [1, 7, 512, 3000])
def test_fused_moe_on_cuda_matches_reference(tokens):
    experts, top_k, hidden, inter = 64, 8, 1024, 256
    torch.manual_seed(tokens)
    w13, w2 = packed_experts(experts, 2 * inter, hidden, "cuda"), packed_experts(experts, hidden, inter, "cuda")
    x = torch.randn(tokens, hidden, device="cuda", dtype=torch.bfloat16)
    topk_weights, topk_ids = (t.cuda() for t in routing(tokens, experts, top_k, unused={5}))
    out = fused_moe(x, w13, w2, topk_weights, topk_ids)
    ref = fused_moe_reference(x.float(), w13, w2, topk_weights, topk_ids)
    assert rel_err(out, ref) < TOLERANCE[torch.bfloat16]
