"""Long agent episodes three ways: the engine's sessions vs a new request per step (prefix cache on) vs a naive loop
that prefills the whole context again every step (prefix cache off).

Many concurrent synthetic episodes on a random K2-shaped checkpoint (INT4 routed experts): each step generates a
fixed number of tokens (min_tokens = max_new_tokens, so end-of-sequence cannot cut it short) and appends a fixed-size
tool result, as K2 Thinking's long tool loops do. All three ways run in this process on the same model and print
prefill tokens, decode tokens, wall time and peak KV blocks in use, and the ratios. With --kv-fraction below 1 the
sessions also run on a cache that holds only that fraction of the episodes' final contexts: waiting sessions are
evicted and recomputed, and every episode must still finish with the same tokens.

    python benchmarks/bench_episodes.py                                   # 16 episodes x 300 steps
    python benchmarks/bench_episodes.py --episodes 64 --steps 300         # the issue's size (long on 2 cores)
    python benchmarks/bench_episodes.py --episodes 8 --steps 40 --kv-fraction 0.3   # a quick look
"""

from __future__ import annotations

import argparse
import tempfile
import time
from dataclasses import dataclass

import torch

from k2batch.engine import Engine, EngineConfig, SamplingParams
from k2batch.model import load_model
from k2batch.model.config import ModelConfig
from k2batch.model.export import random_model, save_checkpoint
from k2batch.model.layers import RoutedExperts

K2_SHAPED = dict(
    model_type="kimi_k2",
    vocab_size=4096,
    hidden_size=128,
    intermediate_size=256,
    moe_intermediate_size=64,
    num_hidden_layers=3,
    num_attention_heads=4,
    q_lora_rank=64,
    kv_lora_rank=64,
    qk_nope_head_dim=32,
    qk_rope_head_dim=16,
    v_head_dim=32,
    n_routed_experts=16,
    n_shared_experts=1,
    num_experts_per_tok=4,
    n_group=1,
    topk_group=1,
    first_k_dense_replace=1,
    routed_scaling_factor=2.827,
    max_position_embeddings=131072,
    eos_token_id=1,
    rope_theta=50000.0,
)


@dataclass
class Run:
    name: str
    wall_s: float
    prefill_tokens: int
    decode_tokens: int
    peak_blocks: int
    evicted_sessions: int
    outputs: list[list[list[int]]]  # per episode, per step: the generated ids


def episodes(model, args, *, sessions: bool, prefix_cache: bool, num_blocks: int, name: str) -> Run:
    """Run every episode to its last step; each step is a request, continued from the last one with `sessions`."""
    engine = Engine(
        model,
        EngineConfig(
            max_num_seqs=args.episodes,
            max_num_batched_tokens=4096,
            enable_prefix_caching=prefix_cache,
            num_kv_blocks=num_blocks,
        ),
    )
    g = torch.Generator().manual_seed(0)
    vocab = K2_SHAPED["vocab_size"]
    system = torch.randint(3, vocab, (args.system_tokens,), generator=g).tolist()
    contexts = [
        system + torch.randint(3, vocab, (args.user_tokens,), generator=g).tolist() for _ in range(args.episodes)
    ]
    results = [
        [torch.randint(3, vocab, (args.result_tokens,), generator=g).tolist() for _ in range(args.steps)]
        for _ in range(args.episodes)
    ]
    params = SamplingParams(temperature=0, max_new_tokens=args.gen_tokens, min_tokens=args.gen_tokens)
    outputs: list[list[list[int]]] = [[] for _ in range(args.episodes)]
    last: dict[str, int] = {}

    def submit(e: int, previous: str | None) -> None:
        rid = engine.add_request(
            contexts[e],
            params,
            request_id=f"{e}:{len(outputs[e])}",
            keep_kv=sessions,
            continue_from=previous if sessions else None,
        )
        last[rid] = e

    started = time.perf_counter()
    for e in range(args.episodes):
        submit(e, None)
    peak, tick = 0, 0
    tools: list[tuple[int, int, str]] = []  # (engine step the result is back, episode, request to continue)
    while engine.has_unfinished() or tools:
        tick += 1
        for out in engine.step():
            if out.finish_reason == "error":
                raise RuntimeError(f"episode {out.request_id}: {out.error}")
            e = last.pop(out.request_id)
            outputs[e].append(out.token_ids)
            if len(outputs[e]) == args.steps:
                engine.release(out.request_id)
                continue
            contexts[e] = contexts[e] + out.token_ids + results[e][len(outputs[e]) - 1]
            tools.append((tick + 1 + e % max(1, args.tool_steps), e, out.request_id))
        for back in [t for t in tools if t[0] <= tick]:
            tools.remove(back)
            submit(back[1], back[2])
        kv = engine.kv
        peak = max(peak, kv.num_blocks - kv.num_allocatable)
    wall = time.perf_counter() - started
    s = engine.stats
    return Run(name, wall, s.prefill_tokens, s.decode_tokens, peak, s.evicted_sessions, outputs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--episodes", type=int, default=16)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--gen-tokens", type=int, default=8, help="tokens generated per step")
    ap.add_argument("--result-tokens", type=int, default=24, help="tokens of the tool result appended per step")
    ap.add_argument("--system-tokens", type=int, default=64, help="prompt tokens every episode shares")
    ap.add_argument("--user-tokens", type=int, default=32, help="prompt tokens of each episode's own")
    ap.add_argument(
        "--kv-fraction",
        type=float,
        default=0.25,
        help="also run the sessions on a cache that holds this fraction of all final contexts (1: skip)",
    )
    ap.add_argument("--skip-naive", action="store_true", help="leave out way (c), the slowest by far")
    ap.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads; this model's ops are too small to split, so more threads only contend",
    )
    ap.add_argument(
        "--tool-steps",
        type=int,
        default=4,
        help="engine steps a tool takes: episode e's result comes back 1 + e %% N steps after its turn "
        "ends, so sessions wait while others decode",
    )
    args = ap.parse_args()
    torch.set_grad_enabled(False)
    torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as tmp:
        save_checkpoint(random_model(ModelConfig.from_dict(K2_SHAPED), seed=0), tmp, int4_experts=True)
        model = load_model(tmp)
    for module in model.modules():  # INT4 experts dequantized once, before any timing: faster on CPU
        if isinstance(module, RoutedExperts):
            module.dequantize_(model.dtype)
    block = EngineConfig().block_size
    prompt = args.system_tokens + args.user_tokens
    final = prompt + args.steps * (args.gen_tokens + args.result_tokens)
    roomy = args.episodes * (-(-final // block) + 2) + 64
    # The least any way can prefill: the shared system prompt once, each episode's own prompt, and per later step
    # the tool result plus the last generated token (sampled, so never run through the model before).
    new_tokens = args.system_tokens + args.episodes * (args.user_tokens + (args.steps - 1) * (args.result_tokens + 1))
    print(
        f"{args.episodes} episodes x {args.steps} steps: {args.gen_tokens} generated + {args.result_tokens} tool "
        f"result tokens a step, final context {final:,} tokens; new tokens (the least any way can prefill) "
        f"{new_tokens:,}; threads {torch.get_num_threads()}"
    )

    runs = [episodes(model, args, sessions=True, prefix_cache=True, num_blocks=roomy, name="(a) sessions")]
    runs.append(
        episodes(
            model, args, sessions=False, prefix_cache=True, num_blocks=roomy, name="(b) request per step, prefix cache"
        )
    )
    if not args.skip_naive:
        runs.append(
            episodes(
                model,
                args,
                sessions=False,
                prefix_cache=False,
                num_blocks=roomy,
                name="(c) naive: prefill everything each step",
            )
        )
    if args.kv_fraction < 1:
        tight = max(-(-final // block) + 2, int(roomy * args.kv_fraction))
        runs.append(
            episodes(
                model,
                args,
                sessions=True,
                prefix_cache=True,
                num_blocks=tight,
                name=f"(a) sessions, cache {tight / roomy:.0%} of all contexts",
            )
        )

    a = runs[0]
    print(f"{'':44s} {'wall s':>8s} {'prefill tok':>12s} {'decode tok':>11s} {'peak blocks':>11s} {'evicted':>8s}")
    for r in runs:
        print(
            f"{r.name:44s} {r.wall_s:8.1f} {r.prefill_tokens:12,} {r.decode_tokens:11,} {r.peak_blocks:11,} "
            f"{r.evicted_sessions:8,}"
        )
        assert r.outputs == a.outputs, f"{r.name}: the episodes generated other tokens than (a)"
    print(f"(a) prefill vs new tokens: {a.prefill_tokens / new_tokens - 1:+.2%}")
    for r in runs[1:]:
        print(
            f"{r.name}: {r.wall_s / a.wall_s:.2f}x the wall time of (a), {r.prefill_tokens / a.prefill_tokens:.2f}x "
            f"its prefill tokens"
        )
    print("every way generated the same tokens")


if __name__ == "__main__":
    main()
