"""The `k2batch` command."""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

import polars as pl

from k2batch import configs


def _workspace() -> Path:
    """The checkout's workspace/ (demo model, corpus, storage) when k2batch runs from its checkout, else ./workspace."""
    checkout = Path(__file__).resolve().parents[1] / "workspace"
    return checkout if checkout.is_dir() else Path.cwd() / "workspace"


WORKSPACE = _workspace()
DEMO_CONFIG = configs.path("demo.toml")
DEMO_JOBS = 300


def demo(args: argparse.Namespace) -> None:
    """The demo batch on the embedded default: the corpus and a demo input of held-out jobs under workspace/
    (written once), run with the demo model, then where the outputs are, the inspect table and the grades."""
    import msgspec

    from k2batch.agent import run_batch
    from k2batch.config import load_config
    from k2batch.demo.workspace import ensure_corpus, scores, write_jobs

    config = load_config(args.config)
    model = WORKSPACE / "models" / "k2-demo"
    if not (model / "config.json").exists():
        raise SystemExit(f"no demo model at {model}: workspace/README.md says how to train it")
    corpus = ensure_corpus(WORKSPACE / "data" / "corpus.parquet")
    config = msgspec.structs.replace(
        config, model=str(model), tools=msgspec.structs.replace(config.tools, search_corpus=str(corpus))
    )
    storage = WORKSPACE / "storage"
    inputs = storage / "inputs" / "demo" / "jobs.parquet"
    if not inputs.exists() or args.jobs != DEMO_JOBS:
        write_jobs(inputs, args.jobs)
    output = storage / "outputs" / f"demo-{time.strftime('%Y%m%d-%H%M%S')}"
    summary = run_batch(str(inputs.parent), str(output), config)
    print(f"\n{summary['rows']} jobs in {summary['run_s']:.0f} s: {summary['rows_by_status']}")
    print(f"inputs:  {inputs}\noutputs: {output}  (results/, traces/, manifests/, summary.json)")
    with pl.Config(tbl_rows=-1, tbl_cols=-1, tbl_width_chars=200):
        print(inspect_table(str(output), args.config))
    grades = scores(output)
    print(
        "correct answers: "
        + ", ".join(f"{k.removeprefix('accuracy_')} {v:.1%}" for k, v in grades.items() if k.startswith("accuracy_"))
    )
    print(
        f"tool-call format valid in {grades['format_valid']:.1%} of {grades['steps']} steps; "
        f"answers traceable to a tool result: {grades['traceable']:.1%}"
    )
    print(
        f"look inside: k2batch inspect {output} --config configs/demo.toml; "
        f"k2batch replay {output} --job demo-00000 --config configs/demo.toml"
    )


def run(args: argparse.Namespace) -> None:
    """Run a batch: every shard of --input not yet complete under --output."""
    from k2batch.agent import run_batch
    from k2batch.config import load_config

    summary = run_batch(args.input, args.output, load_config(args.config))
    print(f"{summary['rows']} rows: {summary['rows_by_status']}; summary at {args.output}/summary.json")


def inspect_table(output: str, config_path: str | None) -> pl.DataFrame:
    """Per status and task, then a `total` row: jobs, steps, tokens, cache hit rate and API-equivalent cost.

    Reads only results and manifests, so a batch that crashed before its summary is inspected too. The total row is
    the batch summary (metrics.summarize, the figures of summary.json), with its two throughputs: output tokens of
    the complete shards per second of wall time and per second of one shard's run; the groups have none."""
    import msgspec

    from k2batch.config import load_config
    from k2batch.metrics import figures_by, scan_results, summarize

    config = load_config(config_path)
    options, prices = config.storage.options, config.prices
    groups = (
        figures_by(scan_results(output, options), prices, "status", "task")
        .with_columns(output_tokens_per_s=pl.lit(None, pl.Float64), output_tokens_per_shard_s=pl.lit(None, pl.Float64))
        .sort("status", "task", nulls_last=True)
        .collect()
    )
    summary = msgspec.to_builtins(summarize(output, prices, options))
    total = {"status": "total", "task": None, "jobs": summary["rows"], "cost_usd": summary["api_cost_usd"]}
    total |= {name: summary[name] for name in groups.columns if name in summary}
    return pl.concat([groups, pl.DataFrame([total], schema=groups.schema)])


def inspect(args: argparse.Namespace) -> None:
    with pl.Config(tbl_rows=-1, tbl_cols=-1, tbl_width_chars=200):
        print(inspect_table(args.output, args.config))


def replay(args: argparse.Namespace) -> None:
    """Re-run one job from its trace (recorded sampling, seeds and tool results); exit 1 when the tokens differ."""
    from k2batch.agent.replay import replay_job
    from k2batch.config import load_config

    report = replay_job(args.output, args.job, load_config(args.config))
    for step in report.steps:
        print(
            f"{step.label}: {step.recorded_tokens} recorded, {step.replayed_tokens} replayed tokens, "
            f"{'same ids' if step.same else 'DIFFERENT ids'}"
        )
    print(f"status {report.recorded_status} -> {report.replayed_status}: {'match' if report.matches else 'MISMATCH'}")
    if not report.matches:
        raise SystemExit(1)


def plan(args: argparse.Namespace) -> None:
    """Weights, KV cache and episodes per GPU for a model on N GPUs, from its config.json alone."""
    import msgspec
    import torch

    from k2batch.capacity import PlanError, format_plan, plan_capacity, read_model_config
    from k2batch.config import load_config

    options = load_config(args.config).storage.options
    try:
        name, config = read_model_config(args.model, options)
        result = plan_capacity(
            config,
            gpus=args.gpus,
            gpu_memory_gib=args.gpu_memory_gib,
            memory_utilization=args.memory_utilization,
            reserve_gib=args.reserve_gib,
            episode_tokens=args.episode_tokens,
            dtype=getattr(torch, args.dtype),
            int4_scale_dtype=getattr(torch, args.int4_scale_dtype),
            block_size=args.block_size,
            model=name,
        )
    except PlanError as error:
        print(f"k2batch: error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    print(msgspec.json.format(msgspec.json.encode(result)).decode() if args.json else format_plan(result))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="k2batch", description="Offline batch inference for Kimi K2-family models")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("demo", help="run the demo batch on the embedded default")
    p.add_argument("--jobs", type=int, default=DEMO_JOBS, help="demo jobs to generate")
    p.add_argument("--config", default=str(DEMO_CONFIG), help="TOML overlaying configs/default.toml")
    p.set_defaults(func=demo)
    p = sub.add_parser("run", help="run a batch of jobs (Parquet) to results and traces (Parquet)")
    p.add_argument("--input", required=True, help="Parquet file or prefix of the jobs")
    p.add_argument("--output", required=True, help="output prefix of the batch")
    p.add_argument("--config", help="TOML overlaying configs/default.toml")
    p.set_defaults(func=run)
    p = sub.add_parser("plan", help="weights, KV cache and episodes per GPU for a model on N GPUs (no weights needed)")
    p.add_argument(
        "--model",
        required=True,
        help="checkpoint directory, its config.json (local or fsspec URI), or a built-in name: kimi-k2-thinking",
    )
    p.add_argument("--gpus", type=int, required=True, help="GPUs (ranks) of one engine")
    p.add_argument(
        "--gpu-memory-gib",
        type=float,
        required=True,
        help="memory of one GPU as CUDA reports it, GiB (H200: 139.8, H100 80GB: 79.1)",
    )
    p.add_argument(
        "--memory-utilization",
        type=float,
        default=0.9,
        help="fraction of a GPU's memory for weights and KV cache, like vLLM's gpu_memory_utilization",
    )
    p.add_argument(
        "--reserve-gib",
        type=float,
        default=0.0,
        help="GiB per GPU held back on top of that (activations, CUDA graphs, communication buffers)",
    )
    p.add_argument("--episode-tokens", type=int, default=65536, help="tokens of one episode's context")
    p.add_argument(
        "--dtype",
        choices=("bfloat16", "float16", "float32"),
        default="bfloat16",
        help="weights other than INT4 experts, and the KV cache",
    )
    p.add_argument(
        "--int4-scale-dtype",
        choices=("bfloat16", "float16", "float32"),
        default="bfloat16",
        help="dtype of the INT4 experts' group scales in the checkpoint (bfloat16 in K2 Thinking)",
    )
    p.add_argument("--block-size", type=int, default=16, help="tokens per KV-cache block ([engine] block_size)")
    p.add_argument("--config", help="TOML whose [storage] options reach a checkpoint on object storage")
    p.add_argument("--json", action="store_true", help="the plan as JSON (bytes, tokens) instead of a table")
    p.set_defaults(func=plan)
    p = sub.add_parser("inspect", help="summary table of a batch's results")
    p.add_argument("output")
    p.add_argument("--config", help="TOML with the prices (default: configs/default.toml)")
    p.set_defaults(func=inspect)
    p = sub.add_parser("replay", help="re-run one job from its trace and compare the generated tokens")
    p.add_argument("output")
    p.add_argument("--job", required=True)
    p.add_argument("--config", help="the TOML the batch ran with")
    p.set_defaults(func=replay)
    return parser


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from k2batch.config import ConfigError
    from k2batch.shards import InputError

    try:
        args.func(args)
    except (InputError, ConfigError) as error:
        # The message names the file and what to do; a traceback would only bury it. Status 2, as argparse's.
        message = " ".join(str(error).splitlines())
        print(f"k2batch: error: {message}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
