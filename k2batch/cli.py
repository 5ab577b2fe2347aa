"""The `k2batch` command."""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

import polars as pl
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


def run(args: argparse.Namespace) -> None:
    """Run a batch: every shard of --input not yet complete under --output."""
    from k2batch.agent import run_batch
    from k2batch.config import load_config

    summary = run_batch(args.input, args.output, load_config(args.config))
    print(f"{summary['rows']} rows: {summary['rows_by_status']}; summary at {args.output}/summary.json")


def inspect_table(output: str, config_path: str | None) -> pl.DataFrame:
    """Per status and task: jobs, steps, tokens, cache hit rate, throughput and API-equivalent cost."""
    from k2batch.config import load_config
    from k2batch.storage import join, polars_storage_options, read_json

    config = load_config(config_path)
    options = config.storage.options
    summary = read_json(join(output, "summary.json"), options)
    prices = config.prices
    results = pl.scan_parquet(
        join(output, "results", "**", "*.parquet"),
        hive_partitioning=True,
        storage_options=polars_storage_options(output, options) or None,
    )
    uncached = pl.col("prompt_tokens") - pl.col("cached_prompt_tokens")
    return (
        results.group_by("status", "task")
        .agg(
            jobs=pl.len(),
            steps=pl.col("steps").sum(),
            tool_calls=pl.col("tool_calls").sum(),
            prompt_tokens=pl.col("prompt_tokens").sum(),
            cached_prompt_tokens=pl.col("cached_prompt_tokens").sum(),
            completion_tokens=pl.col("completion_tokens").sum(),
            cost_usd=(
                uncached * prices.input + pl.col("cached_prompt_tokens") * prices.cached_input
                + pl.col("completion_tokens") * prices.output
            ).sum() / 1e6,
        )  # fmt: skip
        .with_columns(
            cache_hit_rate=pl.col("cached_prompt_tokens") / pl.col("prompt_tokens").clip(lower_bound=1),
            output_tok_s=pl.col("completion_tokens") / max(summary.get("shard_run_s") or 0.0, 1e-9),
        )
        .sort("status", "task", nulls_last=True)
        .collect()
    )


def inspect(args: argparse.Namespace) -> None:
    with pl.Config(tbl_rows=-1, tbl_cols=-1, tbl_width_chars=200):
        print(inspect_table(args.output, args.config))


def replay(args: argparse.Namespace) -> None:
    """Re-run one job greedily with its recorded tool results; exit 1 when the tokens differ."""
    from k2batch.agent.replay import replay_job
    from k2batch.config import load_config

    report = replay_job(args.output, args.job, load_config(args.config))
    for step in report.steps:
        print(f"step {step.step}: {step.recorded_tokens} recorded, {step.replayed_tokens} replayed tokens, "
              f"{'same' if step.same else 'DIFFERENT'}")  # fmt: skip
    print(f"status {report.recorded_status} -> {report.replayed_status}: {'match' if report.matches else 'MISMATCH'}")
    if not report.matches:
        raise SystemExit(1)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="k2batch", description="Offline batch inference for Kimi K2-family models")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("demo", help="run the demo batch on the embedded default")
    p.add_argument("--model", default=str(WORKSPACE / "models" / "k2-random"))
    p.add_argument("--requests", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=64)
    p.set_defaults(func=demo)
    p = sub.add_parser("run", help="run a batch of jobs (Parquet) to results and traces (Parquet)")
    p.add_argument("--input", required=True, help="Parquet file or prefix of the jobs")
    p.add_argument("--output", required=True, help="output prefix of the batch")
    p.add_argument("--config", help="TOML overlaying configs/default.toml")
    p.set_defaults(func=run)
    p = sub.add_parser("inspect", help="summary table of a batch's results")
    p.add_argument("output")
    p.add_argument("--config", help="TOML with the prices (default: configs/default.toml)")
    p.set_defaults(func=inspect)
    p = sub.add_parser("replay", help="re-run one job greedily with its recorded tool results")
    p.add_argument("output")
    p.add_argument("--job", required=True)
    p.add_argument("--config", help="the TOML the batch ran with")
    p.set_defaults(func=replay)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args.func(args)


if __name__ == "__main__":
    main()
