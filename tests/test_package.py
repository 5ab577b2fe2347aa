"""The package as a user installs it: a wheel built from the checkout, installed in a fresh environment where the
checkout is not importable, runs a batch from an empty directory with its shipped defaults, and installs nothing
but `k2batch` at the top level (so it shares an environment with Hugging Face's `kernels`)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.agent.conftest import k2_checkpoint  # noqa: F401

REPO = Path(__file__).resolve().parents[1]
# The folders the wheel is built from, and the import names they install as.
SOURCES = {
    "k2batch": "k2batch",
    "kernels": "k2batch.kernels",
    "pipelines": "k2batch.pipelines",
    "configs": "k2batch.configs",
}

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel `pip wheel` builds from a copy of the checkout's package sources (the checkout stays clean)."""
    source = tmp_path_factory.mktemp("source")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    for folder in SOURCES:
        shutil.copytree(REPO / folder, source / folder, ignore=shutil.ignore_patterns("__pycache__"))
    dist = tmp_path_factory.mktemp("dist")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(dist), str(source)],
        check=True,
        capture_output=True,
        text=True,
    )
    (built,) = dist.glob("k2batch-*.whl")
    return built


@pytest.fixture(scope="module")
def environment(wheel, tmp_path_factory) -> Path:
    """A fresh virtual environment with the wheel installed. Its dependencies come from this environment's
    site-packages through a .pth line: directories added that way are searched, but their own .pth files (the
    editable install's import hook for the checkout) are not run, so `k2batch` resolves to the wheel alone."""
    venv = tmp_path_factory.mktemp("venv")
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    site = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    Path(site, "dependencies.pth").write_text(sysconfig.get_path("purelib") + "\n")
    subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps", str(wheel)],
        check=True,
        capture_output=True,
        text=True,
    )
    return venv


def run_in(venv: Path, cwd: Path, *args: str) -> subprocess.CompletedProcess:
    env = {key: value for key, value in os.environ.items() if not key.startswith(("PYTHON", "K2BATCH_"))}
    env["OMP_NUM_THREADS"] = "1"
    return subprocess.run(list(args), cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def test_the_wheel_holds_every_module_and_config_under_k2batch_only(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    top_level = {name.split("/")[0] for name in names if not name.split("/")[0].endswith(".dist-info")}
    assert top_level == {"k2batch"}
    expected = set()
    for folder, package in SOURCES.items():
        for path in (REPO / folder).rglob("*"):
            if path.suffix in (".py", ".toml", ".yaml", ".jinja") and "__pycache__" not in path.parts:
                relative = path.relative_to(REPO / folder).as_posix()
                expected.add(f"{package.replace('.', '/')}/{relative}")
    assert sorted(expected - set(names)) == []


def test_an_installed_wheel_runs_a_batch_from_an_empty_directory(environment, k2_checkpoint, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    python = str(environment / "bin" / "python")
    # Where each name comes from: k2batch from the wheel, `kernels` from Hugging Face's distribution when installed
    # (transformers >= 5.25 needs it), no top-level `pipelines` at all.
    probe = run_in(
        environment,
        empty,
        python,
        "-c",
        (
            "import json, importlib.util, k2batch, k2batch.kernels.int4_moe, k2batch.pipelines.settings\n"
            "from k2batch.config import DEFAULT_CONFIG\n"
            "spec = importlib.util.find_spec('kernels')\n"
            "print(json.dumps({'k2batch': k2batch.__file__, 'kernels': spec and spec.origin,"
            " 'pipelines': importlib.util.find_spec('pipelines') is not None, 'default': str(DEFAULT_CONFIG),"
            " 'dagster': str(k2batch.pipelines.settings.DAGSTER_CONFIG)}))"
        ),
    )
    assert probe.returncode == 0, probe.stderr
    where = json.loads(probe.stdout)
    installed = environment.resolve()
    assert Path(where["k2batch"]).resolve().is_relative_to(installed)
    assert Path(where["default"]).resolve().is_relative_to(installed) and Path(where["default"]).is_file()
    assert Path(where["dagster"]).resolve().is_relative_to(installed) and Path(where["dagster"]).is_file()
    assert where["pipelines"] is False
    assert where["kernels"] is None or Path(where["kernels"]).resolve() != (REPO / "kernels" / "__init__.py")

    pq.write_table(
        pa.table({"job_id": ["a", "b", "a"], "prompt": ["What is 2+3?", "Say hi.", "duplicate id"]}),
        empty / "jobs.parquet",
    )
    (empty / "my.toml").write_text(
        f'model = "{k2_checkpoint}"\n[engine]\nmax_num_seqs = 4\nnum_kv_blocks = 256\n'
        "[sampling]\ntemperature = 0.0\nmax_new_tokens = 8\n"
        "[agent]\nmax_steps = 2\nmax_new_tokens_per_episode = 16\ntool_workers = 1\n"
        '[tools]\nenabled = ["calculator"]\n'
    )
    k2batch = str(environment / "bin" / "k2batch")
    ran = run_in(
        environment, empty, k2batch, "run", "--input", "jobs.parquet", "--output", "out", "--config", "my.toml"
    )
    assert ran.returncode == 0, ran.stderr[-3000:]
    results = pl.read_parquet(f"{empty}/out/results/**/*.parquet", hive_partitioning=True)
    assert sorted(results["job_id"].to_list()) == ["a", "a", "b"]  # every row, the duplicate id with its error
    invalid = results.filter(pl.col("status") == "invalid")
    assert invalid["error_type"].to_list() == ["duplicate_job_id"]
    assert (empty / "out" / "summary.json").is_file()
    inspected = run_in(environment, empty, k2batch, "inspect", "out", "--config", "my.toml")
    assert inspected.returncode == 0 and "total" in inspected.stdout, inspected.stderr[-3000:]
