"""benchmarks/bench_kernels.py runs end to end (tiny shapes; on CPU under the interpreter)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_bench_kernels_smoke(tmp_path):
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_kernels.py"), "--smoke", "--json", str(tmp_path / "r.json")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    rows = json.loads((tmp_path / "r.json").read_text())["rows"]
    assert {r["kernel"] for r in rows} == {"moe", "mla"}
    assert any(r["case"].startswith("prefill") for r in rows)
    assert all(r["ms"] > 0 and r["max_rel_err"] < 3e-2 for r in rows)
    assert "speedup" in result.stdout
