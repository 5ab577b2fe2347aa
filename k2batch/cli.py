"""The `k2batch` command."""

from __future__ import annotations

import argparse
import logging
import shlex
import sys
import time
from pathlib import Path

import polars as pl

WORKSPACE = Path(__file__).resolve().parent.parent / "workspace"
DEMO_CONFIG = WORKSPACE.parent / "configs" / "demo.toml"
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
        raise SystemExit(f"no demo model at {model}: train it with `k2batch train-demo` (see workspace/README.md)")
    corpus = ensure_corpus(WORKSPACE / "data" / "corpus.parquet")
    config = msgspec.structs.replace(
        config, model=str(model), tools=msgspec.structs.replace(config.tools, search_corpus=str(corpus))
    )
    storage = WORKSPACE / "storage"
    inputs = storage / "inputs" / "demo" / "jobs.parquet"
    if not inputs.exists() or args.jobs != DEMO_JOBS:
        write_jobs(inputs, args.jobs)
    output = storage / "outputs" / f"demo-{time.strftime('%Y%m%d-%H%M%S')}"
    started = time.perf_counter()
    summary = run_batch(str(inputs.parent), str(output), config)
    print(f"\n{summary['rows']} jobs in {time.perf_counter() - started:.0f} s: {summary['rows_by_status']}")
    print(f"inputs:  {inputs}\noutputs: {output}  (results/, traces/, manifests/, summary.json)")
    with pl.Config(tbl_rows=-1, tbl_cols=-1, tbl_width_chars=200):
        print(inspect_table(str(output), args.config))
    grades = scores(output)
    print("correct answers: " + ", ".join(f"{k.removeprefix('accuracy_')} {v:.1%}" for k, v in grades.items()
                                          if k.startswith("accuracy_")))  # fmt: skip
    print(f"tool-call format valid in {grades['format_valid']:.1%} of {grades['steps']} steps; "
          f"answers traceable to a tool result: {grades['traceable']:.1%}")  # fmt: skip
    print(f"look inside: k2batch inspect {output} --config configs/demo.toml; "
          f"k2batch replay {output} --job demo-00000 --config configs/demo.toml")  # fmt: skip


def train_demo(args: argparse.Namespace) -> None:
    """Train the demo model on the synthetic world's episodes and export it (INT4 experts, and bf16)."""
    from k2batch.demo.train import train_demo as train

    summary = train(
        args.out, seed=args.seed, steps=args.steps, qat_steps=args.qat_steps, num_jobs=args.jobs,
        bf16_out=args.bf16_out, threads=args.threads, snapshot_every=args.snapshot_every,
        qk_clip_threshold=args.qk_clip, device=args.device, fresh_worlds=args.fresh_worlds,
        share_prefix=args.share_prefix, tasks=args.tasks, balanced_lengths=args.balanced_lengths,
        echo_names=args.echo_names, echo_digits=args.echo_digits, typos=args.typos, lr=args.lr, init=args.init,
        one_thread_arithmetic=args.one_thread_arithmetic, command=shlex.join(["k2batch", *args.argv]),
    )  # fmt: skip
    print(f"trained in {summary['wall_s']:.0f} s: final loss {summary['final_loss']:.4f}; checkpoint at {args.out}")


def run(args: argparse.Namespace) -> None:
    """Run a batch: every shard of --input not yet complete under --output."""
    from k2batch.agent import run_batch
    from k2batch.config import load_config

    summary = run_batch(args.input, args.output, load_config(args.config))
    print(f"{summary['rows']} rows: {summary['rows_by_status']}; summary at {args.output}/summary.json")


def inspect_table(output: str, config_path: str | None) -> pl.DataFrame:
    """Per status and task, then a `total` row: jobs, steps, tokens, cache hit rate and API-equivalent cost.

    Reads only results and manifests, so a batch that crashed before its summary is inspected too. Throughput
    is a batch figure, so only the total row has it: output tokens of the complete shards (those with a
    manifest) per second of their run time."""
    from k2batch.agent.batch import scan_results
    from k2batch.config import load_config
    from k2batch.metrics import api_cost, cache_hit_rate, token_totals
    from k2batch.shards import read_manifests

    config = load_config(config_path)
    options, prices = config.storage.options, config.prices
    results = scan_results(output, options)
    manifests = read_manifests(output, options)
    run_s = sum(m.timings.get("run_s", 0.0) for m in manifests)
    complete = pl.col("shard").is_in([m.shard for m in manifests])
    sums = {**token_totals(), "cost_usd": api_cost(prices).sum()}
    hit_rate = cache_hit_rate()
    groups = (
        results.group_by("status", "task")
        .agg(**sums)
        .with_columns(cache_hit_rate=hit_rate, output_tok_s=pl.lit(None, pl.Float64))
        .sort("status", "task", nulls_last=True)
    )
    rate = pl.col("completion_tokens").filter(complete).sum() / run_s if run_s > 0 else pl.lit(None)
    total = results.select(
        status=pl.lit("total"), task=pl.lit(None, pl.String), **sums, output_tok_s=rate.cast(pl.Float64)
    ).with_columns(cache_hit_rate=hit_rate)
    return pl.concat([groups, total.select(groups.collect_schema().names())]).collect()


def inspect(args: argparse.Namespace) -> None:
    with pl.Config(tbl_rows=-1, tbl_cols=-1, tbl_width_chars=200):
        print(inspect_table(args.output, args.config))


def replay(args: argparse.Namespace) -> None:
    """Re-run one job from its trace (recorded sampling, seeds and tool results); exit 1 when the tokens differ."""
    from k2batch.agent.replay import replay_job
    from k2batch.config import load_config

    report = replay_job(args.output, args.job, load_config(args.config))
    for step in report.steps:
        print(f"step {step.step}: {step.recorded_tokens} recorded, {step.replayed_tokens} replayed tokens, "
              f"{'same ids' if step.same else 'DIFFERENT ids'}")  # fmt: skip
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
            config, gpus=args.gpus, gpu_memory_gib=args.gpu_memory_gib, memory_utilization=args.memory_utilization,
            reserve_gib=args.reserve_gib, episode_tokens=args.episode_tokens, dtype=getattr(torch, args.dtype),
            int4_scale_dtype=getattr(torch, args.int4_scale_dtype), block_size=args.block_size, model=name,
        )  # fmt: skip
    except PlanError as error:
        print(f"k2batch: error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    print(msgspec.json.format(msgspec.json.encode(result)).decode() if args.json else format_plan(result))


def _count(text: str) -> int:
    """argparse type: a whole number >= 0."""
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def _tasks(text: str) -> tuple[str, ...]:
    """argparse type: comma-separated demo task kinds."""
    from k2batch.demo.tasks import check_tasks

    tasks = tuple(t.strip() for t in text.split(",") if t.strip())
    try:
        check_tasks(tasks)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return tasks


def _fraction(text: str) -> float:
    """argparse type: a number in [0, 1]."""
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1], got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="k2batch", description="Offline batch inference for Kimi K2-family models")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("demo", help="run the demo batch on the embedded default")
    p.add_argument("--jobs", type=int, default=DEMO_JOBS, help="demo jobs to generate")
    p.add_argument("--config", default=str(DEMO_CONFIG), help="TOML overlaying configs/default.toml")
    p.set_defaults(func=demo)
    p = sub.add_parser("train-demo", help="train the demo model (a tiny K2) on synthetic agentic episodes")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(WORKSPACE / "models" / "k2-demo"), help="INT4 checkpoint directory")
    p.add_argument("--bf16-out", default=str(WORKSPACE / "models" / "k2-demo-bf16"),
                   help="the same weights before INT4 quantization")  # fmt: skip
    p.add_argument("--steps", type=int, default=3000, help="optimizer steps before quantization-aware training")
    p.add_argument("--qat-steps", type=int, default=300, help="steps of INT4 quantization-aware training")
    # The defaults are the committed checkpoint's recipe (workspace/models/k2-demo/training.json).
    p.add_argument("--jobs", type=int, default=16000, help="training jobs (gold episodes) to generate")
    p.add_argument("--fresh-worlds", type=_count, default=16,
                   help="spread the jobs over this many fresh worlds (0: over the demo world's training entities)")
    p.add_argument("--tasks", type=_tasks, default=("retrieval", "draft", "synthesis"),
                   help="comma-separated task kinds the training jobs take in turn (one listed twice gets twice the "
                        "jobs); default retrieval,draft,synthesis")  # fmt: skip
    p.add_argument("--balanced-lengths", type=_fraction, default=0.0,
                   help="fraction of synthesis jobs whose two values' digit counts are drawn uniformly")
    p.add_argument("--echo-names", type=_fraction, default=0.0,
                   help="fraction of fresh-world name words with a repeated syllable or letter (Ralolis, Finmimi)")
    p.add_argument("--echo-digits", type=_fraction, default=0.0,
                   help="fraction of fresh-world numbers with a repeated chunk of digits (588989, 747000)")
    p.add_argument("--typos", type=_fraction, default=0.0,
                   help="fraction of episodes that search for a miscopied name first and recover (no loss on the "
                        "mistake)")  # fmt: skip
    p.add_argument("--qk-clip", type=float, default=50.0, help="QK-clip threshold on attention logits")
    p.add_argument("--lr", type=float, default=3e-3, help="peak learning rate (Muon and AdamW)")
    p.add_argument("--init", help="go on training from this demo checkpoint (its weights and tokenizer)")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--one-thread-arithmetic", action="store_true",
                   help="give the bits of a --threads 1 run, using the threads where that changes none (faster)")
    p.add_argument("--device", default="cpu", help="where the training loop runs: cpu or cuda")
    p.add_argument("--snapshot-every", type=int, default=0, help="also export OUT-snapshot every N steps")
    p.add_argument("--no-share-prefix", dest="share_prefix", action="store_false",
                   help="run every episode's whole prompt, not a batch's shared prefix once (same loss, slower)")  # fmt: skip
    p.set_defaults(func=train_demo)
    p = sub.add_parser("run", help="run a batch of jobs (Parquet) to results and traces (Parquet)")
    p.add_argument("--input", required=True, help="Parquet file or prefix of the jobs")
    p.add_argument("--output", required=True, help="output prefix of the batch")
    p.add_argument("--config", help="TOML overlaying configs/default.toml")
    p.set_defaults(func=run)
    p = sub.add_parser("plan", help="weights, KV cache and episodes per GPU for a model on N GPUs (no weights needed)")
    p.add_argument("--model", required=True,
                   help="checkpoint directory, its config.json (local or fsspec URI), or a built-in name: "
                        "kimi-k2-thinking")  # fmt: skip
    p.add_argument("--gpus", type=int, required=True, help="GPUs (ranks) of one engine")
    p.add_argument("--gpu-memory-gib", type=float, required=True,
                   help="memory of one GPU as CUDA reports it, GiB (H200: 139.8, H100 80GB: 79.1)")
    p.add_argument("--memory-utilization", type=float, default=0.9,
                   help="fraction of a GPU's memory for weights and KV cache, like vLLM's gpu_memory_utilization")
    p.add_argument("--reserve-gib", type=float, default=0.0,
                   help="GiB per GPU held back on top of that (activations, CUDA graphs, communication buffers)")
    p.add_argument("--episode-tokens", type=int, default=65536, help="tokens of one episode's context")
    p.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default="bfloat16",
                   help="weights other than INT4 experts, and the KV cache")
    p.add_argument("--int4-scale-dtype", choices=("bfloat16", "float16", "float32"), default="bfloat16",
                   help="dtype of the INT4 experts' group scales in the checkpoint (bfloat16 in K2 Thinking)")
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
    args.argv = argv
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
