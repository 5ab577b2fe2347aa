"""The demo model on held-out jobs (entities never seen in training), through the real batch path (run_batch),
greedy: tool-call format validity, correct answers per task, answers traceable to a tool result; then the same
jobs with the prefix cache off, one sequence at a time, and with the bf16 weights before INT4 quantization.

    python benchmarks/eval_demo.py                          # 100 jobs per task, every variant
    python benchmarks/eval_demo.py --jobs-per-task 20 --only int4
    python benchmarks/eval_demo.py --only int4 --seed 2025 --misses   # the demo's jobs; list every miss
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

from k2batch.agent import run_batch
from k2batch.config import load_config
from k2batch.demo.workspace import ensure_corpus, graded, scores, write_jobs

ROOT = Path(__file__).resolve().parent.parent
EVAL_SEED = 7  # the demo input uses another seed: evaluation jobs are not the demo's


def variants(int4: Path, bf16: Path) -> dict[str, tuple[Path, dict, dict]]:
    """name -> (checkpoint, engine overrides, agent overrides)."""
    return {
        "int4": (int4, {}, {}),
        "int4_no_prefix_cache": (int4, {"enable_prefix_caching": False}, {}),
        "int4_batch_1": (int4, {"max_num_seqs": 1}, {}),
        "bf16": (bf16, {}, {}),
    }


def print_misses(output: Path) -> None:
    """Each job whose answer is wrong or states a fact no tool result holds: what was expected, what came."""
    misses = graded(output).filter(~pl.col("correct") | ~pl.col("traceable"))
    for row in misses.iter_rows(named=True):
        flags = ("" if row["correct"] else "wrong ") + ("" if row["traceable"] else "untraceable")
        print(f"  {row['job_id']} {row['task']} [{flags.strip()}] expected {row['expected']}")
        print(f"    answer: {row['answer']}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(ROOT / "workspace" / "models" / "k2-demo"))
    parser.add_argument("--bf16-model", default=str(ROOT / "workspace" / "models" / "k2-demo-bf16"))
    parser.add_argument("--jobs-per-task", type=int, default=100)
    parser.add_argument("--only", nargs="*", help="variants to run (default: all)")
    parser.add_argument(
        "--seed",
        type=int,
        default=EVAL_SEED,
        help=f"seed of the held-out jobs (default {EVAL_SEED}; the demo batch's is 2025)",
    )
    parser.add_argument("--misses", action="store_true", help="print every wrong or untraceable answer")
    parser.add_argument("--json", help="also write the figures here")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    base = load_config(ROOT / "configs" / "demo.toml")
    corpus = ensure_corpus(ROOT / "workspace" / "data" / "corpus.parquet")
    base = msgspec.structs.replace(base, tools=msgspec.structs.replace(base.tools, search_corpus=str(corpus)))
    figures: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="eval-demo-") as tmp:
        inputs = write_jobs(Path(tmp) / "inputs" / "jobs.parquet", 3 * args.jobs_per_task, args.seed, "eval")
        for name, (model, engine, agent) in variants(Path(args.model), Path(args.bf16_model)).items():
            if args.only and name not in args.only:
                continue
            config = msgspec.structs.replace(
                base,
                model=str(model),
                engine=msgspec.structs.replace(base.engine, **engine),
                agent=msgspec.structs.replace(base.agent, **agent),
            )
            output = Path(tmp) / "outputs" / name
            started = time.perf_counter()
            run_batch(str(inputs.parent), str(output), config)
            figures[name] = {**scores(output), "wall_s": round(time.perf_counter() - started, 1)}
            print(
                f"{name}: "
                + ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in figures[name].items()),
                flush=True,
            )
            if args.misses:
                print_misses(output)

    keys = ["format_valid", "accuracy_retrieval", "accuracy_draft", "accuracy_synthesis", "traceable"]
    print(f"\n{'variant':<22}" + "".join(f"{k:>20}" for k in keys) + f"{'wall_s':>10}")
    for name, f in figures.items():
        print(f"{name:<22}" + "".join(f"{f.get(k, float('nan')):>20.1%}" for k in keys) + f"{f['wall_s']:>10.0f}")
    if "int4" in figures:
        ref = figures["int4"]
        for name, f in figures.items():
            if name != "int4":
                gap = max(abs(f.get(k, 0.0) - ref.get(k, 0.0)) for k in keys[1:4])
                print(f"{name} vs int4: largest accuracy gap {gap * 100:.1f} points")
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
