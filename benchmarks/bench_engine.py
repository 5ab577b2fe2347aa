"""Offline throughput: transformers' batched generate vs the k2batch engine on the same random K2-shaped checkpoint;
and the engine's step overhead.

Throughput: both sides run in this process on the same weights (INT4 routed experts, dequantized for transformers) and
the same ragged prompts, half of them sharing a long prefix. Checks that the engine's greedy outputs equal
transformers', then prints output tokens/s of each, their ratio, and prefill tokens computed by the engine against the
distinct prompt tokens (the trie minimum).

Step overhead: on a tiny model (where the model itself costs little) with every decode slot full, the median time of
one whole engine step (schedule, plan tensors, forward, sampling, update) against the median time of the bare model
forward (and logits) on the same step's tensors, greedy and sampled (temperature 1, top-p 0.95).

    python benchmarks/bench_engine.py                      # both: 256 requests, 128 new tokens; 256 decode slots
    python benchmarks/bench_engine.py --requests 32 --new-tokens 16   # a quick look
    python benchmarks/bench_engine.py --only overhead      # the step overhead alone (no transformers needed)
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from k2batch.engine import Engine, EngineConfig, SamplingParams
from k2batch.engine.model_runner import PagedAttention
from k2batch.engine.prefix_cache import common_prefix_len
from k2batch.kernels.int4_moe import pack_int4, quantize_int4, unpack_int4
from k2batch.model import load_model
from k2batch.model.config import ModelConfig
from k2batch.model.export import random_model
from k2batch.model.layers import Router

K2_SHAPED = dict(
    vocab_size=16384,
    hidden_size=512,
    intermediate_size=1408,
    moe_intermediate_size=256,
    num_hidden_layers=8,
    num_attention_heads=8,
    num_key_value_heads=8,
    n_shared_experts=1,
    n_routed_experts=64,
    kv_lora_rank=128,
    q_lora_rank=192,
    qk_rope_head_dim=32,
    v_head_dim=64,
    qk_nope_head_dim=64,
    n_group=1,
    topk_group=1,
    num_experts_per_tok=6,
    first_k_dense_replace=1,
    norm_topk_prob=True,
    routed_scaling_factor=2.827,
    max_position_embeddings=4096,
    rope_parameters={"rope_type": "default", "rope_theta": 50000.0},
    bos_token_id=0,
    eos_token_id=1,
    pad_token_id=2,
)


def build_checkpoint(path: Path):
    """A random K2-shaped checkpoint with INT4 routed experts; returns transformers' model on the same weights."""
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    torch.manual_seed(0)
    hf = DeepseekV3ForCausalLM(DeepseekV3Config(**K2_SHAPED)).eval()
    with torch.no_grad():
        for p in hf.parameters():
            if p.dim() >= 2:
                p.normal_(0, p.shape[-1] ** -0.5)
    hf.save_pretrained(path)
    tensors = load_file(path / "model.safetensors")
    out, dense = {}, {}
    for key, w in tensors.items():
        if ".mlp.experts." in key and key.endswith(".weight"):
            q, scale = quantize_int4(w)
            prefix = key.removesuffix(".weight")
            out[f"{prefix}.weight_packed"], out[f"{prefix}.weight_scale"] = pack_int4(q), scale
            out[f"{prefix}.weight_shape"] = torch.tensor(w.shape)
            dense[key] = unpack_int4(out[f"{prefix}.weight_packed"], scale, torch.float32)
        else:
            out[key] = w
    save_file(out, path / "model.safetensors")
    cfg = json.loads((path / "config.json").read_text())
    cfg["model_type"] = "kimi_k2"
    cfg["quantization_config"] = {
        "quant_method": "compressed-tensors",
        "format": "pack-quantized",
        "config_groups": {
            "group_0": {
                "targets": ["Linear"],
                "weights": {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "group", "group_size": 32},
            }
        },
    }
    (path / "config.json").write_text(json.dumps(cfg))
    inter = K2_SHAPED["moe_intermediate_size"]
    with torch.no_grad():  # transformers sees exactly the dequantized INT4 values
        for key, w in dense.items():
            layer_prefix, expert, proj = key.removesuffix(".weight").rsplit(".", 2)
            experts = hf.get_submodule(layer_prefix)
            e = int(expert)
            if proj == "down_proj":
                experts.down_proj[e] = w
            else:
                experts.gate_up_proj[
                    e, (0 if proj == "gate_proj" else inter) : (inter if proj == "gate_proj" else 2 * inter)
                ] = w
    return hf


def make_prompts(n: int, prefix_len: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    prefix = torch.randint(3, K2_SHAPED["vocab_size"], (prefix_len,), generator=g).tolist()
    prompts = []
    for i in range(n):
        tail = torch.randint(3, K2_SHAPED["vocab_size"], (int(torch.randint(8, 64, (1,), generator=g)),), generator=g)
        prompts.append((prefix if i % 2 == 0 else []) + tail.tolist())
    return prompts


def distinct_prefixes(prompts: list[list[int]]) -> int:
    """Distinct token prefixes among the prompts (the nodes of their token trie): the fewest tokens any prefill
    can compute. In sorted order, each prompt adds the tokens past its longest common prefix with the one before."""
    ordered = sorted(prompts)
    return sum(len(p) - common_prefix_len(p, q) for p, q in zip(ordered, [[]] + ordered))


def run_transformers(hf, prompts: list[list[int]], new_tokens: int, batch_size: int) -> tuple[float, list[list[int]]]:
    """Batched greedy generate with left padding; returns seconds and the generated ids."""
    pad = K2_SHAPED["pad_token_id"]
    outputs = []
    start = time.perf_counter()
    for i in range(0, len(prompts), batch_size):
        chunk = prompts[i : i + batch_size]
        width = max(len(p) for p in chunk)
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in chunk])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk])
        with torch.no_grad():
            out = hf.generate(
                ids,
                attention_mask=mask,
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                do_sample=False,
                pad_token_id=pad,
            )
        outputs.extend(out[:, width:].tolist())
    return time.perf_counter() - start, outputs


def divergence(model, prompt: list[int], got: list[int], ref: list[int], index: int) -> str:
    """Where two greedy outputs part, scored again alone in float32: the gap between the two tokens' logits, which
    side the lone forward agrees with, and the smallest margin between the k-th and (k+1)-th expert of any MoE layer
    at that step. A margin near float32 rounding is a routing tie that batch-dependent rounding decides either way
    (a flipped expert moves the logits by a large amount); a wide margin with a large logit gap would be a bug."""
    at = common_prefix_len(got, ref)
    margins = []

    def hook(router, args, _out):
        x = args[0][-1:].float()
        choice = F.linear(x, router.weight.float()).sigmoid() + router.e_score_correction_bias
        top = choice.topk(router.top_k + 1, dim=-1).values[0]
        margins.append((top[-2] - top[-1]).item())

    hooks = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, Router)]
    try:
        logits = model.score(torch.tensor([prompt + ref[:at]]))[0, -1].float()
    finally:
        for h in hooks:
            h.remove()
    best = int(logits.argmax())
    side = "engine" if best == got[at] else "transformers" if best == ref[at] else "neither"
    return (
        f"request {index}: first differs at output token {at} (engine {got[at]}, transformers {ref[at]}); "
        f"logit gap {abs(logits[got[at]] - logits[ref[at]]).item():.2e} of scale {logits.abs().mean().item():.2e}, "
        f"the lone forward agrees with {side}; smallest expert top-k margin {min(margins):.1e}"
    )


TINY = dict(
    model_type="kimi_k2",
    vocab_size=1024,
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
    n_routed_experts=4,
    n_shared_experts=1,
    num_experts_per_tok=2,
    n_group=1,
    topk_group=1,
    first_k_dense_replace=1,
    routed_scaling_factor=2.827,
    max_position_embeddings=4096,
    eos_token_id=1,
    rope_theta=50000.0,
)


def _median(values: list[float]) -> float:
    return sorted(values)[len(values) // 2]


def step_overhead(slots: int, steps: int, params: SamplingParams) -> tuple[float, float]:
    """Median seconds of one engine step with `slots` sequences decoding, and of the bare forward on its tensors."""
    model = random_model(ModelConfig.from_dict(TINY))
    engine = Engine(model, EngineConfig(max_num_seqs=slots, max_num_batched_tokens=8192, num_kv_blocks=slots * 16))
    g = torch.Generator().manual_seed(0)
    for _ in range(slots):
        engine.add_request(torch.randint(3, TINY["vocab_size"], (32,), generator=g).tolist(), params)
    execute, plans = engine.runner.execute, []
    engine.runner.execute = lambda plan: plans.append(plan) or execute(plan)
    while not plans or plans[-1].num_decode < slots:  # prefill until every slot decodes
        engine.step()
    step_s = []
    for _ in range(steps):
        started = time.perf_counter()
        engine.step()
        step_s.append(time.perf_counter() - started)
    plan = plans[-1]
    assert plan.num_decode == plan.num_rows == slots, "the timed steps must be decode-only with every slot full"
    attention = PagedAttention(engine.runner.kv_cache, plan, model.device)
    last = (plan.query_start[1:] - 1)[plan.sample_rows]
    forward_s = []
    for _ in range(steps):
        started = time.perf_counter()
        model.compute_logits(model(plan.input_ids, plan.positions, attention)[last]).float()
        forward_s.append(time.perf_counter() - started)
    return _median(step_s), _median(forward_s)


def report_step_overhead(slots: int, steps: int) -> None:
    for name, params in [
        ("greedy", SamplingParams(temperature=0, max_new_tokens=steps + 8, ignore_eos=True)),
        ("sampled", SamplingParams(temperature=1.0, top_p=0.95, max_new_tokens=steps + 8, ignore_eos=True)),
    ]:
        step, forward = step_overhead(slots, steps, params)
        print(
            f"step overhead, {slots} decode slots, {name:7s}: engine step {step * 1e3:6.2f} ms, bare forward "
            f"{forward * 1e3:6.2f} ms, ratio {step / forward:.2f}x (tiny model, threads {torch.get_num_threads()})"
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=256)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--prefix", type=int, default=250, help="tokens of the prefix shared by half the prompts")
    ap.add_argument("--hf-batch", type=int, default=64, help="transformers batch size")
    ap.add_argument("--slots", type=int, default=128, help="engine decode slots")
    ap.add_argument("--overhead-slots", type=int, default=256, help="decode slots of the step-overhead figure")
    ap.add_argument("--overhead-steps", type=int, default=40, help="timed steps of the step-overhead figure")
    ap.add_argument("--only", choices=("throughput", "overhead"), help="run one of the two parts")
    args = ap.parse_args()
    torch.set_grad_enabled(False)
    if args.only != "throughput":
        report_step_overhead(args.overhead_slots, args.overhead_steps)
    if args.only == "overhead":
        return

    with tempfile.TemporaryDirectory() as tmp:
        hf = build_checkpoint(Path(tmp))
        model = load_model(tmp)
    prompts = make_prompts(args.requests, args.prefix)
    out_tokens = args.requests * args.new_tokens
    distinct = distinct_prefixes(prompts)

    hf_s, hf_outputs = run_transformers(hf, prompts, args.new_tokens, args.hf_batch)
    config = EngineConfig(max_num_seqs=args.slots, max_num_batched_tokens=4096, dequantize_int4=True, kv_cache_gib=2.0)
    engine = Engine(model, config)
    start = time.perf_counter()
    outputs = engine.generate(prompts, SamplingParams(temperature=0, max_new_tokens=args.new_tokens, ignore_eos=True))
    engine_s = time.perf_counter() - start
    assert sum(len(o.token_ids) for o in outputs) == out_tokens
    same = sum(o.token_ids == ref for o, ref in zip(outputs, hf_outputs))

    print(
        f"requests {args.requests}, new tokens {args.new_tokens}, prompt tokens {sum(map(len, prompts))}, "
        f"distinct prompt tokens {distinct}, threads {torch.get_num_threads()}"
    )
    print(f"transformers generate (batch {args.hf_batch}): {hf_s:8.1f} s  {out_tokens / hf_s:8.1f} output tok/s")
    print(f"k2batch engine ({args.slots} slots):       {engine_s:8.1f} s  {out_tokens / engine_s:8.1f} output tok/s")
    print(f"ratio engine / transformers: {hf_s / engine_s:.2f}x")
    print(f"greedy outputs equal to transformers': {same}/{args.requests} requests")
    for i, (o, ref) in enumerate(zip(outputs, hf_outputs)):
        if o.token_ids != ref:
            print("  " + divergence(model, prompts[i], o.token_ids, ref, i))
    extra = engine.stats.prefill_tokens / distinct - 1
    print(
        f"engine prefill tokens {engine.stats.prefill_tokens} vs distinct {distinct}: {extra:+.1%} "
        f"(cached {engine.stats.cached_tokens}, prefix-cache hits {engine.prefix_cache_stats()})"
    )


if __name__ == "__main__":
    main()
