"""The split-KV MLA decode kernel against the torch reference over paged latent caches."""

import pytest
import torch

from k2batch.kernels.mla_decode import mla_decode, mla_decode_reference, mla_decode_triton

# Max |kernel - reference| over max |reference|, the reference in fp32 on the same inputs; bf16 and fp16 round the
# softmax probabilities to the cache dtype for the value dot (bf16: and the interpreter truncates).
TOLERANCE = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1.5e-2}
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def paged_inputs(seq_lens, heads, latent, rope, page_size, dtype, device="cpu"):
    """A shuffled paged cache holding every sequence's tokens, tables padded with unused page 0 entries."""
    pages = [-(-n // page_size) for n in seq_lens]
    width = max(pages) + 1
    order = torch.randperm(sum(pages)) + 1
    table = torch.zeros(len(seq_lens), width, dtype=torch.int32)
    start = 0
    for b, n in enumerate(pages):
        table[b, :n] = order[start : start + n]
        start += n
    kv_cache = torch.randn(sum(pages) + 1, page_size, latent + rope).to(dtype)
    q = torch.randn(len(seq_lens), heads, latent + rope).to(dtype)
    lens = torch.tensor(seq_lens, dtype=torch.int32)
    return q.to(device), kv_cache.to(device), table.to(device), lens.to(device)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.float() - ref.float()).abs().max() / ref.float().abs().max()).item()


@pytest.mark.parametrize(
    ("seq_lens", "heads", "latent", "rope", "page_size", "dtype", "num_splits"),
    [
        ([1], 4, 64, 16, 16, torch.float32, 1),  # one cached token, heads fewer than a head block
        ([70, 5, 33], 20, 64, 16, 16, torch.float32, 3),  # heads not a block multiple; split 1+ of seq 5 is empty
        ([70, 5, 33], 20, 64, 16, 16, torch.bfloat16, 3),
        ([100, 7], 64, 512, 64, 16, torch.bfloat16, 2),  # K2's 64 heads and 512 + 64 latent
        ([40, 9], 16, 32, 8, 5, torch.float16, None),  # page size 5 (chunks straddle pages), default splits
        ([130], 16, 32, 8, 1, torch.float32, 5),  # page size 1, more splits than 32-token chunks
    ],
)
def test_mla_decode_triton_matches_reference(seq_lens, heads, latent, rope, page_size, dtype, num_splits):
    torch.manual_seed(sum(seq_lens) + heads)
    q, kv_cache, table, lens = paged_inputs(seq_lens, heads, latent, rope, page_size, dtype)
    sm_scale = (latent + rope) ** -0.5
    out = torch.full((len(seq_lens), heads, latent), float("nan"), dtype=dtype)
    result = mla_decode_triton(q, kv_cache, table, lens, sm_scale, latent, out=out, num_splits=num_splits)
    ref = mla_decode_reference(q.float(), kv_cache.float(), table, lens, sm_scale, latent)
    assert result.data_ptr() == out.data_ptr()
    assert out.isfinite().all()
    assert rel_err(out, ref) < TOLERANCE[dtype]


@pytest.mark.parametrize("num_splits", [1, 3])
def test_empty_sequences_get_zeros(num_splits):
    # A fixed-size decode batch pads its free slots with empty sequences: they must not poison the others.
    torch.manual_seed(5)
    q, kv_cache, table, lens = paged_inputs([40, 1, 17], 16, 32, 8, 16, torch.float32)
    lens[1] = 0
    out = torch.full((3, 16, 32), float("nan"))
    mla_decode_triton(q, kv_cache, table, lens, 0.2, 32, out=out, num_splits=num_splits)
    ref = mla_decode_reference(q, kv_cache, table, lens, 0.2, 32)
    assert torch.equal(out[1], torch.zeros(16, 32)) and torch.equal(ref[1], torch.zeros(16, 32))
    assert rel_err(out, ref) < TOLERANCE[torch.float32]


def test_split_count_does_not_change_the_result():
    torch.manual_seed(3)
    q, kv_cache, table, lens = paged_inputs([150, 64], 16, 32, 8, 16, torch.float32)
    outs = [mla_decode_triton(q, kv_cache, table, lens, 0.1, 32, num_splits=s) for s in (1, 2, 4)]
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(outs[2], outs[0], rtol=1e-5, atol=1e-6)


def test_mla_decode_on_cpu_is_the_reference():
    torch.manual_seed(4)
    q, kv_cache, table, lens = paged_inputs([12, 3], 4, 32, 8, 16, torch.float32)
    out = mla_decode(q, kv_cache, table, lens, 0.2, 32)
    assert torch.equal(out, mla_decode_reference(q, kv_cache, table, lens, 0.2, 32))


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("seq_lens", [[1], [5000, 17, 300], [2048] * 64])
def test_mla_decode_on_cuda_matches_reference(seq_lens):
    torch.manual_seed(len(seq_lens))
    q, kv_cache, table, lens = paged_inputs(seq_lens, 64, 512, 64, 16, torch.bfloat16, "cuda")
    out = mla_decode(q, kv_cache, table, lens, 192**-0.5, 512)
    ref = mla_decode_reference(q.float(), kv_cache.float(), table, lens, 192**-0.5, 512)
    assert rel_err(out, ref) < TOLERANCE[torch.bfloat16]
