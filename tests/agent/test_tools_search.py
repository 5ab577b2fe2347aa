"""The search tool: BM25 ranking over a corpus Parquet, one index per corpus, thread-safe."""

import json
import threading
from pathlib import Path

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from k2batch.agent.tools import TOOLS, ToolContext, ToolSettings
from k2batch.agent.tools import search as search_module

DOCS = [
    ("d1", "Volcanoes of Iceland", "Iceland has many active volcanoes; Hekla erupted in 2000."),
    ("d2", "Tea cultivation", "Tea plants grow best on misty hillsides with acidic soil."),
    ("d3", "Glaciers", "Vatnajokull is the largest glacier in Iceland and covers volcanoes."),
    ("d4", "Coffee roasting", "Roasting coffee beans changes their colour and flavour."),
    ("d5", "Tea cultivation", "Tea plants grow best on misty hillsides with acidic soil."),
]


def write_corpus(uri: str) -> None:
    table = pa.table({name: [d[i] for d in DOCS] for i, name in enumerate(["doc_id", "title", "text"])})
    with fsspec.open(uri, "wb") as file:
        pq.write_table(table, file)


def run_search(uri: str, arguments: dict) -> str:
    ctx = ToolContext.for_job("job-1", "retrieval", ToolSettings(search_corpus=uri))
    result = TOOLS.call("search", json.dumps(arguments), ctx, 30.0, 10_000)
    assert result.error_type is None, result.content
    return result.content


def hit_ids(listing: str) -> list[str]:
    return [line[1 : line.index("]")] for line in listing.splitlines() if line.startswith("[")]


@pytest.fixture()
def corpus_uri(tmp_path: Path) -> str:
    uri = f"file://{tmp_path}/corpus.parquet"
    write_corpus(uri)
    return uri


def test_relevant_document_ranks_first(corpus_uri: str) -> None:
    listing = run_search(corpus_uri, {"query": "coffee beans roasting"})
    assert hit_ids(listing)[0] == "d4"
    assert listing.startswith("[d4] Coffee roasting\nRoasting coffee beans")


def test_k_limits_hits_and_ties_keep_corpus_order(corpus_uri: str) -> None:
    assert hit_ids(run_search(corpus_uri, {"query": "tea hillsides"})) == ["d2", "d5"]
    assert hit_ids(run_search(corpus_uri, {"query": "tea hillsides", "k": 1})) == ["d2"]
    assert hit_ids(run_search(corpus_uri, {"query": "iceland volcanoes", "k": 20}))[:2] == ["d1", "d3"]


def test_no_match_and_bad_k(corpus_uri: str) -> None:
    assert run_search(corpus_uri, {"query": "submarine"}) == "no results for 'submarine'"
    ctx = ToolContext.for_job("job-1", "retrieval", ToolSettings(search_corpus=corpus_uri))
    result = TOOLS.call("search", json.dumps({"query": "tea", "k": 50}), ctx, 30.0, 10_000)
    assert result.error_type == "invalid_arguments"
    assert "greater than the maximum 20" in result.content


def test_missing_corpus_setting_is_a_clear_error() -> None:
    ctx = ToolContext.for_job("job-1", "retrieval", ToolSettings(search_corpus=""))
    result = TOOLS.call("search", '{"query": "tea"}', ctx, 30.0, 10_000)
    assert result.error_type == "tool_error"
    assert "no search corpus is configured" in result.content


def test_memory_uri_index_is_built_once_across_threads(monkeypatch: pytest.MonkeyPatch) -> None:
    uri = "memory://k2batch-tests/search/corpus.parquet"
    write_corpus(uri)
    builds: list[str] = []
    build = search_module._build_index

    def counting_build(uri: str, options: dict) -> search_module.CorpusIndex:
        builds.append(uri)
        return build(uri, options)

    monkeypatch.setattr(search_module, "_build_index", counting_build)
    listings: list[str] = []

    def worker() -> None:
        listings.append(run_search(uri, {"query": "glacier"}))

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    run_search(uri, {"query": "tea"})
    assert builds == [uri]
    assert len(listings) == 8 and all(hit_ids(listing) == ["d3"] for listing in listings)
    assert search_module.corpus_index(uri) is search_module.corpus_index(uri)


def test_a_rewritten_corpus_is_indexed_again(tmp_path: Path) -> None:
    uri = f"file://{tmp_path}/corpus.parquet"
    write_corpus(uri)
    first = search_module.corpus_index(uri)
    assert search_module.corpus_index(uri) is first
    assert search_module.corpus_index(uri, {"anon": True}) is not first  # other options: its own entry
    table = pa.table({"doc_id": ["n1"], "title": ["Submarines"], "text": ["A submarine dives."]})
    pq.write_table(table, tmp_path / "corpus.parquet")
    assert hit_ids(run_search(uri, {"query": "submarine"})) == ["n1"]
    assert search_module.corpus_index(uri) is not first
