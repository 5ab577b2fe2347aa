"""Which tokens run in the next step: decode slots first, then prefill chunks, within a token budget."""

from __future__ import annotations

from collections import OrderedDict, deque

from k2batch.engine.block_manager import BlockManager
from k2batch.engine.config import EngineConfig
from k2batch.engine.sequence import Sequence


class Scheduler:
    def __init__(self, config: EngineConfig, blocks: BlockManager):
        self.max_num_seqs = config.max_num_seqs
        self.token_budget = config.max_num_batched_tokens
        self.blocks = blocks
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.kept: OrderedDict[str, Sequence] = OrderedDict()
        """Finished sequences whose KV stays pinned for a continuation (an agent waiting on a tool)."""
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> tuple[list[tuple[Sequence, int]], list[Sequence]]:
        """The step's (sequence, tokens to run) pairs, and sequences that can never fit in the cache."""
        budget = self.token_budget
        batch: list[tuple[Sequence, int]] = []
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            q_len = min(seq.num_pending, budget)
            while not self._allocate(seq, seq.num_computed + q_len):
                # Out of blocks: recompute-preempt the youngest running sequence (its cached full blocks stay
                # in the prefix cache, so resuming it is mostly cache hits).
                victim = self.running.pop()
                self._preempt(victim)
                if victim is seq:
                    break
            else:
                self.blocks.commit(seq, seq.num_computed + q_len)
                batch.append((seq, q_len))
                budget -= q_len
                i += 1

        unfit: list[Sequence] = []
        while self.waiting and len(self.running) < self.max_num_seqs and budget > 0:
            seq = self.waiting[0]
            if seq.num_computed == 0:  # a continuation arrives with its predecessor's KV
                self.blocks.match_prefix(seq)
            q_len = min(seq.num_pending, budget)
            if not self._allocate(seq, seq.num_computed + q_len):
                self.blocks.free(seq)
                if not self.running and not batch:
                    unfit.append(self.waiting.popleft())  # the whole cache is free and still too small
                    continue
                break
            self.waiting.popleft()
            if seq.num_prefilled == 0:  # first admission; a preempted sequence resuming was counted already
                seq.num_cached_prompt = seq.num_computed
                self.blocks.record_lookup(seq)
            self.running.append(seq)
            self.blocks.commit(seq, seq.num_computed + q_len)
            batch.append((seq, q_len))
            budget -= q_len
        return batch, unfit

    def _allocate(self, seq: Sequence, num_tokens: int) -> bool:
        """Allocate, unpinning kept sequences (oldest first) if memory is short: running work comes first."""
        while not self.blocks.allocate(seq, num_tokens):
            if not self.kept:
                return False
            _, old = self.kept.popitem(last=False)
            self.blocks.free(old)
        return True

    def keep(self, seq: Sequence) -> None:
        self.kept[seq.request_id] = seq

    def release(self, request_id: str) -> None:
        seq = self.kept.pop(request_id, None)
        if seq is not None:
            self.blocks.free(seq)

    def _preempt(self, seq: Sequence) -> None:
        self.blocks.free(seq)
        self.num_preemptions += 1
        self.waiting.appendleft(seq)

    def finish(self, seq: Sequence) -> None:
        self.running.remove(seq)
