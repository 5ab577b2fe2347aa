"""The capacity planner against real tensors: a small K2 saved by k2batch (dense and INT4 experts) and loaded back,
its bytes grouped by role and split over ranks; the KV and episode arithmetic; K2 Thinking's figures; `k2batch plan`."""

from __future__ import annotations

import json
import re
from pathlib import Path

import fsspec
import pytest
import torch
from safetensors import safe_open

from k2batch.capacity import (
    GIB,
    ROLES,
    PlanError,
    plan_capacity,
    read_model_config,
    weight_tensors,
)
from k2batch.cli import main
from k2batch.model import load_model
from k2batch.model.config import ModelConfig
from k2batch.model.export import config_dict, random_model, save_checkpoint

SMALL = dict(
    model_type="kimi_k2",
    vocab_size=256,
    hidden_size=64,
    intermediate_size=96,
    moe_intermediate_size=32,
    num_hidden_layers=3,
    first_k_dense_replace=1,
    num_attention_heads=4,
    q_lora_rank=48,
    kv_lora_rank=32,
    qk_nope_head_dim=16,
    qk_rope_head_dim=16,
    v_head_dim=16,
    n_routed_experts=8,
    n_shared_experts=1,
    num_experts_per_tok=2,
    n_group=1,
    topk_group=1,
    routed_scaling_factor=2.827,
    rope_theta=50000.0,
)
_EXPERT = re.compile(r"\.mlp\.experts\.(\d+)\.")
# Under tensor parallelism these stay whole on every rank: the latent's own projections, norms and the router.
_WHOLE_UNDER_TP = re.compile(r"(q_a_proj|kv_a_proj_with_mqa)\.weight$|norm\.weight$|\.mlp\.gate\.")


def role_of(name: str) -> str:
    """The planner's role of a checkpoint tensor, from its HF name."""
    if name.endswith("norm.weight"):
        return "norms"
    if ".mlp.experts." in name:
        return "routed_experts"
    if ".mlp.gate." in name:
        return "router"
    if ".mlp.shared_experts." in name:
        return "shared_experts"
    if ".self_attn." in name:
        return "attention"
    if ".mlp." in name:
        return "dense_mlp"
    assert name in ("model.embed_tokens.weight", "lm_head.weight"), name
    return "embeddings"


def checkpoint_tensors(path: Path) -> dict[str, torch.Tensor]:
    """The saved tensors the loaded model holds: `weight_shape` companions are only read to check a packed
    weight's shape, so the model keeps nothing of them."""
    with safe_open(path / "model.safetensors", "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys() if not k.endswith(".weight_shape")}


def nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def by_role(tensors: dict[str, torch.Tensor], ranks: int = 1, layout: str = "whole") -> dict[str, int]:
    """Bytes per role of the checkpoint's tensors on one rank: all of them, the first rank's expert share
    (expert parallelism), or whole/split tensors (tensor parallelism; split ones divide by `ranks`)."""
    totals = dict.fromkeys(ROLES, 0)
    share = range(-(-SMALL["n_routed_experts"] // ranks))
    for name, t in tensors.items():
        role = role_of(name)
        if layout == "expert" and role == "routed_experts":
            if int(_EXPERT.search(name).group(1)) in share:
                totals[role] += nbytes(t)
        elif layout == "tensor" and not _WHOLE_UNDER_TP.search(name):
            assert nbytes(t) % ranks == 0, name
            totals[role] += nbytes(t) // ranks
        else:
            totals[role] += nbytes(t)
    return totals


@pytest.fixture(scope="module", params=[True, False], ids=["int4", "dense"])
def saved(request, tmp_path_factory) -> tuple[ModelConfig, Path]:
    config = ModelConfig.from_dict(SMALL)
    path = save_checkpoint(random_model(config), tmp_path_factory.mktemp("ckpt"), int4_experts=request.param)
    return read_model_config(str(path))[1], path


def test_weight_bytes_by_role_equal_the_saved_checkpoints(saved) -> None:
    config, path = saved
    tensors = checkpoint_tensors(path)
    plan = plan_capacity(config, gpus=1, gpu_memory_gib=1.0, dtype=torch.float32)
    assert plan.weight_bytes == by_role(tensors)
    assert all(plan.weight_bytes[role] > 0 for role in ROLES)
    assert (config.quantization is not None) == any(k.endswith("weight_packed") for k in tensors)


def test_weight_tensors_are_the_loaded_models(saved) -> None:
    config, path = saved
    model = load_model(path, dtype=torch.bfloat16)
    held = {n: (tuple(t.shape), t.dtype) for n, t in [*model.named_parameters(), *model.named_buffers()]}
    planned = {t.name: (t.shape, getattr(torch, t.dtype)) for t in weight_tensors(config, torch.bfloat16)}
    assert planned == held
    plan = plan_capacity(config, gpus=1, gpu_memory_gib=1.0, dtype=torch.bfloat16)
    assert sum(plan.weight_bytes.values()) == sum(t.numel() * t.element_size() for t in model.state_dict().values())


@pytest.mark.parametrize("ranks", [2, 3, 4])
def test_layouts_divide_the_real_tensors(saved, ranks: int) -> None:
    config, path = saved
    tensors = checkpoint_tensors(path)
    dp, tp = plan_capacity(config, gpus=ranks, gpu_memory_gib=1.0, dtype=torch.float32).layouts
    expert = by_role(tensors, ranks, "expert")
    assert dp.weight_bytes_per_rank == expert
    whole = by_role(tensors)
    routed = whole.pop("routed_experts")
    expert.pop("routed_experts")
    assert expert == whole  # everything else is whole on every rank
    if ranks != 3:  # the small model's dimensions divide by 2 and 4
        assert tp.weight_bytes_per_rank == by_role(tensors, ranks, "tensor")
        assert tp.weight_bytes_per_rank["routed_experts"] == routed // ranks
        assert dp.weight_bytes_per_rank["routed_experts"] == routed // ranks
    else:  # 8 experts over 3 ranks: the fullest holds 3
        assert dp.weight_bytes_per_rank["routed_experts"] == routed * 3 // 8


def test_kv_capacity_and_episodes_per_layout() -> None:
    config = ModelConfig.from_dict(SMALL)
    per_token = 3 * (32 + 16) * 2  # layers x (kv_lora_rank + rope) values x bf16
    block = 16 * per_token
    probe = plan_capacity(config, gpus=4, gpu_memory_gib=1.0, dtype=torch.bfloat16, block_size=16)
    assert probe.kv_bytes_per_token == per_token
    dp_weights, tp_weights = (layout.weights_per_rank for layout in probe.layouts)
    # Memory for the DP layout's weights plus 100.5 blocks: 100 whole blocks of KV per rank.
    memory = dp_weights + 100.5 * block
    plan = plan_capacity(
        config,
        gpus=4,
        gpu_memory_gib=(memory + 2 * GIB) / GIB,
        reserve_gib=2.0,
        memory_utilization=1.0,
        episode_tokens=48 * 16,
        dtype=torch.bfloat16,
        block_size=16,
    )
    dp, tp = plan.layouts
    assert (dp.kv_tokens_per_rank, dp.kv_tokens_total, dp.kv_cache_bytes_per_rank) == (1600, 6400, 100 * block)
    assert dp.episodes == 4 * 2  # an episode stays on its rank: 100 blocks hold two of 48 blocks, four ranks
    tp_blocks = (plan.usable_bytes_per_rank - tp_weights) // block
    assert tp_blocks > 100
    assert tp.kv_tokens_per_rank == tp.kv_tokens_total == tp_blocks * 16  # the latent cache is replicated
    assert tp.episodes == tp_blocks // 48
    assert dp.fits and tp.fits
    half = plan_capacity(config, gpus=4, gpu_memory_gib=memory / GIB, memory_utilization=0.5, dtype=torch.bfloat16)
    assert half.usable_bytes_per_rank == int(half.gpu_memory_bytes * 0.5)
    tight = plan_capacity(config, gpus=4, gpu_memory_gib=(dp_weights + block // 2) / GIB, memory_utilization=1.0)
    assert not tight.layouts[0].fits and tight.layouts[0].kv_tokens_total == 0


def test_kimi_k2_thinking_figures() -> None:
    name, config = read_model_config("kimi-k2-thinking")
    assert (config.hidden_size, config.num_hidden_layers, config.first_k_dense_replace) == (7168, 61, 1)
    assert (config.n_routed_experts, config.num_experts_per_tok, config.n_shared_experts) == (384, 8, 1)
    mla = (config.q_lora_rank, config.kv_lora_rank, config.qk_nope_head_dim, config.qk_rope_head_dim, config.v_head_dim)
    assert (mla, config.num_attention_heads, config.moe_intermediate_size) == ((1536, 512, 128, 64, 128), 64, 2048)
    assert config.intermediate_size == 18432
    assert (config.vocab_size, config.max_position_embeddings, config.quantization.method) == (163840, 262144, "int4")
    h200 = plan_capacity(config, gpus=8, gpu_memory_gib=139.8, model=name)
    assert h200.kv_bytes_per_token == 61 * 576 * 2
    # One routed expert of one layer: 3 x 7168 x 2048 INT4 values (half a byte) + a bf16 scale per 32.
    expert = 3 * 7168 * 2048 // 2 + 3 * 7168 * 2048 // 32 * 2
    assert h200.weight_bytes["routed_experts"] == 60 * 384 * expert
    dp, tp = h200.layouts
    assert dp.weight_bytes_per_rank["routed_experts"] == tp.weight_bytes_per_rank["routed_experts"] == 60 * 48 * expert
    assert dp.kv_tokens_total == 8 * dp.kv_tokens_per_rank and tp.kv_tokens_total == tp.kv_tokens_per_rank
    assert dp.kv_tokens_total > 5 * tp.kv_tokens_total
    # The README's table: 8 x H200 and 8 x H100 at 0.9 utilization.
    assert (dp.kv_tokens_per_rank, dp.episodes, tp.kv_tokens_per_rank, tp.episodes) == (573_600, 64, 838_384, 12)
    # vLLM's published TP8 figure is the TP=8 row with 8.07 GiB more held back; the same for DP + EP.
    dp, tp = plan_capacity(config, gpus=8, gpu_memory_gib=139.8, reserve_gib=8.07).layouts
    assert (tp.kv_tokens_total, dp.kv_tokens_total, dp.episodes) == (715_072, 3_602_304, 48)
    dp, tp = plan_capacity(config, gpus=8, gpu_memory_gib=79.1).layouts
    assert not dp.fits and tp.kv_tokens_total == 3_648 and tp.episodes == 0


def test_plan_command_reads_a_directory_a_config_json_and_a_uri(tmp_path: Path, capsys) -> None:
    config = ModelConfig.from_dict(SMALL)
    raw = {**config_dict(config), "quantization_config": None}
    (tmp_path / "config.json").write_text(json.dumps(raw))
    with fsspec.open("memory://plan-test/ckpt/config.json", "w") as f:
        f.write(json.dumps(raw))
    outputs = []
    for source in (str(tmp_path), str(tmp_path / "config.json"), "memory://plan-test/ckpt"):
        main(["plan", "--model", source, "--gpus", "2", "--gpu-memory-gib", "0.5", "--json"])
        outputs.append(json.loads(capsys.readouterr().out))
    assert outputs[0]["layouts"] == outputs[1]["layouts"] == outputs[2]["layouts"]
    expected = plan_capacity(config, gpus=2, gpu_memory_gib=0.5)
    assert outputs[0]["layouts"][0]["kv_tokens_total"] == expected.layouts[0].kv_tokens_total > 0

    main(["plan", "--model", "kimi-k2-thinking", "--gpus", "8", "--gpu-memory-gib", "139.8"])
    table = capsys.readouterr().out
    assert "4,588,800" in table and "838,384 (replicated)" in table and "routed experts" in table


def test_plan_command_errors_name_the_file(tmp_path: Path, capsys) -> None:
    with pytest.raises(SystemExit) as exit:
        main(["plan", "--model", str(tmp_path / "nowhere"), "--gpus", "8", "--gpu-memory-gib", "139.8"])
    assert exit.value.code == 2
    assert "nowhere/config.json: no such file" in capsys.readouterr().err
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(PlanError, match="model_type 'llama' is not supported"):
        read_model_config(str(tmp_path))
    with pytest.raises(PlanError, match="--gpus is 0"):
        plan_capacity(ModelConfig.from_dict(SMALL), gpus=0, gpu_memory_gib=80)
