"""Block-FP8 checkpoints (K2 Instruct): dequantized in config.json's weight_block_size, edge blocks partial."""

import json

import pytest
import torch

from k2batch.model import CheckpointError, load_model
from k2batch.model.loader import dequantize_fp8_block
from tests.checkpoints import (
    fp8_dequantize,
    fp8_quantize,
    load_weights_into_hf,
    max_logit_diff,
    quantize_fp8,
    random_hf_model,
    save_hf,
)


@pytest.mark.parametrize(
    "shape, block",
    [
        ((40, 56), (16, 16)),  # a small analogue of K2's kv_a_proj_with_mqa: 2.5 x 3.5 blocks
        ((576, 256), (128, 128)),  # K2's kv_a_proj_with_mqa rows in K2's blocks: scale_inv [5, 2]
        ((3, 40, 56), (16, 24)),  # fused experts [E, out, in]
    ],
)
def test_dequantize_partial_edge_blocks(shape, block):
    w = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    q, scale_inv = fp8_quantize(w, block)
    got = dequantize_fp8_block(q, scale_inv, block, "x.weight_scale_inv")
    assert torch.equal(got, fp8_dequantize(q, scale_inv, block))
    assert (got - w).abs().max() <= 0.07 * w.abs().max()  # e4m3 keeps 3 mantissa bits


def test_scale_shape_must_tile_the_weight_in_the_configured_blocks():
    q, scale_inv = fp8_quantize(torch.randn(576, 256), (128, 128))
    with pytest.raises(
        CheckpointError, match=r"kv_a_proj_with_mqa.weight_scale_inv: shape \(5, 2\), expected \(4, 2\)"
    ):
        dequantize_fp8_block(q, scale_inv, (144, 128), "model.layers.0.self_attn.kv_a_proj_with_mqa.weight_scale_inv")


# No dimension of the test model (64, 48, 128, 96, 32) is a multiple of both 24 and 40.
BLOCK = (24, 40)


@pytest.mark.parametrize("fused_experts", [False, True], ids=["per_expert", "fused_experts"])
def test_fp8_checkpoint_with_partial_blocks_matches_transformers(tmp_path, fused_experts):
    hf = random_hf_model()
    path = save_hf(hf, tmp_path, fused_experts=fused_experts)
    oracle = quantize_fp8(path, BLOCK)
    kv_a = "model.layers.0.self_attn.kv_a_proj_with_mqa.weight"
    assert kv_a in oracle and oracle[kv_a].shape == (48, 64)  # 2 x 1.6 blocks
    load_weights_into_hf(hf, oracle)
    assert max_logit_diff(hf, load_model(path)) < 1e-4


def test_fp8_scales_that_do_not_tile_the_configured_blocks_are_an_error(tmp_path):
    path = save_hf(random_hf_model(), tmp_path)
    quantize_fp8(path, BLOCK)
    cfg = json.loads((path / "config.json").read_text())
    cfg["quantization_config"]["weight_block_size"] = [16, 16]
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"weight_scale_inv: shape .* expected .* \[16, 16\] blocks"):
        load_model(path)


def test_fp8_weights_without_fp8_quantization_config_are_an_error(tmp_path):
    path = save_hf(random_hf_model(), tmp_path)
    quantize_fp8(path, BLOCK)
    cfg = json.loads((path / "config.json").read_text())
    del cfg["quantization_config"]
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"proj.weight is FP8 but config.json has no fp8 quantization_config"):
        load_model(path)
