"""Small random DeepSeek-V3 / K2 checkpoints written by transformers (and compressed-tensors), for tests."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

BASE_CONFIG = dict(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=96,
    moe_intermediate_size=32,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=4,
    n_shared_experts=1,
    n_routed_experts=8,
    kv_lora_rank=32,
    q_lora_rank=48,
    qk_rope_head_dim=16,
    v_head_dim=16,
    qk_nope_head_dim=16,
    n_group=1,
    topk_group=1,
    num_experts_per_tok=2,
    first_k_dense_replace=1,
    norm_topk_prob=True,
    routed_scaling_factor=2.827,
    max_position_embeddings=4096,
    rope_parameters={"rope_type": "default", "rope_theta": 50000.0},
    tie_word_embeddings=False,
    bos_token_id=0,
    eos_token_id=1,
    pad_token_id=None,
)

YARN = {
    "rope_type": "yarn",
    "rope_theta": 50000.0,
    "factor": 32.0,
    "mscale": 1.0,
    "mscale_all_dim": 1.0,
    "original_max_position_embeddings": 64,
    "beta_fast": 1.0,
    "beta_slow": 1.0,
}


def random_hf_model(seed: int = 0, **overrides):
    """transformers' DeepseekV3ForCausalLM with weights large enough that logits are O(1) and routing varies."""
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    config = DeepseekV3Config(**{**BASE_CONFIG, **overrides})
    torch.manual_seed(seed)
    model = DeepseekV3ForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.2 * torch.randn_like(p))
            elif p.dim() >= 2:
                p.normal_(0, p.shape[-1] ** -0.5)
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(0.05 * torch.randn_like(b))
    return model


def save_hf(
    model,
    path: Path,
    dtype: torch.dtype = torch.float32,
    max_shard_size: str | None = None,
    fused_experts: bool = False,
) -> Path:
    """save_pretrained; `fused_experts` keeps transformers 5's in-memory layout (experts.gate_up_proj [E, 2I, H],
    experts.down_proj [E, H, I]) instead of the per-expert tensors real checkpoints ship."""
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    if fused_experts:
        kwargs["save_original_format"] = False
    model.to(dtype).save_pretrained(path, **kwargs)
    model.to(torch.float32)
    return Path(path)


def to_legacy_rope_config(path: Path) -> None:
    """Rewrite config.json the way real K2 checkpoints carry rope: rope_theta + rope_scaling with "type"."""
    cfg = json.loads((path / "config.json").read_text())
    params = dict(cfg.pop("rope_parameters"))
    cfg["rope_theta"] = params.pop("rope_theta")
    rope_type = params.pop("rope_type")
    cfg["rope_scaling"] = {"type": rope_type, **params} if rope_type != "default" else None
    cfg["model_type"] = "kimi_k2"
    (path / "config.json").write_text(json.dumps(cfg, indent=2))


INT4_ARGS = dict(num_bits=4, type="int", symmetric=True, strategy="group", group_size=32)


def compress_experts_int4(path: Path) -> dict[str, torch.Tensor]:
    """Compress the routed experts of a saved checkpoint with compressed-tensors (K2 Thinking's layout).

    Returns the package's own decompression of every compressed weight (the oracle), keyed by HF weight name.
    """
    from compressed_tensors.compressors.pack_quantized import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationArgs, QuantizationConfig, QuantizationScheme
    from compressed_tensors.quantization.utils import calculate_qparams

    args = QuantizationArgs(**INT4_ARGS)
    scheme = QuantizationScheme(targets=["Linear"], weights=args)
    oracle: dict[str, torch.Tensor] = {}
    for file in sorted(path.glob("*.safetensors")):
        tensors = load_file(file)
        out = {}
        for key, w in tensors.items():
            if ".mlp.experts." not in key or not key.endswith(".weight"):
                out[key] = w
                continue
            w = w.to(torch.bfloat16)
            groups = w.unflatten(-1, (-1, 32))
            scale, zp = calculate_qparams(groups.amin(-1), groups.amax(-1), args)
            sd = PackedQuantizationCompressor.compress(
                {"weight": w, "weight_scale": scale, "weight_zero_point": zp}, scheme
            )
            prefix = key.removesuffix(".weight")
            for name, t in sd.items():
                out[f"{prefix}.{name}"] = t.contiguous()
            oracle[key] = PackedQuantizationCompressor.decompress(sd, scheme)["weight"]
        save_file(out, file, metadata={"format": "pt"})
    index = path / "model.safetensors.index.json"
    if index.exists():
        data = json.loads(index.read_text())
        weight_map = {}
        for key, file in data["weight_map"].items():
            if ".mlp.experts." in key and key.endswith(".weight"):
                prefix = key.removesuffix(".weight")
                for name in ("weight_packed", "weight_scale", "weight_shape"):
                    weight_map[f"{prefix}.{name}"] = file
            else:
                weight_map[key] = file
        data["weight_map"] = weight_map
        index.write_text(json.dumps(data, indent=2))
    qconfig = QuantizationConfig(
        config_groups={"group_0": QuantizationScheme(targets=["re:.*mlp\\.experts\\..*"], weights=args)},
        format="pack-quantized",
        ignore=["lm_head", "re:.*self_attn.*", "re:.*shared_experts.*", "re:.*mlp\\.(gate|up|down)_proj.*"],
    ).model_dump()
    qconfig["quant_method"] = "compressed-tensors"
    cfg = json.loads((path / "config.json").read_text())
    cfg["quantization_config"] = qconfig
    (path / "config.json").write_text(json.dumps(cfg, indent=2, default=str))
    return oracle


def load_dequantized_into_hf(model, oracle: dict[str, torch.Tensor]) -> None:
    """Put dequantized expert weights into transformers' fused expert parameters."""
    inter = model.config.moe_intermediate_size
    with torch.no_grad():
        for key, w in oracle.items():
            prefix, expert, proj = key.removesuffix(".weight").rsplit(".", 2)
            experts = model.get_submodule(prefix.removesuffix(".experts") + ".experts")
            e = int(expert)
            if proj == "down_proj":
                experts.down_proj[e].copy_(w.float())
            else:
                rows = slice(0, inter) if proj == "gate_proj" else slice(inter, 2 * inter)
                experts.gate_up_proj[e, rows].copy_(w.float())


def load_weights_into_hf(model, weights: dict[str, torch.Tensor]) -> None:
    """Put float weights keyed by checkpoint name into transformers' model: its own names as they are, per-expert
    names into its fused expert parameters."""
    params = dict(model.named_parameters())
    with torch.no_grad():
        for key, w in weights.items():
            if key in params:
                params[key].copy_(w.float())
    load_dequantized_into_hf(model, {k: w for k, w in weights.items() if k not in params})


def fp8_quantize(w: torch.Tensor, block: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Block FP8 as DeepSeek-V3 / K2 Instruct store it, block by block: e4m3 weight [..., out, in] and one float32
    factor per block, scale_inv [..., ceil(out/b0), ceil(in/b1)]; blocks at the bottom/right edge are partial."""
    b0, b1 = block
    rows, cols = -(-w.shape[-2] // b0), -(-w.shape[-1] // b1)
    q = torch.empty(w.shape, dtype=torch.float8_e4m3fn)
    scale_inv = torch.empty(*w.shape[:-2], rows, cols)
    for i in range(rows):
        for j in range(cols):
            tile = w[..., i * b0 : (i + 1) * b0, j * b1 : (j + 1) * b1].float()
            s = tile.abs().amax(dim=(-2, -1)).clamp_min(1e-12) / 448.0
            scale_inv[..., i, j] = s
            q[..., i * b0 : (i + 1) * b0, j * b1 : (j + 1) * b1] = (tile / s[..., None, None]).to(torch.float8_e4m3fn)
    return q, scale_inv


def fp8_dequantize(q: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """The float32 weight of fp8_quantize's output, block by block (an oracle independent of the loader's)."""
    b0, b1 = block
    w = torch.empty(q.shape)
    for i in range(scale_inv.shape[-2]):
        for j in range(scale_inv.shape[-1]):
            tile = q[..., i * b0 : (i + 1) * b0, j * b1 : (j + 1) * b1].float()
            w[..., i * b0 : (i + 1) * b0, j * b1 : (j + 1) * b1] = tile * scale_inv[..., i, j, None, None]
    return w


def _is_fp8_linear(key: str, w: torch.Tensor) -> bool:
    # K2 Instruct keeps embeddings, norms, the router and lm_head in bf16; every other linear is FP8.
    if key.endswith(("embed_tokens.weight", "lm_head.weight", "mlp.gate.weight")):
        return False
    return (key.endswith(".weight") and w.dim() == 2) or key.endswith(("experts.gate_up_proj", "experts.down_proj"))


def quantize_fp8(path: Path, block: tuple[int, int]) -> dict[str, torch.Tensor]:
    """Store the linear weights of a saved checkpoint as block FP8 (`weight` e4m3 + `weight_scale_inv`; fused experts
    get `gate_up_proj_scale_inv` / `down_proj_scale_inv`) and declare it in config.json.

    Returns the dequantized weights (the oracle), keyed by checkpoint name."""
    oracle: dict[str, torch.Tensor] = {}
    for file in sorted(path.glob("*.safetensors")):
        out = {}
        for key, w in load_file(file).items():
            if _is_fp8_linear(key, w):
                q, scale_inv = fp8_quantize(w, block)
                out[key], out[f"{key}_scale_inv"] = q, scale_inv
                oracle[key] = fp8_dequantize(q, scale_inv, block)
            else:
                out[key] = w
        save_file(out, file, metadata={"format": "pt"})
    index = path / "model.safetensors.index.json"
    if index.exists():
        data = json.loads(index.read_text())
        data["weight_map"] |= {f"{k}_scale_inv": f for k, f in data["weight_map"].items() if k in oracle}
        index.write_text(json.dumps(data, indent=2))
    cfg = json.loads((path / "config.json").read_text())
    cfg["quantization_config"] = {
        "quant_method": "fp8",
        "fmt": "e4m3",
        "weight_block_size": list(block),
        "activation_scheme": "dynamic",
    }
    (path / "config.json").write_text(json.dumps(cfg, indent=2))
    return oracle


def max_logit_diff(hf, model) -> float:
    """max |Δlogit| between transformers' model and ours (a K2ForCausalLM) on a fixed batch of random ids."""
    ids = torch.randint(0, hf.config.vocab_size, (3, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = hf(ids).logits
    assert expected.abs().mean() > 0.1, "logits too small for a meaningful comparison"
    return (model.score(ids).float() - expected).abs().max().item()
