"""The UI: dagster-webserver on 127.0.0.1 driven by headless Chromium (Debian's, through Playwright): materialize
the batch's assets for a partition, wait for the run to succeed, check the outputs, keep screenshots."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import dagster as dg
import polars as pl
import pytest
import yaml

from k2batch.pipelines.assets import batches
from tests.pipelines.conftest import JOBS, write_jobs

REPO = Path(__file__).resolve().parents[2]
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
]
ARTIFACTS = REPO / "tests" / "artifacts"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not os.path.exists(CHROMIUM), reason="needs Debian's chromium (make install-test installs it)"),
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(url: str, process: subprocess.Popen, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"dagster-webserver exited with {process.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"{url} did not answer in {timeout_s} s")


@pytest.fixture
def webserver(tmp_path, batch_model, monkeypatch):
    """dagster-webserver over a fresh instance (the workspace's dagster.yaml, runs launched at once since no
    daemon runs here) and a storage root with one batch, in its own process group."""
    home, root = tmp_path / "dagster_home", tmp_path / "root"
    home.mkdir()
    instance = yaml.safe_load((REPO / "workspace" / "dagster_home" / "dagster.yaml").read_text())
    instance["run_coordinator"] = {"module": "dagster._core.run_coordinator", "class": "DefaultRunCoordinator"}
    (home / "dagster.yaml").write_text(yaml.safe_dump(instance))
    write_jobs(root / "inputs" / "ui-batch" / "jobs.parquet")
    (tmp_path / "batch.toml").write_text(
        f'model = "{batch_model}"\n[engine]\nmax_num_seqs = 8\nnum_kv_blocks = 512\n'
        "[sampling]\ntemperature = 0.0\nmax_new_tokens = 16\n"
        "[agent]\nmax_steps = 2\nmax_new_tokens_per_episode = 32\ntool_workers = 2\n"
        '[tools]\nenabled = ["calculator", "now"]\n[shards]\nrows_per_shard = 3\n'
    )
    env = {
        **os.environ,
        "DAGSTER_HOME": str(home),
        "K2BATCH_ROOT": str(root),
        "K2BATCH_CONFIG": str(tmp_path / "batch.toml"),
        "OMP_NUM_THREADS": "1",  # the run process's torch: one thread for the tiny model
    }
    monkeypatch.setenv("DAGSTER_HOME", str(home))  # the instance's sqlite base_dir, here too
    with dg.DagsterInstance.from_config(str(home)) as dagster:
        dagster.add_dynamic_partitions(batches.name, ["ui-batch"])
    port = free_port()
    webserver = str(Path(sys.executable).with_name("dagster-webserver"))
    log = (tmp_path / "webserver.log").open("wb")
    process = subprocess.Popen(
        [webserver, "-m", "k2batch.pipelines.definitions", "-h", "127.0.0.1", "-p", str(port)],
        cwd=REPO,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        wait_for(f"http://127.0.0.1:{port}/server_info", process)
        dismiss_first_visit_dialog(f"http://127.0.0.1:{port}")
        yield f"http://127.0.0.1:{port}", home, root
    finally:
        os.killpg(process.pid, signal.SIGTERM)  # its own group: the webserver and its code server
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        log.close()


def dismiss_first_visit_dialog(url: str) -> None:
    """Mark the instance's first-visit dialog (the "community NUX" Dagster shows on a local webserver) as seen,
    the way its Skip button does, so it cannot open over a menu and close it mid-test."""
    request = urllib.request.Request(
        f"{url}/graphql",
        data=json.dumps({"query": "mutation SetNuxSeen { setNuxSeen }"}).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        assert json.load(response)["data"]["setNuxSeen"] is True


def choose_partition(page, name: str, attempts: int = 3) -> None:
    """Pick `name` in the launch dialog's partition menu, opening the menu again if something closed it."""
    for attempt in range(attempts):
        page.get_by_text("Select a partition or create one").click()
        item = page.get_by_role("menuitem", name=name)
        try:
            item.click(timeout=15_000)
            return
        except Exception:
            if attempt == attempts - 1:
                raise


def launched_run(home: Path, timeout_s: float = 60) -> str:
    """The id of the run the UI launched, once the instance has it."""
    deadline = time.monotonic() + timeout_s
    with dg.DagsterInstance.from_config(str(home)) as dagster:
        while time.monotonic() < deadline:
            runs = dagster.get_runs()
            if runs:
                return runs[0].run_id
            time.sleep(0.5)
    raise TimeoutError(f"no run launched in {timeout_s} s")


def test_materialize_a_batch_from_the_ui(webserver, tmp_path):
    from playwright.sync_api import sync_playwright

    url, home, root = webserver
    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            # The first-visit dialog is marked seen on the server; should one still open, Playwright clicks its Skip
            # button before the next action.
            skip = page.get_by_role("button", name="Skip")
            page.add_locator_handler(skip, lambda: skip.click())
            page.goto(f"{url}/locations/k2batch.pipelines.definitions/jobs/batch_job")
            page.get_by_role("button", name="Materialize all…").click(timeout=60_000)
            choose_partition(page, "ui-batch")
            page.keyboard.press("Escape")
            launch = page.get_by_role("button", name="Launch 1 run")
            launch.click()
            launch.wait_for(state="detached")  # the dialog closes once the run is submitted
            run_id = launched_run(home)
            page.goto(f"{url}/runs/{run_id}")
            page.get_by_text("RUN_SUCCESS").first.wait_for(timeout=180_000)
            page.screenshot(path=ARTIFACTS / "ui-run.png")
            page.goto(f"{url}/assets/batch_report?partition=ui-batch")
            page.get_by_text("steps_per_episode").first.wait_for(timeout=60_000)
            # The asset page scrolls inside its own container, so full_page stops at the viewport: grow the
            # viewport to the report's length and width, then take the metadata table itself.
            page.set_viewport_size({"width": 2400, "height": 3000})
            metadata = page.locator("table").filter(has_text="steps_per_episode").first
            metadata.scroll_into_view_if_needed()
            metadata.screenshot(path=ARTIFACTS / "ui-batch-report.png")
            shown = metadata.inner_text()
            assert all(key in shown for key in ("api_cost_usd", "output_tokens_per_s", "tokens_per_task", "█"))
        except Exception:
            page.screenshot(path=ARTIFACTS / "ui-failure.png", full_page=True)
            print(f"failure screenshot: {ARTIFACTS / 'ui-failure.png'} at {page.url}")
            raise
        finally:
            browser.close()
    print(f"screenshots: {ARTIFACTS / 'ui-run.png'}, {ARTIFACTS / 'ui-batch-report.png'}")

    with dg.DagsterInstance.from_config(str(home)) as dagster:
        (run,) = dagster.get_runs()
        assert run.status == dg.DagsterRunStatus.SUCCESS and run.tags["dagster/partition"] == "ui-batch"
    output = root / "outputs" / "ui-batch"
    results = pl.read_parquet(f"{output}/results/**/*.parquet", hive_partitioning=True)
    assert results.height == JOBS.num_rows and (output / "summary.json").exists()
    assert sorted(p.name for p in (output / "manifests").iterdir()) == ["shard=00000.json", "shard=00001.json"]
    shutil.copy(tmp_path / "webserver.log", ARTIFACTS / "ui-webserver.log")
