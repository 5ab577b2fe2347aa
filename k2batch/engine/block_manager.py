"""KV block allocation: reference counts, free blocks, and sharing full blocks through the prefix cache."""

from __future__ import annotations

from collections import deque

from k2batch.engine.prefix_cache import Node, PrefixCache
from k2batch.engine.sequence import Sequence


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool):
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.ref_count = [0] * num_blocks
        self.free_blocks: deque[int] = deque(range(num_blocks))
        self.cache = PrefixCache(block_size) if enable_prefix_caching else None
        # Per sequence: the deepest prefix-cache node on its path and how many of its blocks that path covers.
        self._path: dict[str, tuple[Node, int]] = {}

    @property
    def num_available(self) -> int:
        return len(self.free_blocks) + (self.cache.num_evictable if self.cache else 0)

    def blocks_needed(self, seq: Sequence, num_tokens: int) -> int:
        return max(0, -(-num_tokens // self.block_size) - len(seq.block_table))

    def match_prefix(self, seq: Sequence) -> int:
        """Point a new sequence's first blocks at cached ones; returns the number of tokens it can skip.

        At least one token is always left to compute: the model must run on it to produce the next logits.
        """
        if self.cache is None:
            return 0
        tokens = seq.tokens
        nodes = self.cache.match(tokens[: len(tokens) - 1])
        for node in nodes:
            self._ref(node.block)
            seq.block_table.append(node.block)
        if nodes:
            self._path[seq.request_id] = (nodes[-1], len(nodes))
        seq.num_computed = len(nodes) * self.block_size
        return seq.num_computed

    def record_lookup(self, seq: Sequence) -> None:
        """Count an admitted sequence's prefix-cache hits and misses, in full prompt blocks."""
        if self.cache is not None:
            self.cache.count_lookup(seq.num_computed // self.block_size, (len(seq) - 1) // self.block_size)

    def allocate(self, seq: Sequence, num_tokens: int) -> bool:
        """Grow the block table to hold `num_tokens` tokens; False (and nothing changed) if memory is short."""
        needed = self.blocks_needed(seq, num_tokens)
        if needed > self.num_available:
            return False
        for _ in range(needed):
            block = self.free_blocks.popleft() if self.free_blocks else self.cache.evict()
            self._ref(block)
            seq.block_table.append(block)
        return True

    def commit(self, seq: Sequence, num_tokens: int) -> None:
        """Publish the full blocks among the sequence's first `num_tokens` tokens in the prefix cache.

        Called when a step is scheduled, before its forward: a later sequence of the same step may then share
        those blocks, because every layer writes the step's latents before any of its attention reads them.
        """
        if self.cache is None:
            return
        node, covered = self._path.get(seq.request_id, (self.cache.root, 0))
        tokens = seq.tokens
        bs = self.block_size
        while (covered + 1) * bs <= num_tokens:
            block = seq.block_table[covered]
            node, _ = self.cache.insert(node, tuple(tokens[covered * bs : (covered + 1) * bs]), block)
            covered += 1
        self._path[seq.request_id] = (node, covered)

    def free(self, seq: Sequence) -> None:
        for block in reversed(seq.block_table):  # deepest first: leaves are evicted before their parents
            self._unref(block)
        seq.block_table.clear()
        seq.num_computed = 0
        self._path.pop(seq.request_id, None)

    def transfer(self, old: Sequence, new: Sequence) -> None:
        """Hand a finished sequence's blocks (and its prefix-cache path) to its continuation."""
        new.block_table, old.block_table = old.block_table, []
        new.num_computed = old.num_computed
        if old.request_id in self._path:
            self._path[new.request_id] = self._path.pop(old.request_id)

    def _ref(self, block: int) -> None:
        if self.ref_count[block] == 0 and self.cache is not None:
            self.cache.mark_referenced(block)
        self.ref_count[block] += 1

    def _unref(self, block: int) -> None:
        self.ref_count[block] -= 1
        if self.ref_count[block] == 0:
            if self.cache is not None and block in self.cache.node_of_block:
                self.cache.mark_unreferenced(block)
            else:
                self.free_blocks.append(block)
