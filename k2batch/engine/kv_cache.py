"""Who holds which KV blocks: reference counts, free blocks, full blocks shared through the prefix cache, and the
agent sessions whose KV stays pinned between steps."""

from __future__ import annotations

from collections import OrderedDict, deque

from k2batch.engine.prefix_cache import Node, PrefixCache, common_prefix_len
from k2batch.engine.sequence import Sequence


class KVCacheManager:
    """The scheduler's one view of KV memory. Every change to a sequence's blocks goes through here.

    A session is a finished request kept with its KV (`keep_kv`) because its agent will continue it after a tool
    call. Sessions are pinned but never block running work: when blocks run short the oldest session is evicted
    (its full blocks stay in the prefix cache until reused), and its continuation recomputes what was lost.
    """

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool):
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.ref_count = [0] * num_blocks
        self.free_blocks: deque[int] = deque(range(num_blocks))
        self.cache = PrefixCache(block_size) if enable_prefix_caching else None
        self.sessions: OrderedDict[str, Sequence] = OrderedDict()
        self.num_sessions_evicted = 0
        # Per sequence: the prefix-cache nodes of its first full blocks. A node's block is not the sequence's own
        # when another sequence published the same content first; the sequence then references that block too,
        # because its later blocks hang under that node and a cached node must not be evicted under them.
        self._path: dict[str, list[Node]] = {}

    @property
    def num_allocatable(self) -> int:
        """Blocks that can be handed out now: free ones, and cached ones nobody references."""
        return len(self.free_blocks) + (self.cache.num_evictable if self.cache else 0)

    # -- sessions ------------------------------------------------------------------------------------------

    def keep(self, seq: Sequence) -> None:
        """Pin a finished sequence's KV as a session. Its last sampled token has not been through the model."""
        seq.num_computed = len(seq) - 1
        self.sessions[seq.request_id] = seq

    def resume(self, session_id: str, seq: Sequence) -> None:
        """Give `seq` the KV of the tokens it shares with the session it continues. If the session was evicted,
        nothing is carried over: the prefix cache serves what survived when `seq` is admitted."""
        old = self.sessions.pop(session_id, None)
        if old is None:
            return
        # The last prompt token always runs (its logits pick the next token), even if its KV is there.
        shared = common_prefix_len(old.token_slice(0, old.num_computed), seq.prompt_ids[:-1])
        self._transfer(old, seq, shared)

    def release(self, session_id: str) -> None:
        """End a session: its KV is unpinned (full blocks stay in the prefix cache until evicted)."""
        seq = self.sessions.pop(session_id, None)
        if seq is not None:
            self.free(seq)

    def _evict_session(self) -> bool:
        if not self.sessions:
            return False
        _, old = self.sessions.popitem(last=False)
        self.free(old)
        self.num_sessions_evicted += 1
        return True

    # -- blocks of running and waiting sequences -----------------------------------------------------------

    def match_prefix(self, seq: Sequence) -> None:
        """Point a new sequence's first blocks at cached ones, and count the tokens it can skip.

        Full blocks are shared. If a cached block then starts with the sequence's next tokens, their latents
        are copied into the sequence's own block (`copy_from`), so a prefix ending inside a block is not
        recomputed either. At least one token is always left to compute: the model must run on it to produce
        the next logits.
        """
        if self.cache is None:
            return
        tokens = seq.token_slice(0, len(seq) - 1)
        nodes = self.cache.match(tokens)
        for node in nodes:
            self._ref(node.block)
            seq.block_table.append(node.block)
        if nodes:
            self._path[seq.request_id] = nodes
        seq.num_computed = len(nodes) * self.block_size
        partial = self.cache.match_partial(nodes[-1] if nodes else self.cache.root, tokens[seq.num_computed :])
        if partial is not None and self._room_for_copy(seq):
            node, num_tokens = partial
            self._ref(node.block)  # held until the copy is done, so it cannot be evicted and rewritten first
            seq.copy_from = node.block
            seq.num_computed += num_tokens

    def copy_done(self, seq: Sequence) -> None:
        """After the forward that copied `seq.copy_from`'s latents: let go of that block."""
        self._unref(seq.copy_from)
        seq.copy_from = None

    def record_lookup(self, seq: Sequence) -> None:
        """Count an admitted sequence's prefix-cache hits and misses, in full prompt blocks."""
        if self.cache is not None:
            self.cache.count_lookup(seq.num_computed // self.block_size, (len(seq) - 1) // self.block_size)

    def allocate(self, seq: Sequence, num_tokens: int, evict_sessions: bool = True) -> bool:
        """Grow the block table to hold `num_tokens` tokens, evicting sessions (oldest first) if blocks are short
        and `evict_sessions`; False (and nothing changed but evictions) if that is not enough."""
        needed = -(-num_tokens // self.block_size) - len(seq.block_table)
        if needed <= 0:  # most decode steps: the last block has room
            return True
        while needed > self.num_allocatable:  # exact (see PrefixCache), so the loop below cannot run short
            if not evict_sessions or not self._evict_session():
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
        path = self._path.setdefault(seq.request_id, [])
        bs = self.block_size
        if (len(path) + 1) * bs > num_tokens:  # no block filled up since the last commit (most decode steps)
            return
        node = path[-1] if path else self.cache.root
        while (len(path) + 1) * bs <= num_tokens:
            i = len(path)
            node = self.cache.insert(node, tuple(seq.token_slice(i * bs, (i + 1) * bs)), seq.block_table[i])
            if node.block != seq.block_table[i]:
                self._ref(node.block)
            path.append(node)

    def free(self, seq: Sequence) -> None:
        self._truncate(seq, 0)
        if seq.copy_from is not None:
            self.copy_done(seq)
        seq.num_computed = 0
        self._path.pop(seq.request_id, None)

    def _transfer(self, old: Sequence, new: Sequence, num_tokens: int) -> None:
        """Hand the KV of a finished sequence's first `num_tokens` tokens to its continuation; free the rest."""
        new.block_table, old.block_table = old.block_table, []
        if old.request_id in self._path:
            self._path[new.request_id] = self._path.pop(old.request_id)
        self._truncate(new, num_tokens)
        new.num_computed = num_tokens
        if num_tokens % self.block_size and self._is_cached(new.block_table[-1]):
            # The continuation writes into its last block, but that block is published and others may read
            # it: copy the kept latents into a fresh block instead (the reference moves to copy_from), or
            # recompute them if the cache has no room for the copy.
            last = new.block_table.pop()
            if self._room_for_copy(new):
                new.copy_from = last
            else:
                self._unref(last)
                new.num_computed -= num_tokens % self.block_size

    def _room_for_copy(self, seq: Sequence) -> bool:
        """A copy's source block is held through the sequence's first step, one block beyond its own. Copy only
        if that still fits in the whole cache, so a request that needs all of it is never turned away."""
        return -(-len(seq) // self.block_size) < self.num_blocks

    def _truncate(self, seq: Sequence, num_tokens: int) -> None:
        """Drop the sequence's blocks past its first `num_tokens` tokens, and its path past their full blocks."""
        bs = self.block_size
        path = self._path.get(seq.request_id, [])
        for i in reversed(range(num_tokens // bs, len(path))):
            if path[i].block != seq.block_table[i]:
                self._unref(path[i].block)
        del path[num_tokens // bs :]
        keep = -(-num_tokens // bs)
        for block in reversed(seq.block_table[keep:]):  # deepest first: leaves are evicted before their parents
            self._unref(block)
        del seq.block_table[keep:]

    def _is_cached(self, block: int) -> bool:
        return self.cache is not None and block in self.cache.node_of_block

    def _ref(self, block: int) -> None:
        if self.ref_count[block] == 0 and self.cache is not None:
            self.cache.mark_referenced(block)
        self.ref_count[block] += 1

    def _unref(self, block: int) -> None:
        self.ref_count[block] -= 1
        if self.ref_count[block] == 0:
            if self._is_cached(block):
                self.cache.mark_unreferenced(block)
            else:
                self.free_blocks.append(block)
