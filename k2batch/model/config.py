"""The DeepSeek-V3 / Kimi-K2 architecture hyper-parameters, read from an HF config.json."""

from __future__ import annotations

from typing import Any

import msgspec

SUPPORTED_MODEL_TYPES = ("kimi_k2", "deepseek_v3")


class RopeConfig(msgspec.Struct, frozen=True, kw_only=True):
    rope_type: str = "default"  # "default" or "yarn"
    theta: float = 10000.0
    factor: float = 1.0
    original_max_position_embeddings: int | None = None
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float | None = None
    mscale_all_dim: float | None = None
    attention_factor: float | None = None
    truncate: bool = True


class QuantConfig(msgspec.Struct, frozen=True, kw_only=True):
    """The checkpoint's weight quantization: compressed-tensors INT4 or block FP8 (dequantized on load)."""

    method: str  # "int4" (compressed-tensors pack-quantized) or "fp8_block"
    group_size: int = 32
    block_size: tuple[int, int] = (128, 128)


class ModelConfig(msgspec.Struct, frozen=True, kw_only=True):
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    moe_intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    q_lora_rank: int | None
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    n_routed_experts: int
    n_shared_experts: int
    num_experts_per_tok: int
    n_group: int
    topk_group: int
    first_k_dense_replace: int
    norm_topk_prob: bool
    routed_scaling_factor: float
    rms_norm_eps: float
    max_position_embeddings: int
    rope: RopeConfig
    rope_interleave: bool = True
    tie_word_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    quantization: QuantConfig | None = None

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def kv_cache_dim(self) -> int:
        """Values cached per token per layer: the compressed latent plus the shared rope key (576 for K2)."""
        return self.kv_lora_rank + self.qk_rope_head_dim

    def is_moe_layer(self, layer: int) -> bool:
        return self.n_routed_experts > 0 and layer >= self.first_k_dense_replace

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> ModelConfig:
        model_type = raw.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(
                f"config.json: model_type {model_type!r} is not supported; expected one of {SUPPORTED_MODEL_TYPES}"
            )
        missing = [k for k in _REQUIRED if k not in raw]
        if missing:
            raise ValueError(f"config.json: missing keys {missing} for a {model_type} model")
        heads = raw["num_attention_heads"]
        return cls(
            model_type=model_type,
            vocab_size=raw["vocab_size"],
            hidden_size=raw["hidden_size"],
            intermediate_size=raw["intermediate_size"],
            moe_intermediate_size=raw["moe_intermediate_size"],
            num_hidden_layers=raw["num_hidden_layers"],
            num_attention_heads=heads,
            q_lora_rank=raw.get("q_lora_rank"),
            kv_lora_rank=raw["kv_lora_rank"],
            qk_nope_head_dim=raw["qk_nope_head_dim"],
            qk_rope_head_dim=raw["qk_rope_head_dim"],
            v_head_dim=raw.get("v_head_dim") or raw["qk_nope_head_dim"],
            n_routed_experts=raw.get("n_routed_experts") or 0,
            n_shared_experts=raw.get("n_shared_experts") or 0,
            num_experts_per_tok=raw.get("num_experts_per_tok") or 0,
            n_group=raw.get("n_group") or 1,
            topk_group=raw.get("topk_group") or 1,
            first_k_dense_replace=raw.get("first_k_dense_replace") or 0,
            norm_topk_prob=bool(raw.get("norm_topk_prob", True)),
            routed_scaling_factor=float(raw.get("routed_scaling_factor", 1.0)),
            rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
            max_position_embeddings=raw.get("max_position_embeddings", 4096),
            rope=_rope_config(raw),
            rope_interleave=bool(raw.get("rope_interleave", True)),
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            bos_token_id=raw.get("bos_token_id"),
            eos_token_id=raw.get("eos_token_id"),
            quantization=_quant_config(raw.get("quantization_config")),
        )


_REQUIRED = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "moe_intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "kv_lora_rank",
    "qk_nope_head_dim",
    "qk_rope_head_dim",
)


def _rope_config(raw: dict[str, Any]) -> RopeConfig:
    # transformers 5 saves `rope_parameters` (theta inside); real K2 checkpoints carry rope_theta + rope_scaling.
    params = dict(raw.get("rope_parameters") or raw.get("rope_scaling") or {})
    rope_type = params.get("rope_type") or params.get("type") or "default"
    theta = float(params.get("rope_theta") or raw.get("rope_theta") or 10000.0)
    if rope_type == "default":
        return RopeConfig(theta=theta)
    if rope_type != "yarn":
        raise ValueError(f"config.json: rope type {rope_type!r} is not supported; expected 'default' or 'yarn'")
    original = params.get("original_max_position_embeddings") or raw.get("max_position_embeddings", 4096)
    factor = params.get("factor")
    if factor is None:
        factor = raw.get("max_position_embeddings", original) / original
    return RopeConfig(
        rope_type="yarn",
        theta=theta,
        factor=float(factor),
        original_max_position_embeddings=int(original),
        beta_fast=_beta(params, "beta_fast", 32.0),
        beta_slow=_beta(params, "beta_slow", 1.0),
        mscale=params.get("mscale"),
        mscale_all_dim=params.get("mscale_all_dim"),
        attention_factor=params.get("attention_factor"),
        truncate=bool(params.get("truncate", True)),
    )


def _beta(params: dict[str, Any], key: str, default: float) -> float:
    """A YaRN correction bound in rotations: the default only when absent or null, never in place of a given value."""
    value = params.get(key)
    if value is None:
        return default
    if value <= 0:  # the ramp divides by the rotation count
        raise ValueError(f"config.json: rope {key} is {value}; it counts rotations and must be positive")
    return float(value)


def _quant_config(raw: dict[str, Any] | None) -> QuantConfig | None:
    if not raw:
        return None
    method = raw.get("quant_method")
    if method == "fp8":
        block = raw.get("weight_block_size") or [128, 128]
        fmt = raw.get("fmt", "e4m3")
        if fmt != "e4m3" or len(block) != 2:
            raise ValueError(f"config.json: unsupported fp8 quantization fmt={fmt!r} weight_block_size={block}")
        return QuantConfig(method="fp8_block", block_size=(int(block[0]), int(block[1])))
    if method == "compressed-tensors":
        fmt = raw.get("format")
        if fmt != "pack-quantized":
            raise ValueError(
                f"config.json: compressed-tensors format {fmt!r} is not supported; expected 'pack-quantized'"
            )
        for name, group in (raw.get("config_groups") or {}).items():
            w = group.get("weights") or {}
            scheme = (w.get("num_bits"), w.get("type"), w.get("symmetric"), w.get("strategy"))
            if scheme != (4, "int", True, "group") or w.get("group_size") != 32 or w.get("dynamic"):
                raise ValueError(
                    f"config.json: quantization group {name!r} is {w}; only symmetric INT4 with group_size 32 "
                    "(strategy 'group') is supported"
                )
            if group.get("input_activations"):
                raise ValueError(
                    f"config.json: quantization group {name!r} quantizes activations; only W4A16 is supported"
                )
        return QuantConfig(method="int4", group_size=32)
    raise ValueError(f"config.json: quant_method {method!r} is not supported; expected 'compressed-tensors' or 'fp8'")
