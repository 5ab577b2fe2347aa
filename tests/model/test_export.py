"""A model saved by k2batch loads back with the same logits (INT4 experts: the same quantized values)."""

import torch

from k2batch.kernels.int4_moe import pack_int4, quantize_int4, unpack_int4
from k2batch.model import load_model
from k2batch.model.config import ModelConfig
from k2batch.model.export import random_model, save_checkpoint

CONFIG = ModelConfig.from_dict(
    dict(
        model_type="kimi_k2",
        vocab_size=128,
        hidden_size=64,
        intermediate_size=96,
        moe_intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        q_lora_rank=32,
        kv_lora_rank=32,
        qk_nope_head_dim=16,
        qk_rope_head_dim=16,
        v_head_dim=16,
        n_routed_experts=8,
        n_shared_experts=1,
        num_experts_per_tok=2,
        n_group=2,
        topk_group=1,
        first_k_dense_replace=1,
        routed_scaling_factor=2.827,
        eos_token_id=1,
        rope_theta=50000.0,
        rope_scaling={
            "type": "yarn",
            "factor": 8.0,
            "mscale": 1.0,
            "mscale_all_dim": 1.0,
            "original_max_position_embeddings": 32,
        },
    )
)


def test_dense_round_trip(tmp_path):
    model = random_model(CONFIG)
    loaded = load_model(save_checkpoint(model, tmp_path, int4_experts=False))
    assert loaded.config == CONFIG
    ids = torch.randint(0, 128, (2, 20))
    assert torch.equal(loaded.score(ids), model.score(ids))


def test_int4_round_trip(tmp_path):
    model = random_model(CONFIG)
    loaded = load_model(save_checkpoint(model, tmp_path, int4_experts=True))
    assert loaded.layers[1].mlp.experts.quantized
    with torch.no_grad():  # the reference model gets the INT4-rounded expert weights
        for layer in model.layers[1:]:
            for name in ("w13", "w2"):
                w = getattr(layer.mlp.experts, name)
                q, scale = quantize_int4(w)
                w.copy_(unpack_int4(pack_int4(q), scale, torch.float32))
    ids = torch.randint(0, 128, (2, 20))
    assert (loaded.score(ids) - model.score(ids)).abs().max() < 1e-5
