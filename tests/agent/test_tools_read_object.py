"""The read_object tool: text under the allowed prefixes only, however the URI is dressed up."""

import json
import os
from pathlib import Path

import fsspec
import pytest

from k2batch.agent.tools import TOOLS, ToolContext, ToolResult, ToolSettings
from k2batch.agent.tools import read_object as read_object_module


@pytest.fixture()
def tree(tmp_path: Path) -> Path:
    allowed = tmp_path / "allowed"
    (allowed / "docs").mkdir(parents=True)
    (allowed / "docs" / "a.md").write_text("# Report\nrevenue grew ✓")
    (allowed / "latin1.txt").write_bytes("café".encode("latin-1"))
    (tmp_path / "allowed-not").mkdir()
    (tmp_path / "allowed-not" / "b.md").write_text("sibling")
    (tmp_path / "secret.txt").write_text("TOP-SECRET")
    os.symlink(tmp_path / "secret.txt", allowed / "docs" / "link.md")
    os.symlink(allowed / "docs" / "a.md", allowed / "docs" / "inner.md")
    return tmp_path


def read(tree: Path, uri: str, prefixes: tuple[str, ...] = ()) -> ToolResult:
    settings = ToolSettings(
        read_object_prefixes=prefixes or (f"file://{tree}/allowed/", "memory://k2batch-tests/docs")
    )
    ctx = ToolContext.for_job("job-1", "synthesis", settings)
    return TOOLS.call("read_object", json.dumps({"uri": uri}), ctx, 10.0, 10_000)


@pytest.mark.parametrize(
    "uri",
    [
        "file://{tree}/allowed/docs/a.md",
        "{tree}/allowed/docs/a.md",
        "FILE://{tree}/allowed//docs/a.md",
        "file://localhost{tree}/allowed/docs/a.md",
        "file://{tree}/allowed/docs/inner.md",
    ],
)
def test_allowed_reads(tree: Path, uri: str) -> None:
    result = read(tree, uri.format(tree=tree))
    assert (result.content, result.error_type) == ("# Report\nrevenue grew ✓", None)


def test_local_paths_and_memory_uris(tree: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert read(tree, f"file://{tree}/allowed/docs/a.md", (f"{tree}/allowed",)).error_type is None
    monkeypatch.chdir(tree)  # relative paths are local, from the working directory, as in configs/
    assert read(tree, "allowed/docs/a.md", ("allowed/",)).error_type is None
    assert read(tree, f"file://{tree}/allowed/docs/a.md", ("allowed",)).error_type is None
    assert "outside the allowed prefixes" in read(tree, "allowed-not/b.md", ("allowed",)).content
    with fsspec.open("memory://k2batch-tests/docs/note.txt", "w") as file:
        file.write("in memory")
    assert read(tree, "memory://k2batch-tests/docs/note.txt").content == "in memory"


@pytest.mark.parametrize(
    ("uri", "message"),
    [
        ("file://{tree}/allowed/../secret.txt", "'.' and '..' segments are not allowed"),
        ("file://{tree}/allowed/docs/%2e%2e/%2E%2E/secret.txt", "'.' and '..' segments are not allowed"),
        ("file://{tree}/allowed/./docs/a.md", "'.' and '..' segments are not allowed"),
        ("file://{tree}/secret.txt", "outside the allowed prefixes"),
        ("file://{tree}/allowed-not/b.md", "outside the allowed prefixes"),
        ("file:///etc/passwd", "outside the allowed prefixes"),
        ("s3://bucket{tree}/allowed/docs/a.md", "outside the allowed prefixes"),
        ("http://example.com{tree}/allowed/docs/a.md", "outside the allowed prefixes"),
        ("memory://k2batch-tests/other/x.txt", "outside the allowed prefixes"),
        ("file://evil.example.com{tree}/allowed/docs/a.md", "must not name a host"),
        ("file://{tree}/allowed/docs/a.md?version=2", "queries and fragments"),
        ("docs/a.md", "outside the allowed prefixes"),
        ("file:{tree}/allowed/docs/a.md", "outside the allowed prefixes"),
        ("x/y://{tree}/allowed/docs/a.md", "neither a URI"),
        ("{tree}/allowed/docs/a.md#top", "queries and fragments"),
        ("file://{tree}/allowed/docs/link.md", "resolves to a path outside the allowed prefixes"),
    ],
)
def test_refusals(tree: Path, uri: str, message: str) -> None:
    result = read(tree, uri.format(tree=tree))
    assert result.error_type == "tool_error"
    assert "PermissionError" in result.content and message in result.content
    assert "TOP-SECRET" not in result.content


def test_no_prefixes_means_nothing_is_readable(tree: Path) -> None:
    ctx = ToolContext.for_job("job-1", "synthesis", ToolSettings())
    result = TOOLS.call("read_object", json.dumps({"uri": f"{tree}/allowed/docs/a.md"}), ctx, 10.0, 1000)
    assert "none are configured" in result.content


def test_non_utf8_is_an_error(tree: Path) -> None:
    result = read(tree, f"file://{tree}/allowed/latin1.txt")
    assert result.error_type == "tool_error"
    assert "is not UTF-8 text (invalid byte at offset 3)" in result.content


def test_large_objects_are_cut_at_a_character_boundary(tree: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(read_object_module, "MAX_READ_BYTES", 10)
    (tree / "allowed" / "big.txt").write_text("ab✓✓✓✓✓")  # a cut at 10 bytes splits the third ✓
    result = read(tree, f"file://{tree}/allowed/big.txt")
    assert result.content == "ab✓✓\n[truncated: the object is larger than 10 bytes; this is its start]"


def test_an_episode_sees_one_version_of_an_object(tree: Path) -> None:
    settings = ToolSettings(read_object_prefixes=(f"file://{tree}/allowed/",))
    ctx = ToolContext.for_job("job-1", "synthesis", settings)
    path = tree / "allowed" / "docs" / "a.md"
    first = TOOLS.call("read_object", json.dumps({"uri": str(path)}), ctx, 10.0, 1000)
    path.write_text("changed")
    again = TOOLS.call("read_object", json.dumps({"uri": f"file://{path}"}), ctx, 10.0, 1000)
    assert first.content == again.content == "# Report\nrevenue grew ✓"
    fresh = ToolContext.for_job("job-2", "synthesis", settings)
    assert TOOLS.call("read_object", json.dumps({"uri": str(path)}), fresh, 10.0, 1000).content == "changed"
