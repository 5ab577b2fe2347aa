"""Write a K2ForCausalLM as an HF-style checkpoint: config.json + safetensors, routed experts optionally INT4."""

from __future__ import annotations

import json
from pathlib import Path

import msgspec
import torch
from safetensors.torch import save_file

from k2batch.kernels.int4_moe import pack_int4, quantize_int4
from k2batch.model.config import ModelConfig
from k2batch.model.model import K2ForCausalLM

INT4_QUANTIZATION_CONFIG = {
    "quant_method": "compressed-tensors",
    "format": "pack-quantized",
    "config_groups": {
        "group_0": {
            "targets": ["re:.*mlp\\.experts\\.\\d+\\.(gate|up|down)_proj$"],
            "weights": {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "group", "group_size": 32},
            "input_activations": None,
        }
    },
    "ignore": ["lm_head"],
}


def config_dict(config: ModelConfig) -> dict:
    """config.json in the layout real K2 checkpoints use (rope_theta + rope_scaling)."""
    raw = msgspec.to_builtins(config)
    rope = raw.pop("rope")
    raw.pop("quantization")
    raw["architectures"] = ["DeepseekV3ForCausalLM"]
    raw["rope_theta"] = rope.pop("theta")
    rope_type = rope.pop("rope_type")
    raw["rope_scaling"] = None if rope_type == "default" else {"type": rope_type, **rope}
    raw["num_key_value_heads"] = config.num_attention_heads
    return raw


def random_model(config: ModelConfig, seed: int = 0, dtype: torch.dtype = torch.float32) -> K2ForCausalLM:
    """A model with random weights scaled so activations stay O(1): for demos, tests and benchmarks."""
    torch.manual_seed(seed)
    model = K2ForCausalLM(config).to(dtype)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.normal_(0, p.shape[-1] ** -0.5)
    return model.eval()


def save_checkpoint(model: K2ForCausalLM, path: str | Path, *, int4_experts: bool = True) -> Path:
    """Save with HF tensor names (`model.layers.N.mlp.experts.E.gate_proj...`), INT4-packing the routed experts
    in the compressed-tensors layout of K2 Thinking when `int4_experts`."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    config = model.config
    inter = config.moe_intermediate_size
    tensors: dict[str, torch.Tensor] = {}
    for name, t in model.state_dict().items():
        if ".mlp.experts." not in name:
            key = name if name.startswith("lm_head") else f"model.{name}"
            tensors[key] = t.detach().contiguous()
            continue
        layer_prefix, stack = name.rsplit(".", 1)
        if stack not in ("w13", "w2"):
            raise ValueError(f"{name}: export needs dense experts; the model's experts are already packed")
        parts = {"gate_proj": t[:, :inter], "up_proj": t[:, inter:]} if stack == "w13" else {"down_proj": t}
        for proj, weights in parts.items():
            for e in range(weights.shape[0]):
                key = f"model.{layer_prefix}.{e}.{proj}"
                w = weights[e].detach()
                if int4_experts:
                    q, scale = quantize_int4(w)
                    tensors[f"{key}.weight_packed"] = pack_int4(q).contiguous()
                    tensors[f"{key}.weight_scale"] = scale.contiguous()
                    tensors[f"{key}.weight_shape"] = torch.tensor(list(w.shape), dtype=torch.int32)
                else:
                    tensors[f"{key}.weight"] = w.contiguous()
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    raw = config_dict(config)
    if int4_experts:
        raw["quantization_config"] = INT4_QUANTIZATION_CONFIG
    raw["torch_dtype"] = str(model.dtype).removeprefix("torch.")
    (path / "config.json").write_text(json.dumps(raw, indent=2))
    return path
