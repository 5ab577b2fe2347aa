"""Checkpoint layouts and dtypes beyond the plain parity cases: fused experts, MTP layers, rope buffers, fp16."""

import copy
import logging

import torch
from safetensors.torch import load_file, save_file

from k2batch.model import load_model
from tests.checkpoints import max_logit_diff, random_hf_model, save_hf


def _ids(vocab: int) -> torch.Tensor:
    return torch.randint(0, vocab, (2, 24), generator=torch.Generator().manual_seed(2))


def test_fused_expert_layout_loads_like_per_expert(tmp_path, caplog):
    hf = random_hf_model()
    fused = save_hf(hf, tmp_path / "fused", max_shard_size="100KB", fused_experts=True)
    per_expert = save_hf(hf, tmp_path / "per_expert")
    keys = set().union(*(load_file(f).keys() for f in fused.glob("*.safetensors")))
    assert "model.layers.1.mlp.experts.gate_up_proj" in keys and "model.layers.2.mlp.experts.down_proj" in keys
    assert not any(".experts.0." in k for k in keys)
    with caplog.at_level(logging.WARNING, logger="k2batch.model.loader"):
        model = load_model(fused)
    assert not caplog.records
    assert max_logit_diff(hf, model) < 1e-4
    ids = _ids(hf.config.vocab_size)
    assert torch.equal(model.score(ids), load_model(per_expert).score(ids))


def test_mtp_layers_and_rotary_inv_freq_are_skipped(tmp_path, caplog):
    """DeepSeek-V3 ships its multi-token-prediction layer as model.layers.{num_hidden_layers}.*."""
    hf = random_hf_model()
    path = save_hf(hf, tmp_path)
    reference = load_model(path)
    tensors = load_file(path / "model.safetensors")
    n, hidden, vocab = hf.config.num_hidden_layers, hf.config.hidden_size, hf.config.vocab_size
    last = f"model.layers.{n - 1}."
    extra = {k.replace(last, f"model.layers.{n}."): v.clone() for k, v in tensors.items() if k.startswith(last)}
    extra |= {
        f"model.layers.{n}.embed_tokens.weight": torch.randn(vocab, hidden),
        f"model.layers.{n}.enorm.weight": torch.ones(hidden),
        f"model.layers.{n}.hnorm.weight": torch.ones(hidden),
        f"model.layers.{n}.eh_proj.weight": torch.randn(hidden, 2 * hidden),
        f"model.layers.{n}.shared_head.norm.weight": torch.ones(hidden),
        f"model.layers.{n}.shared_head.head.weight": torch.randn(vocab, hidden),
        "model.layers.0.self_attn.rotary_emb.inv_freq": torch.rand(hf.config.qk_rope_head_dim // 2),
    }
    save_file(tensors | extra, path / "model.safetensors", metadata={"format": "pt"})
    with caplog.at_level(logging.WARNING, logger="k2batch.model.loader"):
        model = load_model(path)
    assert not caplog.records  # skipped on purpose, not "ignored" as unknown
    ids = _ids(vocab)
    assert torch.equal(model.score(ids), reference.score(ids))


def test_load_as_fp16(tmp_path):
    hf = random_hf_model()
    model = load_model(save_hf(hf, tmp_path), dtype="fp16")
    assert model.embed_tokens.weight.dtype == torch.float16
    assert model.layers[1].mlp.experts.w13.dtype == torch.float16
    assert model.layers[1].mlp.gate.e_score_correction_bias.dtype == torch.float32
    ids = _ids(hf.config.vocab_size)
    with torch.no_grad():
        expected = hf(ids).logits
        expected_fp16 = copy.deepcopy(hf).half()(ids).logits.float()
    got = model.score(ids)
    assert got.dtype == torch.float16
    # fp16 rounding can flip a near-tied expert choice (transformers' own fp16 run flips some against its
    # float32 run), and a flipped token's logits move by half their size. So compare per token: nearly every
    # token within 0.5% of transformers in fp16 (both round the same way), and the argmax to float32.
    per_token = (got.float() - expected_fp16).abs().mean(-1).flatten() / expected.abs().mean()
    assert (per_token < 0.005).float().mean() > 0.9
    assert per_token.median() < 0.003
    assert (got.argmax(-1) == expected.argmax(-1)).float().mean() > 0.95


def test_fp16_files_load_exactly_in_float32(tmp_path):
    path = save_hf(random_hf_model(), tmp_path, dtype=torch.float16)
    hf = random_hf_model()  # a fresh one: the saved model's rope buffers went through fp16 too
    with torch.no_grad():  # the reference sees the same fp16-rounded weights, in float32
        for p in hf.parameters():
            p.copy_(p.half().float())
        for name, b in hf.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(b.half().float())
    assert max_logit_diff(hf, load_model(path)) < 1e-4
