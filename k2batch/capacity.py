"""How a model fits on N GPUs, from its config.json alone: weight bytes per role and rank, latent KV bytes per token,
KV capacity in tokens and episodes, for attention data-parallel + expert-parallel MoE and for tensor parallelism."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Any

import msgspec
import torch

from k2batch import storage
from k2batch.engine.model_runner import kv_block_bytes
from k2batch.kernels.int4_moe import GROUP_SIZE, PACK_FACTOR
from k2batch.model.config import ModelConfig

GIB = 2**30

# Kimi K2 Thinking's config.json (moonshotai/Kimi-K2-Thinking), for planning without a download. Its
# quantization_config packs the routed experts only: attention, shared experts, dense MLP and lm_head are ignored.
KIMI_K2_THINKING: dict[str, Any] = {
    "architectures": ["DeepseekV3ForCausalLM"],
    "model_type": "kimi_k2",
    "torch_dtype": "bfloat16",
    "vocab_size": 163840,
    "hidden_size": 7168,
    "intermediate_size": 18432,
    "moe_intermediate_size": 2048,
    "num_hidden_layers": 61,
    "first_k_dense_replace": 1,
    "num_attention_heads": 64,
    "num_key_value_heads": 64,
    "q_lora_rank": 1536,
    "kv_lora_rank": 512,
    "qk_nope_head_dim": 128,
    "qk_rope_head_dim": 64,
    "v_head_dim": 128,
    "n_routed_experts": 384,
    "n_shared_experts": 1,
    "num_experts_per_tok": 8,
    "n_group": 1,
    "topk_group": 1,
    "norm_topk_prob": True,
    "routed_scaling_factor": 2.827,
    "scoring_func": "sigmoid",
    "topk_method": "noaux_tc",
    "rms_norm_eps": 1e-5,
    "max_position_embeddings": 262144,
    "rope_theta": 50000.0,
    "rope_scaling": {
        "type": "yarn",
        "factor": 64.0,
        "original_max_position_embeddings": 4096,
        "beta_fast": 1.0,
        "beta_slow": 1.0,
        "mscale": 1.0,
        "mscale_all_dim": 1.0,
    },
    "tie_word_embeddings": False,
    "bos_token_id": 163584,
    "eos_token_id": 163586,
    "quantization_config": {
        "quant_method": "compressed-tensors",
        "format": "pack-quantized",
        "quantization_status": "compressed",
        "config_groups": {
            "group_0": {
                "targets": ["Linear"],
                "input_activations": None,
                "output_activations": None,
                "weights": {
                    "num_bits": 4,
                    "type": "int",
                    "symmetric": True,
                    "strategy": "group",
                    "group_size": 32,
                    "dynamic": False,
                    "actorder": None,
                    "observer": "minmax",
                },
            },
        },
        "ignore": ["lm_head", "re:.*self_attn.*", "re:.*shared_experts.*", "re:.*mlp\\.(gate|up|gate_up|down)_proj.*"],
        "kv_cache_scheme": None,
    },
}
BUILTIN_MODELS: dict[str, dict[str, Any]] = {"kimi-k2-thinking": KIMI_K2_THINKING}

ROLES = ("attention", "dense_mlp", "shared_experts", "routed_experts", "router", "embeddings", "norms")
ROLE_LABELS = {
    "attention": "attention (MLA)",
    "dense_mlp": "dense MLP layers",
    "shared_experts": "shared experts",
    "routed_experts": "routed experts",
    "router": "router",
    "embeddings": "embeddings + lm_head",
    "norms": "norms",
}


class PlanError(ValueError):
    """A model or GPU description the planner cannot use; the message says what to change."""


class WeightTensor(msgspec.Struct, frozen=True):
    """One tensor the loaded model holds, named as K2ForCausalLM names it."""

    name: str
    role: str
    shape: tuple[int, ...]
    dtype: str
    tensor_parallel: bool
    """Split over the ranks under tensor parallelism; False: every rank holds it whole."""

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * parse_dtype_any(self.dtype).itemsize


class LayoutPlan(msgspec.Struct, frozen=True):
    name: str
    description: str
    weight_bytes_per_rank: dict[str, int]
    """By role (ROLES)."""
    weights_per_rank: int
    kv_cache_bytes_per_rank: int
    """What is left for the latent cache on each rank, in whole KV blocks; 0 when the weights do not fit."""
    kv_tokens_per_rank: int
    kv_tokens_total: int
    """Distinct tokens the GPUs cache together: every rank's own under data parallelism, one rank's under TP."""
    episodes: int
    """Episodes of episode_tokens that fit at once (under data parallelism an episode stays on one rank)."""
    fits: bool


class CapacityPlan(msgspec.Struct, frozen=True):
    model: str
    gpus: int
    gpu_memory_bytes: int
    memory_utilization: float
    reserve_bytes: int
    usable_bytes_per_rank: int
    """gpu_memory x memory_utilization - reserve: what weights and the KV cache may take on each rank."""
    dtype: str
    int4_scale_dtype: str | None
    block_size: int
    episode_tokens: int
    kv_bytes_per_token: int
    weight_bytes: dict[str, int]
    """The whole model, by role."""
    layouts: list[LayoutPlan]
    assumptions: list[str]


def parse_dtype_any(name: str) -> torch.dtype:
    """A torch dtype from its name, integer storage types included (INT4 words are int32)."""
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise PlanError(f"dtype {name!r} is not a torch dtype")
    return dtype


def read_model_config(source: str, storage_options: Mapping[str, Any] | None = None) -> tuple[str, ModelConfig]:
    """(a display name, the config) of a built-in model name, a checkpoint directory or a config.json, local or
    any fsspec URI."""
    if source in BUILTIN_MODELS:
        return source, ModelConfig.from_dict(BUILTIN_MODELS[source])
    uri = source if source.rstrip("/").endswith(".json") else storage.join(source, "config.json")
    try:
        with storage.open_for_reading(uri, storage_options) as f:
            raw = json.load(f)
    except FileNotFoundError:
        raise PlanError(
            f"{uri}: no such file; give a checkpoint directory, its config.json, or one of {sorted(BUILTIN_MODELS)}"
        ) from None
    except json.JSONDecodeError as e:
        raise PlanError(f"{uri}: not JSON ({e})") from None
    try:
        return source, ModelConfig.from_dict(raw)
    except ValueError as e:
        raise PlanError(f"{uri}: {e}") from None


def weight_tensors(
    config: ModelConfig, dtype: torch.dtype, int4_scale_dtype: torch.dtype = torch.bfloat16
) -> list[WeightTensor]:
    """Every tensor K2ForCausalLM holds once loaded, as the loader builds it: floating weights in `dtype`, the
    router's correction bias in float32, routed experts stacked per layer and, for a compressed-tensors INT4
    checkpoint, packed (int32 words [E, out, in/8] and `int4_scale_dtype` scales [E, out, in/32]). Block-FP8
    weights are dequantized on load, so they count at `dtype`.

    Under tensor parallelism the layers are split as in vLLM's DeepSeek-V3: q_a_proj and kv_a_proj_with_mqa
    make the latent every head shares and stay whole on every rank, like the norms and the router; the other
    projections, the MLPs, every expert's intermediate dimension and the vocabulary are split.
    """
    c = config
    float_name = str(dtype).removeprefix("torch.")
    h, heads = c.hidden_size, c.num_attention_heads
    out: list[WeightTensor] = []

    def add(name: str, role: str, shape: tuple[int, ...], tp: bool, dt: str = float_name) -> None:
        out.append(WeightTensor(name, role, shape, dt, tp))

    def mlp(prefix: str, role: str, inter: int) -> None:
        add(f"{prefix}.gate_proj.weight", role, (inter, h), True)
        add(f"{prefix}.up_proj.weight", role, (inter, h), True)
        add(f"{prefix}.down_proj.weight", role, (h, inter), True)

    add("embed_tokens.weight", "embeddings", (c.vocab_size, h), True)
    int4 = c.quantization is not None and c.quantization.method == "int4"
    for i in range(c.num_hidden_layers):
        p = f"layers.{i}"
        attn = f"{p}.self_attn"
        if c.q_lora_rank is None:
            add(f"{attn}.q_proj.weight", "attention", (heads * c.qk_head_dim, h), True)
        else:
            add(f"{attn}.q_a_proj.weight", "attention", (c.q_lora_rank, h), False)
            add(f"{attn}.q_a_layernorm.weight", "norms", (c.q_lora_rank,), False)
            add(f"{attn}.q_b_proj.weight", "attention", (heads * c.qk_head_dim, c.q_lora_rank), True)
        add(f"{attn}.kv_a_proj_with_mqa.weight", "attention", (c.kv_cache_dim, h), False)
        add(f"{attn}.kv_a_layernorm.weight", "norms", (c.kv_lora_rank,), False)
        kv_b_rows = heads * (c.qk_nope_head_dim + c.v_head_dim)
        add(f"{attn}.kv_b_proj.weight", "attention", (kv_b_rows, c.kv_lora_rank), True)
        add(f"{attn}.o_proj.weight", "attention", (h, heads * c.v_head_dim), True)
        if c.is_moe_layer(i):
            e, inter = c.n_routed_experts, c.moe_intermediate_size
            add(f"{p}.mlp.gate.weight", "router", (e, h), False)
            add(f"{p}.mlp.gate.e_score_correction_bias", "router", (e,), False, "float32")
            experts = f"{p}.mlp.experts"
            if int4:
                scale = str(int4_scale_dtype).removeprefix("torch.")
                add(f"{experts}.w13_packed", "routed_experts", (e, 2 * inter, h // PACK_FACTOR), True, "int32")
                add(f"{experts}.w13_scale", "routed_experts", (e, 2 * inter, h // GROUP_SIZE), True, scale)
                add(f"{experts}.w2_packed", "routed_experts", (e, h, inter // PACK_FACTOR), True, "int32")
                add(f"{experts}.w2_scale", "routed_experts", (e, h, inter // GROUP_SIZE), True, scale)
            else:
                add(f"{experts}.w13", "routed_experts", (e, 2 * inter, h), True)
                add(f"{experts}.w2", "routed_experts", (e, h, inter), True)
            if c.n_shared_experts:
                mlp(f"{p}.mlp.shared_experts", "shared_experts", inter * c.n_shared_experts)
        else:
            mlp(f"{p}.mlp", "dense_mlp", c.intermediate_size)
        add(f"{p}.input_layernorm.weight", "norms", (h,), False)
        add(f"{p}.post_attention_layernorm.weight", "norms", (h,), False)
    add("norm.weight", "norms", (h,), False)
    if not c.tie_word_embeddings:  # tied, lm_head is the embedding tensor itself
        add("lm_head.weight", "embeddings", (c.vocab_size, h), True)
    return out


def bytes_by_role(tensors: list[WeightTensor]) -> dict[str, int]:
    totals = dict.fromkeys(ROLES, 0)
    for t in tensors:
        totals[t.role] += t.nbytes
    return totals


def expert_parallel_weights(tensors: list[WeightTensor], config: ModelConfig, ranks: int) -> dict[str, int]:
    """Bytes per role on the fullest rank when attention is data-parallel and the routed experts are split:
    every rank holds everything but the routed experts, of which it holds ceil(E / ranks)."""
    share = -(-config.n_routed_experts // ranks)
    totals = dict.fromkeys(ROLES, 0)
    for t in tensors:
        totals[t.role] += t.nbytes * share // config.n_routed_experts if t.role == "routed_experts" else t.nbytes
    return totals


def tensor_parallel_weights(tensors: list[WeightTensor], ranks: int) -> dict[str, int]:
    """Bytes per role on each rank under tensor parallelism: split tensors count 1/ranks (rounded up)."""
    totals = dict.fromkeys(ROLES, 0)
    for t in tensors:
        totals[t.role] += -(-t.nbytes // ranks) if t.tensor_parallel else t.nbytes
    return totals


def plan_capacity(
    config: ModelConfig,
    *,
    gpus: int,
    gpu_memory_gib: float,
    memory_utilization: float = 0.9,
    reserve_gib: float = 0.0,
    episode_tokens: int = 65536,
    dtype: torch.dtype = torch.bfloat16,
    int4_scale_dtype: torch.dtype = torch.bfloat16,
    block_size: int = 16,
    model: str = "",
) -> CapacityPlan:
    """Weights, KV cache and episodes per rank and in total for both layouts on `gpus` GPUs of `gpu_memory_gib`.

    Each rank may use gpu_memory x memory_utilization - reserve for weights and KV cache (the rest is left for
    activations, CUDA graphs, communication buffers and fragmentation); the KV cache takes what the weights leave,
    in whole blocks of `block_size` tokens, as the engine sizes it from kv_cache_gib.
    """
    if gpus < 1:
        raise PlanError(f"--gpus is {gpus}; it must be at least 1")
    if gpu_memory_gib <= 0:
        raise PlanError(f"--gpu-memory-gib is {gpu_memory_gib}; give the memory of one GPU in GiB (e.g. 139.8)")
    if not 0 < memory_utilization <= 1:
        raise PlanError(f"--memory-utilization is {memory_utilization}; it is a fraction in (0, 1]")
    if reserve_gib < 0 or episode_tokens < 1 or block_size < 1:
        raise PlanError("--reserve-gib must be >= 0, --episode-tokens and --block-size >= 1")
    tensors = weight_tensors(config, dtype, int4_scale_dtype)
    memory = int(gpu_memory_gib * GIB)
    reserve = int(reserve_gib * GIB)
    usable = int(memory * memory_utilization) - reserve
    block_bytes = kv_block_bytes(config, dtype, block_size)

    def layout(name: str, description: str, per_rank: dict[str, int], kv_ranks: int) -> LayoutPlan:
        weights = sum(per_rank.values())
        blocks = max(0, usable - weights) // block_bytes
        tokens = blocks * block_size
        return LayoutPlan(
            name=name,
            description=description,
            weight_bytes_per_rank=per_rank,
            weights_per_rank=weights,
            kv_cache_bytes_per_rank=blocks * block_bytes,
            kv_tokens_per_rank=tokens,
            kv_tokens_total=tokens * kv_ranks,
            episodes=(tokens // episode_tokens) * kv_ranks,
            fits=weights < usable and blocks > 0,
        )

    layouts = [
        layout(
            "dp_attention_ep_moe",
            f"attention data-parallel, routed experts split over {gpus} ranks (expert parallelism); each rank its own "
            "KV cache",
            expert_parallel_weights(tensors, config, gpus),
            gpus,
        ),
        layout(
            "tensor_parallel",
            f"tensor parallelism TP={gpus}; the MLA latent cache (one latent per token, shared by all heads) is "
            "replicated on every rank",
            tensor_parallel_weights(tensors, gpus),
            1,
        ),
    ]
    quant = config.quantization.method if config.quantization is not None else None
    dtype_name = str(dtype).removeprefix("torch.")
    scale_name = str(int4_scale_dtype).removeprefix("torch.") if quant == "int4" else None
    experts = {
        "int4": f"routed experts INT4 (int32 words of 8 values, {scale_name} scale per group of {GROUP_SIZE})",
        "fp8_block": f"block-FP8 weights dequantized to {dtype_name} on load",
        None: f"routed experts in {dtype_name} (config.json has no quantization_config)",
    }[quant]
    assumptions = [
        f"weights in {dtype_name} except the router's float32 correction bias; {experts}",
        f"KV cache in {dtype_name}: {config.kv_cache_dim} values (kv_lora_rank {config.kv_lora_rank} + rope "
        f"{config.qk_rope_head_dim}) per token per layer, {config.num_hidden_layers} layers, blocks of {block_size} "
        "tokens",
        f"per rank {gpu_memory_gib:g} GiB x {memory_utilization:g} utilization - {reserve_gib:g} GiB reserve = "
        f"{usable / GIB:.2f} GiB for weights and KV cache; the other {(memory - usable) / GIB:.2f} GiB is left for "
        "activations, CUDA graphs, communication buffers and fragmentation",
        "expert parallelism counts the fullest rank (ceil(experts / ranks) experts); tensor parallelism keeps "
        "q_a_proj, kv_a_proj_with_mqa, norms and router whole on every rank",
    ]
    return CapacityPlan(
        model=model,
        gpus=gpus,
        gpu_memory_bytes=memory,
        memory_utilization=memory_utilization,
        reserve_bytes=reserve,
        usable_bytes_per_rank=usable,
        dtype=dtype_name,
        int4_scale_dtype=scale_name,
        block_size=block_size,
        episode_tokens=episode_tokens,
        kv_bytes_per_token=kv_block_bytes(config, dtype, 1),
        weight_bytes=bytes_by_role(tensors),
        layouts=layouts,
        assumptions=assumptions,
    )


def _gib(nbytes: int) -> str:
    return f"{nbytes / GIB:,.2f}"


def format_plan(plan: CapacityPlan) -> str:
    """The plan as a table: GiB per role (whole model, then per rank of each layout), KV and episodes."""
    dp, tp = plan.layouts
    headers = ("", "whole model", "DP attn + EP MoE", f"TP={plan.gpus}")
    rows: list[tuple[str, ...]] = [("weights per rank, GiB", "", "", "")]
    for role in ROLES:
        rows.append(
            (
                f"  {ROLE_LABELS[role]}",
                _gib(plan.weight_bytes[role]),
                _gib(dp.weight_bytes_per_rank[role]),
                _gib(tp.weight_bytes_per_rank[role]),
            )
        )
    rows += [
        ("  total", _gib(sum(plan.weight_bytes.values())), _gib(dp.weights_per_rank), _gib(tp.weights_per_rank)),
        ("KV cache per rank, GiB", "", _gib(dp.kv_cache_bytes_per_rank), _gib(tp.kv_cache_bytes_per_rank)),
        ("KV tokens per rank", "", f"{dp.kv_tokens_per_rank:,}", f"{tp.kv_tokens_per_rank:,}"),
        ("KV tokens in total", "", f"{dp.kv_tokens_total:,}", f"{tp.kv_tokens_total:,} (replicated)"),
        (f"{plan.episode_tokens:,}-token episodes", "", f"{dp.episodes:,}", f"{tp.episodes:,}"),
    ]
    widths = [max(len(r[i]) for r in [headers, *rows]) for i in range(len(headers))]
    lines = [
        f"{plan.model}: {plan.gpus} GPUs of {plan.gpu_memory_bytes / GIB:g} GiB; KV cache {plan.kv_bytes_per_token:,} "
        "bytes per token",
        "",
        "  ".join(h.ljust(w) if i == 0 else h.rjust(w) for i, (h, w) in enumerate(zip(headers, widths))),
    ]
    for row in rows:
        lines.append("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))))
    for layout in plan.layouts:
        if not layout.fits:
            lines.append(
                f"{layout.name}: the weights ({layout.weights_per_rank / GIB:.2f} GiB per rank) leave no room for a "
                f"KV block in the {plan.usable_bytes_per_rank / GIB:.2f} GiB a rank may use"
            )
    lines += ["", "assumptions:", *(f"- {a}" for a in plan.assumptions)]
    return "\n".join(lines)
