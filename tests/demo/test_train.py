"""Training steps of a tiny demo model: Muon, QK-clip, expert-bias balancing, INT4 QAT, and the export round trip."""

from __future__ import annotations

import json

import pytest
import torch

from k2batch.demo.train import (
    ExpertLoad,
    TrainableExperts,
    export,
    fake_quant_int4,
    loss_on_generated,
    optimizers,
    qk_clip,
    trainable_model,
)
from k2batch.model import load_model
from k2batch.model.config import ModelConfig
from kernels.int4_moe import pack_int4, quantize_int4, unpack_int4

TINY = ModelConfig.from_dict(
    dict(
        model_type="kimi_k2", vocab_size=64, hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
        num_hidden_layers=2, num_attention_heads=2, q_lora_rank=32, kv_lora_rank=32, qk_nope_head_dim=16,
        qk_rope_head_dim=16, v_head_dim=16, n_routed_experts=4, n_shared_experts=1, num_experts_per_tok=2,
        n_group=1, topk_group=1, first_k_dense_replace=1, routed_scaling_factor=2.827,
        max_position_embeddings=256, rope_theta=50000.0, eos_token_id=1,
    )
)  # fmt: skip


def batch(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, TINY.vocab_size, (3, 24), generator=g)
    target = torch.zeros_like(ids, dtype=torch.bool)
    target[:, 12:] = True
    return ids, target


def experts(model):
    return [m for m in model.modules() if isinstance(m, TrainableExperts)]


def test_muon_takes_the_hidden_matrices_and_training_lowers_the_loss():
    model = trainable_model(TINY, seed=0)
    muon, adamw = optimizers(model, lr=3e-3, weight_decay=0.0)
    assert isinstance(muon, torch.optim.Muon) and isinstance(adamw, torch.optim.AdamW)
    in_muon = {id(p) for g in muon.param_groups for p in g["params"]}
    names = {name for name, p in model.named_parameters() if id(p) in in_muon}
    assert "layers.1.mlp.experts.gate_up.0" in names and "layers.0.self_attn.kv_b_proj.weight" in names
    assert not any(n.startswith(("embed_tokens", "lm_head")) or "norm" in n or ".gate." in n for n in names)
    ids, target = batch()
    losses = []
    for _ in range(12):
        loss, _, _ = loss_on_generated(model, ids, target)
        for opt in (muon, adamw):
            opt.zero_grad()
        loss.backward()
        for opt in (muon, adamw):
            opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.5


def test_qk_clip_rescales_heads_over_the_threshold_to_it():
    model = trainable_model(TINY, seed=0)
    ids, target = batch()
    _, attention, _ = loss_on_generated(model, ids, target)
    before = {layer: m.clone() for layer, m in attention.max_logits.items()}
    threshold = float(min(m.min() for m in before.values())) * 0.5
    clipped = qk_clip(model, attention.max_logits, threshold)
    assert clipped == TINY.num_hidden_layers * TINY.num_attention_heads
    with torch.no_grad():
        _, after, _ = loss_on_generated(model, ids, target)
    # The first layer sees the same inputs, so its heads now peak exactly at the threshold (later layers' inputs
    # changed with it).
    assert torch.allclose(after.max_logits[0], torch.full_like(after.max_logits[0], threshold), rtol=1e-4)


def test_bias_update_moves_routing_toward_balance():
    model = trainable_model(TINY, seed=0)
    router = model.layers[1].mlp.gate
    router.e_score_correction_bias[0] = 1.0  # expert 0 is chosen for every token
    load = ExpertLoad(model)
    ids, _ = batch()
    model.score(ids)
    counts = load.counts[0].clone()
    assert counts.sum() == ids.numel() * TINY.num_experts_per_tok
    first = load.update_bias(0.05)
    bias = router.e_score_correction_bias
    assert bias[0] == 0.95 and bias[counts.argmin()] == 0.05  # the busy expert loses, idle ones gain
    for _ in range(30):
        model.score(ids)
        last = load.update_bias(0.05)
    assert first == 2.0 and last < 1.5


def test_qat_fake_quant_is_the_int4_checkpoint_values_with_straight_through_gradient():
    w = torch.randn(2, 8, 64, requires_grad=True)
    fq = fake_quant_int4(w)
    q, scale = quantize_int4(w.detach())
    assert torch.equal(fq.detach(), unpack_int4(pack_int4(q), scale, torch.float32))
    fq.sum().backward()
    assert torch.equal(w.grad, torch.ones_like(w))


def test_export_then_load_round_trip_int4_and_bf16(tmp_path):
    model = trainable_model(TINY, seed=1)
    for m in experts(model):
        m.fake_quant = True
    ids, target = batch()
    loss, _, _ = loss_on_generated(model, ids, target)
    loss.backward()  # the QAT path trains: gradients reach the float master weights
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for m in experts(model) for p in m.gate_up)
    model.layers[1].mlp.gate.e_score_correction_bias += torch.arange(4.0) / 10
    export(model, TINY, tmp_path / "int4", int4_experts=True)
    export(model, TINY, tmp_path / "bf16", int4_experts=False)
    raw = json.loads((tmp_path / "int4" / "config.json").read_text())
    assert raw["model_type"] == "kimi_k2" and raw["quantization_config"]["format"] == "pack-quantized"
    assert raw["torch_dtype"] == "bfloat16"
    int4 = load_model(tmp_path / "int4")
    bf16 = load_model(tmp_path / "bf16")
    loaded = int4.layers[1].mlp.experts
    assert loaded.quantized and loaded.w13_scale.dtype == torch.bfloat16
    w13 = torch.stack(list(experts(model)[0].gate_up)).detach()
    assert torch.equal(loaded.weights()[0].dequantize(torch.float32), fake_quant_int4(w13))
    assert torch.equal(bf16.layers[1].mlp.experts.w13, w13.to(torch.bfloat16).float())
    assert torch.equal(int4.layers[1].mlp.gate.e_score_correction_bias, model.layers[1].mlp.gate.e_score_correction_bias)
    assert int4.layers[1].mlp.gate.e_score_correction_bias.dtype == torch.float32
    # The loaded INT4 model computes what the QAT model computes, up to bf16 rounding of the other weights.
    assert torch.allclose(int4.score(ids), model.score(ids), atol=0.1)


@pytest.mark.parametrize("threshold", [1e9])
def test_qk_clip_leaves_heads_under_the_threshold_alone(threshold):
    model = trainable_model(TINY, seed=0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ids, target = batch()
    _, attention, _ = loss_on_generated(model, ids, target)
    assert qk_clip(model, attention.max_logits, threshold) == 0
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
