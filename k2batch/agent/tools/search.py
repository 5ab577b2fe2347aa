"""The `search` tool: BM25 over a corpus Parquet (doc_id, title, text), indexed once per URI."""

import json
import logging
import re
import threading
from typing import Any

import bm25s
import numpy as np
import pyarrow.parquet as pq

from k2batch.storage import filesystem, open_for_reading

from .context import ToolContext
from .registry import TOOLS

log = logging.getLogger(__name__)

DEFAULT_K = 5
MAX_K = 20
SNIPPET_CHARS = 300
_COLUMNS = ["doc_id", "title", "text"]


def _tokenize(texts: list[str]) -> list[list[str]]:
    return bm25s.tokenize(texts, stopwords="en", return_ids=False, show_progress=False)


class CorpusIndex:
    """A corpus and its BM25 index. Read-only after construction, so safe to share across threads."""

    def __init__(self, doc_ids: list[str], titles: list[str], texts: list[str]) -> None:
        self.doc_ids, self.titles, self.texts = doc_ids, titles, texts
        self.bm25 = bm25s.BM25()
        # Title and text are indexed together, so a word of the title counts as a match too.
        self.bm25.index(_tokenize([f"{t}\n{x}" for t, x in zip(titles, texts, strict=True)]), show_progress=False)

    def search(self, query: str, k: int) -> list[int]:
        """Indices of the top-k documents with a positive score; ties go to the earlier row."""
        tokens = [t for t in _tokenize([query])[0] if t in self.bm25.vocab_dict]
        if not tokens or not self.doc_ids:
            return []
        scores = self.bm25.get_scores(tokens)
        k = min(k, len(scores))
        # Everything scoring at least the k-th best, then a stable sort: ties keep row order,
        # so the same query always lists the same documents in the same order.
        threshold = np.partition(scores, len(scores) - k)[len(scores) - k]
        candidates = np.flatnonzero((scores >= threshold) & (scores > 0))
        order = candidates[np.argsort(-scores[candidates], kind="stable")]
        return order[:k].tolist()


# Per (URI, storage options): the corpus fingerprint the index was built from, and the index. A rewritten
# corpus (other size, mtime or ETag) is indexed again and replaces the old index.
_indexes: dict[tuple[str, str], tuple[tuple[Any, ...], CorpusIndex]] = {}
_build_lock = threading.Lock()


def _build_index(uri: str, options: dict[str, Any]) -> CorpusIndex:
    with open_for_reading(uri, options) as file:
        table = pq.read_table(file)
    missing = [c for c in _COLUMNS if c not in table.column_names]
    if missing:
        raise ValueError(f"search corpus {uri} lacks columns {missing}; it needs {_COLUMNS}")
    columns = [[str(v) if v is not None else "" for v in table.column(c).to_pylist()] for c in _COLUMNS]
    log.info("indexing search corpus %s: %d documents", uri, table.num_rows)
    return CorpusIndex(*columns)


def _fingerprint(fs: Any, path: str) -> tuple[Any, ...]:
    """What changes when the corpus file does, from one stat (or HEAD) call, without reading it."""
    fs.invalidate_cache(path)
    info = fs.info(path)
    # Each fsspec implementation names these differently: local mtime, memory created, S3 LastModified and ETag.
    return tuple(info.get(key) for key in ("size", "mtime", "created", "LastModified", "ETag", "etag"))


def corpus_index(uri: str, storage_options: dict[str, Any] | None = None) -> CorpusIndex:
    """The index of the corpus at `uri`, built on first use and shared by later calls while the file is unchanged."""
    options = storage_options or {}
    key = (uri, json.dumps(options, sort_keys=True, default=str))
    fs, path = filesystem(uri, options)
    fingerprint = _fingerprint(fs, path)
    cached = _indexes.get(key)
    if cached is None or cached[0] != fingerprint:
        with _build_lock:  # one build per corpus version even when many episodes search at once
            cached = _indexes.get(key)
            if cached is None or cached[0] != fingerprint:
                cached = _indexes[key] = (fingerprint, _build_index(uri, options))
    return cached[1]


def _snippet(text: str, query: str) -> str:
    """A window of the text around the first query word it contains (else its start)."""
    flat = " ".join(text.split())
    words = re.findall(r"\w\w+", query.lower())
    lowered = flat.lower()
    hits = [i for i in (lowered.find(w) for w in words) if i >= 0]
    start = max(0, min(hits) - SNIPPET_CHARS // 3) if hits else 0
    window = flat[start : start + SNIPPET_CHARS]
    return ("…" if start else "") + window + ("…" if start + SNIPPET_CHARS < len(flat) else "")


@TOOLS.tool(
    name="search",
    description="Search the document corpus (BM25 keyword ranking). Returns the best matches, "
    "each with its doc_id, title and a snippet of its text.",
    parameters={
        "type": "object",
        "properties": {
            "query": {"type": "string", "description": "keywords to search for"},
            "k": {
                "type": "integer",
                "description": f"number of results (default {DEFAULT_K})",
                "minimum": 1,
                "maximum": MAX_K,
            },
        },
        "required": ["query"],
    },
)
def search(args: dict[str, Any], ctx: ToolContext) -> str:
    uri = ctx.settings.search_corpus
    if not uri:
        raise ValueError("no search corpus is configured (tools.search_corpus is empty)")
    index = corpus_index(uri, ctx.storage_options)
    query = args["query"]
    hits = index.search(query, args.get("k", DEFAULT_K))
    if not hits:
        return f"no results for {query!r}"
    return "\n\n".join(f"[{index.doc_ids[i]}] {index.titles[i]}\n{_snippet(index.texts[i], query)}" for i in hits)
