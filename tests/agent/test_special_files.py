"""FIFOs, devices and sockets where a batch reads (inputs, manifests, read_object's prefixes) are skipped or
refused at once: nothing blocks on them, and they change no later read."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from k2batch.agent.tools import TOOLS, ToolContext, ToolSettings
from k2batch.cli import main
from tests.agent.test_batch import read
from tests.test_storage import special_files, writer_after


def test_k2batch_run_skips_a_fifo_among_the_inputs_and_a_fifo_manifest(k2_checkpoint, tmp_path, capsys):
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    pq.write_table(pa.table({"job_id": ["a", "b"], "prompt": ["x", "y"]}), inputs / "jobs.parquet")
    special_files(inputs)
    (tmp_path / "batch.toml").write_text(
        f'model = "{k2_checkpoint}"\n[engine]\nmax_num_seqs = 4\nnum_kv_blocks = 256\n'
        "[sampling]\ntemperature = 0.0\nmax_new_tokens = 4\n[agent]\nmax_steps = 1\n[tools]\nenabled = []\n"
    )
    output = tmp_path / "out"
    command = ["run", "--input", str(inputs), "--output", str(output), "--config", str(tmp_path / "batch.toml")]
    with writer_after(inputs / "fifo.parquet", 30.0) as unblocked:
        main(command)
    assert not unblocked and "2 rows" in capsys.readouterr().out
    # A FIFO in place of a manifest: the shard counts as not done and runs again, nothing waits for a writer.
    manifest = output / "manifests" / "shard=00000.json"
    manifest.unlink()
    os.mkfifo(manifest)
    with writer_after(manifest, 30.0) as unblocked:
        main(command)
    assert not unblocked and "2 rows" in capsys.readouterr().out
    assert stat.S_ISREG(manifest.stat().st_mode)
    assert sorted(read(str(output), "results")["job_id"].to_list()) == ["a", "b"]


def test_read_object_refuses_a_fifo_under_its_prefix_and_later_reads_work(tmp_path: Path) -> None:
    (tmp_path / "doc.md").write_text("the report")
    made = special_files(tmp_path)
    ctx = ToolContext.for_job("job-1", "draft", ToolSettings(read_object_prefixes=(str(tmp_path),)))

    def read_object(path: Path) -> tuple[str, str | None]:
        result = TOOLS.call("read_object", json.dumps({"uri": str(path)}), ctx, 5.0, 10_000)
        return result.content, result.error_type

    with writer_after(tmp_path / "fifo.parquet", 10.0) as unblocked:
        for path in made:
            content, error_type = read_object(path)
            # The link to a device resolves outside the prefix: refused before it is opened.
            why = "outside the allowed prefixes" if path.is_symlink() else "is not a regular file"
            assert error_type == "tool_error" and why in content, path
    assert not unblocked
    assert read_object(tmp_path / "doc.md") == ("the report", None)
