"""The `read_object` tool: read UTF-8 text from object storage, under allowed URI prefixes only."""

import codecs
import os
from collections.abc import Sequence
from typing import Any
from urllib.parse import unquote, urlsplit

from k2batch.storage import open_for_reading

from .context import ToolContext
from .registry import TOOLS

MAX_READ_BYTES = 1 << 20  # the registry cuts results further; this bounds the download


def normalise_uri(uri: str) -> str:
    """`scheme://netloc/path` with a lower-case scheme. A local path (absolute, or relative to the
    working directory, as everywhere in k2batch) becomes file:///absolute/path.

    Refuses what could make a URI mean something other than it seems: `.` or `..` segments (also
    percent-encoded), queries and fragments, and file URIs naming a host.
    """
    if "?" in uri or "#" in uri:
        raise PermissionError(f"{uri!r}: queries and fragments are not allowed")
    if "://" in uri:
        parts = urlsplit(uri)
        if not parts.scheme or not uri.lower().startswith(f"{parts.scheme}://"):
            raise PermissionError(f"{uri!r} is neither a URI like s3://bucket/key nor a local path")
        scheme, netloc, path = parts.scheme, parts.netloc, parts.path
    else:
        scheme, netloc, path = "file", "", uri
    if any(unquote(segment) in (".", "..") for segment in f"{netloc}/{path}".split("/")):
        raise PermissionError(f"{uri!r}: '.' and '..' segments are not allowed")
    if scheme != "file":
        return f"{scheme}://{netloc}{path}"
    if netloc not in ("", "localhost"):
        raise PermissionError(f"{uri!r}: file URIs must not name a host")
    # Local paths collapse repeated slashes; object-store keys keep them, they are distinct keys.
    absolute = os.path.join(os.getcwd(), path)
    return "file:///" + "/".join(segment for segment in absolute.split("/") if segment)


def _within(uri: str, prefix: str) -> bool:
    root = prefix.rstrip("/")
    return uri == root or uri.startswith(root + "/")


def allowed_uri(uri: str, prefixes: Sequence[str]) -> str:
    """The normalised URI to read, or PermissionError if it is not under one of `prefixes`."""
    normalised = normalise_uri(uri)
    roots = [normalise_uri(p) for p in prefixes]
    if not any(_within(normalised, root) for root in roots):
        allowed = ", ".join(prefixes) or "none are configured"
        raise PermissionError(f"{uri!r} is outside the allowed prefixes ({allowed})")
    if normalised.startswith("file://"):
        # Resolve symlinks on both sides and check again: a link under a prefix may point anywhere.
        real = "file://" + os.path.realpath(normalised.removeprefix("file://"))
        local = [os.path.realpath(r.removeprefix("file://")) for r in roots if r.startswith("file://")]
        if not any(_within(real, "file://" + root) for root in local):
            raise PermissionError(f"{uri!r} resolves to a path outside the allowed prefixes")
        return real
    return normalised


def read_text(uri: str, storage_options: dict[str, Any]) -> str:
    with open_for_reading(uri, storage_options) as file:
        data = file.read(MAX_READ_BYTES + 1)
    truncated = len(data) > MAX_READ_BYTES
    try:
        # A cut may split a multi-byte character; the incremental decoder drops the partial tail.
        text = codecs.getincrementaldecoder("utf-8")().decode(data[:MAX_READ_BYTES], final=not truncated)
    except UnicodeDecodeError as error:
        raise ValueError(f"{uri} is not UTF-8 text (invalid byte at offset {error.start})") from None
    if truncated:
        text += f"\n[truncated: the object is larger than {MAX_READ_BYTES:,} bytes; this is its start]"
    return text


@TOOLS.tool(
    name="read_object",
    description="Read a text object (a document, a file) by its URI, e.g. s3://bucket/reports/q3.md.",
    parameters={
        "type": "object",
        "properties": {"uri": {"type": "string", "description": "URI of the object to read"}},
        "required": ["uri"],
    },
)
def read_object(args: dict[str, Any], ctx: ToolContext) -> str:
    uri = allowed_uri(args["uri"], ctx.settings.read_object_prefixes)
    if uri not in ctx.documents:  # the first read wins, so an episode sees one version of an object
        ctx.documents[uri] = read_text(uri, ctx.storage_options)
    return ctx.documents[uri]
