"""Which rank of a data-parallel engine runs a request: prefix affinity within a load bound, sessions at home."""

from __future__ import annotations

from collections.abc import Sequence

from k2batch.engine.prefix_cache import PrefixCache

_MAX_BLOCKS = 256
"""Depth of the placement tries in blocks: enough for system prompts, tool declarations and shared documents."""


class _Trie:
    """Prompts placed on a rank and not yet finished, as block-sized token chunks with counts."""

    def __init__(self):
        self.root: dict = {}

    def _chunks(self, tokens: Sequence[int], block_size: int) -> list[tuple[int, ...]]:
        n = min(len(tokens) // block_size, _MAX_BLOCKS)
        return [tuple(tokens[i * block_size : (i + 1) * block_size]) for i in range(n)]

    def add(self, tokens: Sequence[int], block_size: int, delta: int) -> None:
        node = self.root
        for chunk in self._chunks(tokens, block_size):
            entry = node.setdefault(chunk, [0, {}])
            entry[0] += delta
            if entry[0] == 0:
                del node[chunk]
                return
            node = entry[1]

    def match(self, tokens: Sequence[int], block_size: int) -> int:
        node, depth = self.root, 0
        for chunk in self._chunks(tokens, block_size):
            entry = node.get(chunk)
            if entry is None:
                break
            depth, node = depth + 1, entry[1]
        return depth


class Placement:
    """A continuation runs on the rank holding its session. A new request goes to the rank holding the longest
    prefix of it (in that rank's prefix cache, or among the requests already placed there), chosen among the ranks
    within `slack` unfinished requests of the least loaded one, so one shared system prompt does not pull a whole
    batch onto one rank; with no prefix anywhere it goes to the least loaded rank."""

    def __init__(self, caches: Sequence[PrefixCache | None], block_size: int, slack: int = 2):
        self.caches = list(caches)
        self.block_size = block_size
        self.slack = slack
        self.load = [0] * len(caches)
        """Unfinished requests per rank."""
        self.placed = [0] * len(caches)
        """Requests placed on each rank so far (the batch's spread)."""
        self._tries = [_Trie() for _ in caches]
        self._requests: dict[str, tuple[int, list[int]]] = {}  # unfinished: rank, prompt
        self._sessions: dict[str, int] = {}  # kept sessions: rank

    def place(self, request_id: str, prompt_ids: list[int], continue_from: str | None) -> int:
        rank = self._sessions.pop(continue_from, None) if continue_from is not None else None
        if rank is None:
            least = min(self.load)
            candidates = [r for r, load in enumerate(self.load) if load <= least + self.slack]
            scores = {r: self._prefix_blocks(r, prompt_ids) for r in candidates}
            best = max(scores.values())
            rank = min((r for r in candidates if scores[r] == best), key=lambda r: (self.load[r], r))
        self.load[rank] += 1
        self.placed[rank] += 1
        self._tries[rank].add(prompt_ids, self.block_size, 1)
        self._requests[request_id] = (rank, prompt_ids)
        return rank

    def _prefix_blocks(self, rank: int, prompt_ids: list[int]) -> int:
        cache = self.caches[rank]
        cached = len(cache.match(prompt_ids[: _MAX_BLOCKS * self.block_size])) if cache is not None else 0
        return max(cached, self._tries[rank].match(prompt_ids, self.block_size))

    def finished(self, request_id: str, kept: bool) -> None:
        if request_id not in self._requests:  # rejected before it was placed
            return
        rank, prompt_ids = self._requests.pop(request_id)
        self.load[rank] -= 1
        self._tries[rank].add(prompt_ids, self.block_size, -1)
        if kept:
            self._sessions[request_id] = rank

    def session_rank(self, session_id: str) -> int | None:
        return self._sessions.get(session_id)

    def released(self, session_id: str) -> None:
        self._sessions.pop(session_id, None)
