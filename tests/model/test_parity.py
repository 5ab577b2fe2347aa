"""Logit parity with transformers' DeepseekV3ForCausalLM, and exact INT4 / FP8 loading."""

import json

import pytest
import torch

from k2batch.model import CheckpointError, load_model
from tests.checkpoints import (
    YARN,
    compress_experts_int4,
    load_dequantized_into_hf,
    random_hf_model,
    save_hf,
    to_legacy_rope_config,
)

CASES = {
    "q_lora": {},
    "no_q_lora": {"q_lora_rank": None},
    "groups": {"n_group": 4, "topk_group": 2, "n_routed_experts": 16, "num_experts_per_tok": 4},
    "yarn": {"rope_parameters": YARN},
    "no_norm_topk": {"norm_topk_prob": False},
    "moonlight_like": {
        "q_lora_rank": None,
        "n_shared_experts": 2,
        "num_experts_per_tok": 3,
        "first_k_dense_replace": 0,
    },
    "not_interleaved": {"rope_interleave": False, "rope_parameters": YARN},
}


def _ids(vocab: int, b: int = 3, t: int = 40) -> torch.Tensor:
    return torch.randint(0, vocab, (b, t), generator=torch.Generator().manual_seed(1))


def _max_diff(hf, path) -> float:
    ids = _ids(hf.config.vocab_size)
    with torch.no_grad():
        expected = hf(ids).logits
    assert expected.abs().mean() > 0.1, "logits too small for a meaningful comparison"
    return (load_model(path).score(ids) - expected).abs().max().item()


@pytest.mark.parametrize("case", CASES)
def test_logits_match_transformers(tmp_path, case):
    hf = random_hf_model(**CASES[case])
    assert _max_diff(hf, save_hf(hf, tmp_path)) < 1e-4


def test_bf16_files_sharded_and_legacy_rope(tmp_path):
    hf = random_hf_model(rope_parameters=YARN)
    path = save_hf(hf, tmp_path, dtype=torch.bfloat16, max_shard_size="100KB")
    assert (path / "model.safetensors.index.json").exists()
    assert len(list(path.glob("*.safetensors"))) > 2
    to_legacy_rope_config(path)
    hf_bf16 = random_hf_model(rope_parameters=YARN)
    with torch.no_grad():  # the reference sees the same bf16-rounded weights, in float32
        for p in hf_bf16.parameters():
            p.copy_(p.to(torch.bfloat16).float())
        for name, b in hf_bf16.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(b.to(torch.bfloat16).float())
    assert _max_diff(hf_bf16, path) < 1e-4


def test_load_bf16_dtype(tmp_path):
    hf = random_hf_model()
    model = load_model(save_hf(hf, tmp_path), dtype="bfloat16")
    assert model.embed_tokens.weight.dtype == torch.bfloat16
    assert model.layers[1].mlp.gate.e_score_correction_bias.dtype == torch.float32
    ids = _ids(hf.config.vocab_size)
    with torch.no_grad():
        expected = hf(ids).logits
    got = model.score(ids).float()
    # bf16 rounding can flip a near-tied expert choice, so compare in aggregate, not element-wise.
    assert (got - expected).abs().mean() / expected.abs().mean() < 0.05
    assert (got.argmax(-1) == expected.argmax(-1)).float().mean() > 0.9


def test_int4_experts_match_compressed_tensors(tmp_path):
    hf = random_hf_model()
    path = save_hf(hf, tmp_path, max_shard_size="150KB")
    oracle = compress_experts_int4(path)
    model = load_model(path)
    experts = model.layers[1].mlp.experts
    assert experts.quantized and experts.w13_packed.dtype == torch.int32  # kept packed in memory
    w13, w2 = experts.weights()
    inter = hf.config.moe_intermediate_size
    for e in range(hf.config.n_routed_experts):
        dense13 = w13[e].dequantize(torch.float32)
        assert torch.equal(dense13[:inter], oracle[f"model.layers.1.mlp.experts.{e}.gate_proj.weight"].float())
        assert torch.equal(dense13[inter:], oracle[f"model.layers.1.mlp.experts.{e}.up_proj.weight"].float())
        assert torch.equal(
            w2[e].dequantize(torch.float32), oracle[f"model.layers.1.mlp.experts.{e}.down_proj.weight"].float()
        )
    load_dequantized_into_hf(hf, oracle)
    ids = _ids(hf.config.vocab_size)
    with torch.no_grad():
        expected = hf(ids).logits
    assert (model.score(ids) - expected).abs().max().item() < 1e-4


def test_fp8_block_weights_dequantized_on_load(tmp_path):
    from safetensors.torch import load_file, save_file

    hf = random_hf_model()
    path = save_hf(hf, tmp_path)
    tensors = load_file(path / "model.safetensors")
    out = {}
    for key, w in tensors.items():
        if key.endswith("proj.weight") and w.dim() == 2:
            blocks = w.unflatten(0, (-1, 16)).unflatten(-1, (-1, 16))  # [out/16, 16, in/16, 16]
            scale = blocks.abs().amax(dim=(1, 3)) / 448.0
            q = (w / scale.repeat_interleave(16, 0).repeat_interleave(16, 1)).to(torch.float8_e4m3fn)
            out[key], out[key + "_scale_inv"] = q, scale
        else:
            out[key] = w
    save_file(out, path / "model.safetensors")
    cfg = json.loads((path / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [16, 16]}
    (path / "config.json").write_text(json.dumps(cfg))
    with torch.no_grad():
        for name, p in hf.named_parameters():
            key = name
            if key in out and out[key].dtype == torch.float8_e4m3fn:
                s = out[key + "_scale_inv"]
                p.copy_(out[key].float() * s.repeat_interleave(16, 0).repeat_interleave(16, 1))
            elif name.endswith(("gate_up_proj", "down_proj")) and ".experts." in name:
                prefix = name.rsplit(".", 1)[0]
                inter = hf.config.moe_intermediate_size
                for e in range(p.shape[0]):

                    def dq(k):
                        return out[k].float() * out[k + "_scale_inv"].repeat_interleave(16, 0).repeat_interleave(16, 1)

                    if name.endswith("gate_up_proj"):
                        p[e, :inter] = dq(f"{prefix}.{e}.gate_proj.weight")
                        p[e, inter:] = dq(f"{prefix}.{e}.up_proj.weight")
                    else:
                        p[e] = dq(f"{prefix}.{e}.down_proj.weight")
    assert _max_diff(hf, path) < 1e-4


def test_errors_name_the_tensor(tmp_path):
    from safetensors.torch import load_file, save_file

    hf = random_hf_model()
    path = save_hf(hf, tmp_path)
    tensors = load_file(path / "model.safetensors")
    missing = dict(tensors)
    del missing["model.layers.2.mlp.experts.5.up_proj.weight"]
    save_file(missing, path / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"model\.layers\.2\.mlp\.experts\.5\.up_proj"):
        load_model(path)
    wrong = dict(tensors)
    wrong["model.layers.0.self_attn.o_proj.weight"] = torch.zeros(64, 32)
    save_file(wrong, path / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"o_proj.weight: shape \(64, 32\), expected \(64, 64\)"):
        load_model(path)
    cfg = json.loads((path / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "awq"}
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="quant_method 'awq' is not supported"):
        load_model(path)


def test_load_from_fsspec_uri(tmp_path):
    import fsspec

    hf = random_hf_model()
    path = save_hf(hf, tmp_path)
    fs = fsspec.filesystem("memory")
    for f in path.iterdir():
        fs.pipe(f"/ckpt/{f.name}", f.read_bytes())
    assert _max_diff(hf, "memory://ckpt") < 1e-4
