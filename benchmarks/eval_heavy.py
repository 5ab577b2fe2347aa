"""Heavy mode on the demo model's held-out jobs, through the real batch path (run_batch), sampled at K2's settings
(temperature 1.0, top_p 0.95): accuracy with k = 1 against k trajectories aggregated by a vote and by a model turn,
and the prompt tokens prefilled by a heavy job against k separate jobs (the same prompt k times, prefix cache on).

    python benchmarks/eval_heavy.py                                  # 100 jobs per task, k = 1, 4, 8
    python benchmarks/eval_heavy.py --jobs-per-task 20 --k 1 4 --aggregation vote
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
from pathlib import Path

import msgspec
import polars as pl
import pyarrow.parquet as pq

from k2batch.agent import run_batch
from k2batch.config import load_config
from k2batch.demo.workspace import ensure_corpus, scores, write_jobs

ROOT = Path(__file__).resolve().parent.parent
EVAL_SEED = 7  # held-out jobs, as benchmarks/eval_demo.py


def prefill(output: Path) -> dict[str, int]:
    """Prompt tokens run through the model (input less cached), from the traces: trajectories' chat steps, the
    aggregation turns, and of those the steps 0 (the shared prompt)."""
    spans = pl.read_parquet(f"{output}/traces/**/*.parquet", hive_partitioning=True)
    computed = pl.col("input_tokens") - pl.col("cached_input_tokens")
    chats = spans.filter(pl.col("operation") == "chat")
    return {
        "prefill_trajectories": int(chats.select(computed.sum()).item() or 0),
        "prefill_step0": int(chats.filter(pl.col("step") == 0).select(computed.sum()).item() or 0),
        "prefill_aggregation": int(spans.filter(pl.col("operation") == "aggregate").select(computed.sum()).item() or 0),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(ROOT / "workspace" / "models" / "k2-demo"))
    parser.add_argument("--jobs-per-task", type=int, default=100)
    parser.add_argument("--k", type=int, nargs="+", default=[1, 4, 8])
    parser.add_argument("--aggregation", nargs="+", default=["vote", "model"], choices=["vote", "model"])
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top-p", type=float, default=0.95)
    parser.add_argument("--seed", type=int, default=EVAL_SEED, help="seed of the held-out jobs")
    parser.add_argument("--skip-separate", action="store_true", help="skip the k-separate-jobs prefill comparison")
    parser.add_argument("--json", help="also write the figures here")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    base = load_config(ROOT / "configs" / "demo.toml")
    corpus = ensure_corpus(ROOT / "workspace" / "data" / "corpus.parquet")
    base = msgspec.structs.replace(
        base,
        model=args.model,
        tools=msgspec.structs.replace(base.tools, search_corpus=str(corpus)),
        sampling=msgspec.structs.replace(base.sampling, temperature=args.temperature, top_p=args.top_p),
        # One shard: every job, trajectory and copy shares one engine run, as a large batch would.
        shards=msgspec.structs.replace(base.shards, rows_per_shard=1_000_000),
    )
    figures: dict[str, dict] = {}

    def run(name: str, inputs: Path, heavy: int, aggregation: str) -> None:
        config = msgspec.structs.replace(
            base, agent=msgspec.structs.replace(base.agent, heavy=heavy, heavy_aggregation=aggregation)
        )
        output = Path(tmp) / "outputs" / name
        started = time.perf_counter()
        summary = run_batch(str(inputs.parent), str(output), config)
        engine = summary["engine"] or {}
        figures[name] = {
            **scores(output),
            **prefill(output),
            "engine_prefill": engine.get("prefill_tokens", 0),
            "engine_cached": engine.get("cached_tokens", 0),
            "wall_s": round(time.perf_counter() - started, 1),
        }
        shown = ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in figures[name].items())
        print(f"{name}: {shown}", flush=True)

    with tempfile.TemporaryDirectory(prefix="eval-heavy-") as tmp:
        inputs = write_jobs(Path(tmp) / "inputs" / "jobs.parquet", 3 * args.jobs_per_task, args.seed, "eval")
        for k in args.k:
            for aggregation in ["vote"] if k == 1 else args.aggregation:
                run("k1" if k == 1 else f"k{k}_{aggregation}", inputs, k, aggregation)
        if not args.skip_separate:
            jobs = pq.read_table(inputs)
            for k in [k for k in args.k if k > 1]:
                # The same prompts as k plain jobs each (ids made distinct), one after another in the one shard.
                copies = pl.concat(
                    [
                        pl.from_arrow(jobs).with_columns(job_id=pl.col("job_id") + f"#{i}", _copy=pl.lit(i))
                        for i in range(k)
                    ]
                ).sort("job_id")
                separate = Path(tmp) / f"separate{k}" / "jobs.parquet"
                separate.parent.mkdir(parents=True)
                copies.drop("_copy").write_parquet(separate)
                run(f"k{k}_separate_jobs", separate, 1, "vote")

    print(
        f"\n{'run':<20}{'accuracy':>10}{'retrieval':>10}{'draft':>10}{'synthesis':>10}{'format':>8}"
        f"{'prefill':>10}{'step 0':>10}{'aggr.':>8}{'wall_s':>8}"
    )
    for name, f in figures.items():
        print(
            f"{name:<20}{f['accuracy']:>10.1%}{f.get('accuracy_retrieval', 0):>10.1%}"
            f"{f.get('accuracy_draft', 0):>10.1%}{f.get('accuracy_synthesis', 0):>10.1%}{f['format_valid']:>8.1%}"
            f"{f['prefill_trajectories']:>10,}"
            f"{f['prefill_step0']:>10,}{f['prefill_aggregation']:>8,}{f['wall_s']:>8.0f}"
        )
    for k in [k for k in args.k if k > 1]:
        heavy = next((f for n, f in figures.items() if n.startswith(f"k{k}_") and "separate" not in n), None)
        separate = figures.get(f"k{k}_separate_jobs")
        if heavy and separate:
            print(
                f"k={k}: the prompts' prefill (step 0) of heavy jobs is {heavy['prefill_step0']:,} tokens against "
                f"{separate['prefill_step0']:,} for {k} separate jobs each "
                f"({heavy['prefill_step0'] / max(separate['prefill_step0'], 1):.2f}x); k=1 prefills "
                f"{figures.get('k1', {}).get('prefill_step0', 0):,}"
            )
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
