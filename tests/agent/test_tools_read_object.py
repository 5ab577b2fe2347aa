"""The read_object tool: text under the allowed prefixes only, however the URI is dressed up."""

import json
import os
from pathlib import Path

import fsspec
import pytest

from k2batch.agent.tools import TOOLS, ToolContext, ToolResult, ToolSettings
from k2batch.agent.tools import read_object as read_object_module
from tests.s3_server import s3_bucket, s3_endpoint, s3_options  # noqa: F401 (fixtures)


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
    settings = ToolSettings(read_object_prefixes=prefixes or (f"file://{tree}/allowed/", "memory://k2batch-tests/docs"))
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


def test_traversal_on_s3_is_refused_and_the_prefix_reads(s3_bucket: str, s3_options: dict) -> None:
    import s3fs

    fs = s3fs.S3FileSystem(**s3_options)
    fs.pipe(f"{s3_bucket}/allowed/doc.md", b"the report")
    fs.pipe(f"{s3_bucket}/secret/key.txt", b"TOP-SECRET")
    fs.pipe(f"{s3_bucket}/allowed-not/x.md", b"TOP-SECRET")
    bucket = s3_bucket.removeprefix("s3://")
    settings = ToolSettings(read_object_prefixes=(f"{s3_bucket}/allowed/",))
    ctx = ToolContext.for_job("job-1", "synthesis", settings, s3_options)

    def read_s3(uri: str) -> ToolResult:
        return TOOLS.call("read_object", json.dumps({"uri": uri}), ctx, 10.0, 10_000)

    assert read_s3(f"{s3_bucket}/allowed/doc.md").content == "the report"
    assert read_s3(f"S3://{bucket}/allowed/doc.md").content == "the report"  # the scheme's case does not matter
    for uri in (
        f"{s3_bucket}/allowed/../secret/key.txt",
        f"{s3_bucket}/allowed/%2E%2E/secret/key.txt",
        f"{s3_bucket}/allowed/./../secret/key.txt",
        f"{s3_bucket}/secret/key.txt",
        f"{s3_bucket}/allowed-not/x.md",
        f"s3://{bucket}-other/allowed/doc.md",
        f"s3://{bucket}/allowed/doc.md?versionId=1",
        f"s3a://{bucket}/secret/key.txt",
    ):
        result = read_s3(uri)
        assert result.error_type == "tool_error" and "PermissionError" in result.content, uri
        assert "TOP-SECRET" not in result.content
