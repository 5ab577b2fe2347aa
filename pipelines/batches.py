"""Batches on storage: which files under {root}/inputs/ make which batch, and what a batch's inputs look like now.

A batch is a folder `inputs/{batch}/` of Parquet files (any depth) or a single file `inputs/{batch}.parquet`;
the same under `inputs/nightly/` for batches the nightly schedule runs. Its outputs go to `outputs/{batch}/`.
The batch name is the Dagster partition key, so it is unique over inputs/ and inputs/nightly/."""

from __future__ import annotations

import hashlib
import logging
import re

import msgspec

from k2batch.storage import FileInfo, StorageOptions, join, list_files

log = logging.getLogger(__name__)

NIGHTLY = "nightly"
# Partition keys appear in URLs, run tags and object keys: keep them plain.
_BATCH_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


class BatchInput(msgspec.Struct, frozen=True, kw_only=True):
    """One batch as listed now: its name, what to plan shards over, and its files with their fingerprints."""

    name: str
    input_uri: str
    """The batch's folder, or its single file."""
    nightly: bool
    files: tuple[FileInfo, ...]

    @property
    def fingerprint(self) -> str:
        """Changes when a file of the batch is added, removed or rewritten with other content (ETag or MD5)."""
        listing = sorted((file.uri, file.etag_or_hash) for file in self.files)
        return hashlib.sha256(msgspec.json.encode(listing)).hexdigest()[:16]


class Listing(msgspec.Struct, frozen=True):
    batches: dict[str, BatchInput]
    ambiguous: dict[str, tuple[str, ...]]
    """Names claimed by more than one input (say inputs/a/ and inputs/nightly/a/): these do not run."""


def inputs_uri(root: str) -> str:
    return join(root, "inputs")


def outputs_uri(root: str, batch: str) -> str:
    return join(root, "outputs", batch)


def batch_of(inputs: str, file: FileInfo) -> tuple[str, str, bool] | None:
    """(name, input URI, nightly) of the batch `file` belongs to; None for a name that cannot be a batch."""
    parts = file.uri[len(inputs.rstrip("/")) + 1 :].split("/")
    nightly = parts[0] == NIGHTLY and len(parts) > 1
    prefix = [NIGHTLY] if nightly else []
    parts = parts[1:] if nightly else parts
    if len(parts) == 1:
        name, uri = parts[0].removesuffix(".parquet"), file.uri
    else:
        name, uri = parts[0], join(inputs, *prefix, parts[0])
    if not _BATCH_NAME.fullmatch(name):
        log.warning("%s: %r is not a batch name (letters, digits, '.', '_', '-'); ignoring it", file.uri, name)
        return None
    return name, uri, nightly


def list_batches(root: str, options: StorageOptions = None, *, files: list[FileInfo] | None = None) -> Listing:
    """Every batch under {root}/inputs/ (from `files`, a listing of it, when given). Only *.parquet files count."""
    inputs = inputs_uri(root)
    files = list_files(inputs, options) if files is None else files
    found: dict[str, dict[str, list[FileInfo]]] = {}
    nightly: dict[str, bool] = {}
    for file in files:
        owner = batch_of(inputs, file)
        if owner is not None:
            name, uri, nightly[uri] = owner
            found.setdefault(name, {}).setdefault(uri, []).append(file)
    batches, ambiguous = {}, {}
    for name, by_uri in found.items():
        if len(by_uri) > 1:
            log.warning("batch name %r is claimed by %s; rename one of them", name, ", ".join(sorted(by_uri)))
            ambiguous[name] = tuple(sorted(by_uri))
            continue
        ((uri, members),) = by_uri.items()
        batches[name] = BatchInput(name=name, input_uri=uri, nightly=nightly[uri], files=tuple(members))
    return Listing(batches=batches, ambiguous=ambiguous)
