"""`k2batch run` killed with SIGKILL in the middle of a batch, then run again: every row once, complete shards kept."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

ROOT = Path(__file__).resolve().parents[2]
SHARDS = 6


def fingerprints(out: Path, shards: list[str]) -> dict[str, tuple[str, int]]:
    """SHA-256 and mtime (ns) of the manifest, results and traces of each named shard."""
    files = [out / "manifests" / f"{s}.json" for s in shards]
    files += [out / kind / s / "part-0.parquet" for s in shards for kind in ("results", "traces")]
    return {str(f): (hashlib.sha256(f.read_bytes()).hexdigest(), f.stat().st_mtime_ns) for f in files}


def complete(out: Path) -> list[str]:
    folder = out / "manifests"
    return sorted(p.stem for p in folder.glob("shard=*.json")) if folder.exists() else []


def started(out: Path) -> dict[str, int]:
    """Attempt markers per shard: written when an attempt starts."""
    folder = out / "attempts"
    return {p.name: len(list(p.glob("*.json"))) for p in folder.iterdir()} if folder.exists() else {}


def reader_files(out: Path) -> list[Path]:
    """What the documented reader glob, results/**/*.parquet, picks up."""
    return sorted((out / "results").glob("**/*.parquet"))


@pytest.mark.slow
def test_a_run_killed_mid_batch_resumes_without_duplicates_or_recompute(k2_checkpoint, tmp_path):
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    ids = [f"job-{i:02d}" for i in range(2 * SHARDS)]
    pq.write_table(pa.table({"job_id": ids, "prompt": [f"Tell me about {i}." for i in ids]}), inputs / "jobs.parquet")
    # Greedy decoding of a random model rarely stops early: each shard decodes ~120 tokens, a fraction of a second.
    (tmp_path / "batch.toml").write_text(
        f'model = "{k2_checkpoint}"\n[engine]\nmax_num_seqs = 2\nnum_kv_blocks = 256\n'
        "[sampling]\ntemperature = 0.0\nmax_new_tokens = 120\n[agent]\nmax_steps = 1\n"
        '[tools]\nenabled = ["calculator"]\n[shards]\nrows_per_shard = 2\n'
    )
    out = tmp_path / "out"
    command = [
        sys.executable,
        "-m",
        "k2batch.cli",
        "run",
        "--input",
        str(inputs),
        "--output",
        str(out),
        "--config",
        str(tmp_path / "batch.toml"),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    run = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120

    def mid_shard() -> bool:  # a shard complete, and the next one started
        return bool(complete(out)) and bool(set(started(out)) - set(complete(out)))

    while not mid_shard() and run.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    run.send_signal(signal.SIGKILL)
    _, stderr = run.communicate(timeout=30)
    assert run.returncode == -signal.SIGKILL, stderr.decode()[-2000:]
    done = complete(out)
    assert 1 <= len(done) < SHARDS, f"killed with {len(done)} of {SHARDS} shards complete"

    kept = fingerprints(out, done)
    # The reader glob sees only whole files: no temporary keys, no half-written Parquet.
    assert all(path.name == "part-0.parquet" for path in reader_files(out))
    partial = pl.scan_parquet(str(out / "results" / "**" / "*.parquet"), hive_partitioning=True).collect()
    assert partial["job_id"].n_unique() == partial.height
    starts = started(out)

    rerun = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr.decode()[-2000:]
    assert fingerprints(out, done) == kept  # complete shards were not recomputed, nor rewritten
    assert len(complete(out)) == SHARDS
    results = pl.scan_parquet(str(out / "results" / "**" / "*.parquet"), hive_partitioning=True).collect()
    assert sorted(results["job_id"].to_list()) == ids  # no duplicate, no missing row
    assert all(path.name == "part-0.parquet" for path in reader_files(out))
    # A shard the killed run had started counts that start: its rerun is attempt 2.
    attempts = dict(results.group_by("shard").agg(pl.col("attempt").first()).iter_rows())
    for index, attempt in attempts.items():
        name = f"shard={index:05d}"
        assert attempt == (1 if name in done else starts.get(name, 0) + 1), name
    # At most the one shard the kill interrupted (none, if it landed between two shards).
    assert sorted(attempts.values()).count(2) <= 1
