"""The `k2batch` command."""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

import torch

WORKSPACE = Path(__file__).resolve().parent.parent / "workspace"


def demo(args: argparse.Namespace) -> None:
    """Build (once) a small random model of the K2 architecture with INT4 experts under workspace/, then run a
    batch of agent-shaped requests (a shared system prefix, ragged user turns) through the engine."""
    from k2batch.engine import Engine, EngineConfig, SamplingParams
    from k2batch.model.config import ModelConfig
    from k2batch.model.export import random_model, save_checkpoint

    path = Path(args.model)
    if not (path / "config.json").exists():
        config = ModelConfig.from_dict(
            dict(
                model_type="kimi_k2", vocab_size=4096, hidden_size=256, intermediate_size=512,
                moe_intermediate_size=128, num_hidden_layers=4, num_attention_heads=4, q_lora_rank=96,
                kv_lora_rank=64, qk_nope_head_dim=32, qk_rope_head_dim=32, v_head_dim=32, n_routed_experts=16,
                n_shared_experts=1, num_experts_per_tok=4, n_group=4, topk_group=2, first_k_dense_replace=1,
                routed_scaling_factor=2.827, max_position_embeddings=8192, eos_token_id=1,
                rope_theta=50000.0, rope_scaling={"type": "yarn", "factor": 32.0, "mscale": 1.0, "mscale_all_dim": 1.0,
                                                  "original_max_position_embeddings": 256, "beta_fast": 1.0, "beta_slow": 1.0},
            )
        )  # fmt: skip
        save_checkpoint(random_model(config, seed=0), path, int4_experts=True)
        print(f"wrote a random K2-architecture checkpoint (INT4 experts) to {path}")
    # On CPU, unpacking INT4 experts on every step costs more than the matmuls: dequantize them once.
    engine = Engine.from_pretrained(str(path), EngineConfig(max_num_seqs=64, show_progress=True, dequantize_int4=True))
    g = torch.Generator().manual_seed(0)
    vocab = engine.model.config.vocab_size
    system = torch.randint(2, vocab, (512,), generator=g).tolist()
    prompts = [system + torch.randint(2, vocab, (int(torch.randint(16, 128, (1,), generator=g)),), generator=g).tolist()
               for _ in range(args.requests)]  # fmt: skip
    start = time.perf_counter()
    outputs = engine.generate(prompts, SamplingParams(temperature=1.0, top_p=0.95, max_new_tokens=args.new_tokens, seed=0))
    elapsed = time.perf_counter() - start
    s = engine.stats
    print(f"{len(outputs)} requests, {s.decode_tokens} output tokens in {elapsed:.1f} s "
          f"({s.decode_tokens / elapsed:.0f} tok/s); prefilled {s.prefill_tokens} of "
          f"{sum(map(len, prompts))} prompt tokens ({s.cached_tokens} from the prefix cache); "
          f"preemptions {s.preemptions}")  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="k2batch", description="Offline batch inference for Kimi K2-family models")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("demo", help="run the demo batch on the embedded default")
    p.add_argument("--model", default=str(WORKSPACE / "models" / "k2-random"))
    p.add_argument("--requests", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=64)
    p.set_defaults(func=demo)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args.func(args)


if __name__ == "__main__":
    main()
