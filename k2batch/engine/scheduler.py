"""The one owner of request state: plans each step (decode slots first, then prefill chunks, within a token
budget) and applies its result (computed tokens, sampled tokens, finishing, preemption, sessions)."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

import torch

from k2batch.engine.config import EngineConfig
from k2batch.engine.kv_cache import KVCacheManager
from k2batch.engine.plan import StepPlan, StepResult
from k2batch.engine.sequence import Sequence

Finished = tuple[Sequence, str, str | None]
"""A request that left the engine: the sequence, its finish reason ("stop", "length", "error"), an error."""


class Scheduler:
    def __init__(
        self,
        config: EngineConfig,
        kv: KVCacheManager,
        max_model_len: int,
        detokenize: Callable[[list[int]], str] | None = None,
    ):
        self.max_num_seqs = config.max_num_seqs
        self.token_budget = config.max_num_batched_tokens
        self.kv = kv
        self.detokenize = detokenize
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.finished: list[Finished] = []
        self.num_preemptions = 0
        self.num_cached_tokens = 0
        """Prompt tokens served from the prefix cache or carried over from a session, summed at first admission."""
        # Block tables of the running sequences, one row per slot, extended as blocks are allocated: a step's
        # tables are one gather, not a rebuild from every sequence's history.
        width = min(-(-max_model_len // kv.block_size), kv.num_blocks)
        self.block_tables = torch.zeros(config.max_num_seqs, width, dtype=torch.int32)
        self.free_slots = list(range(config.max_num_seqs - 1, -1, -1))
        self._scheduled: tuple[StepPlan, list[tuple[Sequence, int]], list[Sequence]] | None = None

    # -- intake ------------------------------------------------------------------------------------------

    def add(self, seq: Sequence, continue_from: str | None = None) -> None:
        """Queue a request; a continuation first takes over the KV its session still holds."""
        if continue_from is not None:
            self.kv.resume(continue_from, seq)
        self.waiting.append(seq)

    def reject(self, seq: Sequence, error: str) -> None:
        self.finished.append((seq, "error", error))

    def release(self, session_id: str) -> None:
        self.kv.release(session_id)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running or self.finished)

    def take_finished(self) -> list[Finished]:
        finished, self.finished = self.finished, []
        return finished

    # -- schedule ----------------------------------------------------------------------------------------

    def schedule(self) -> StepPlan | None:
        """The next step's plan, or None if nothing can run."""
        budget = self.token_budget
        rows: list[tuple[Sequence, int]] = []
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            q_len = min(seq.num_pending, budget)
            while not self.kv.allocate(seq, seq.num_computed + q_len):
                # Out of blocks: recompute-preempt the youngest running sequence (its cached full blocks stay
                # in the prefix cache, so resuming it is mostly cache hits).
                victim = self.running.pop()
                self._preempt(victim)
                if victim is seq:
                    break
            else:
                self.kv.commit(seq, seq.num_computed + q_len)
                rows.append((seq, q_len))
                budget -= q_len
                i += 1

        while self.waiting and len(self.running) < self.max_num_seqs and budget > 0:
            seq = self.waiting[0]
            if seq.num_computed == 0:  # a continuation arrives with its session's KV
                self.kv.match_prefix(seq)
            q_len = min(seq.num_pending, budget)
            # A queued request evicts waiting sessions only when nothing runs: while others run, memory comes back
            # as they finish, and evicting a session to start another costs its whole context in recompute.
            if not self.kv.allocate(seq, seq.num_computed + q_len, evict_sessions=not self.running and not rows):
                self.kv.free(seq)
                if not self.running and not rows:
                    # Nothing runs, so only queued requests can hold blocks (continuations bring their KV):
                    # take all of those back and try again. If the whole cache is free, it cannot fit.
                    if self._reclaim_waiting():
                        continue
                    self.waiting.popleft()
                    cap = self.kv.num_blocks * self.kv.block_size
                    self.reject(seq, f"request needs {len(seq)} tokens of KV cache, the cache holds {cap}")
                    continue
                break
            self.waiting.popleft()
            if seq.num_prefilled == 0:  # first admission; a preempted sequence resuming was counted already
                seq.num_cached_prompt = seq.num_computed
                self.num_cached_tokens += seq.num_computed
                self.kv.record_lookup(seq)
            self._start(seq)
            self.kv.commit(seq, seq.num_computed + q_len)
            rows.append((seq, q_len))
            budget -= q_len
        return self._plan(rows) if rows else None

    def _start(self, seq: Sequence) -> None:
        seq.slot = self.free_slots.pop()
        seq.num_synced_blocks = 0
        self.running.append(seq)

    def _leave(self, seq: Sequence) -> None:
        self.free_slots.append(seq.slot)
        seq.slot = -1

    def _preempt(self, seq: Sequence) -> None:
        self._leave(seq)
        self.kv.free(seq)
        self.num_preemptions += 1
        self.waiting.appendleft(seq)

    def _reclaim_waiting(self) -> bool:
        """Free the blocks of queued requests (their full blocks stay in the prefix cache); True if any held some."""
        holders = [seq for seq in self.waiting if seq.block_table or seq.copy_from is not None]
        for seq in reversed(holders):
            self.kv.free(seq)
        return bool(holders)

    def _plan(self, rows: list[tuple[Sequence, int]]) -> StepPlan:
        """The plan of the scheduled rows, decode rows (one query token) first."""
        rows.sort(key=lambda row: row[1] != 1)  # stable: decode rows keep their order, then prefill chunks
        num_decode = next((r for r, (_, q_len) in enumerate(rows) if q_len != 1), len(rows))
        ids: list[int] = []
        starts, q_lens, slots, sampled, sample_index = [], [], [], [], []
        banned_rows: list[int] = []
        banned_ids: list[int] = []
        sync_rows: list[int] = []
        sync_cols: list[int] = []
        sync_blocks: list[int] = []
        copies: dict[int, int] = {}  # copy destination slot -> slot it reads (after this step's writes)
        num_decode_tokens = 0
        bs = self.kv.block_size
        for r, (seq, q_len) in enumerate(rows):
            start = seq.num_computed
            if q_len == 1:
                p = len(seq.prompt_ids)
                ids.append(seq.output_ids[start - p] if start >= p else seq.prompt_ids[start])
            else:
                ids.extend(seq.token_slice(start, start + q_len))
            starts.append(start)
            q_lens.append(q_len)
            slots.append(seq.slot)
            n = len(seq.block_table)
            if n > seq.num_synced_blocks:
                sync_rows.extend([seq.slot] * (n - seq.num_synced_blocks))
                sync_cols.extend(range(seq.num_synced_blocks, n))
                sync_blocks.extend(seq.block_table[seq.num_synced_blocks :])
                seq.num_synced_blocks = n
            if seq.copy_from is not None:
                # A copy may read another copy's destination in the same step: point it at the original slot.
                dst, src = seq.block_table[start // bs] * bs, seq.copy_from * bs
                for k in range(start % bs):
                    copies[dst + k] = copies.get(src + k, src + k)
            if start + q_len == len(seq):
                if len(seq.output_ids) < seq.params.min_tokens:
                    banned_rows.extend([len(sampled)] * len(seq.stop_ids))
                    banned_ids.extend(seq.stop_ids)
                sampled.append(r)
                sample_index.append(len(seq.output_ids))
                if q_len == 1 and seq.output_ids:
                    num_decode_tokens += 1
        if sync_rows:
            self.block_tables[sync_rows, sync_cols] = torch.tensor(sync_blocks, dtype=torch.int32)

        starts_t = torch.tensor(starts, dtype=torch.int64)
        q_lens_t = torch.tensor(q_lens, dtype=torch.int64)
        context_lens = starts_t + q_lens_t
        query_start = torch.zeros(len(rows) + 1, dtype=torch.int64)
        torch.cumsum(q_lens_t, 0, out=query_start[1:])
        width = int(-(-context_lens.max() // bs))
        block_tables = self.block_tables[:, :width][torch.tensor(slots)]
        if num_decode == len(rows):  # decode only: one token per row
            positions = starts_t
            token_row = torch.arange(len(rows))
        else:
            token_row = torch.arange(len(rows)).repeat_interleave(q_lens_t)
            positions = torch.arange(len(ids)) - query_start[:-1].repeat_interleave(q_lens_t) + starts_t[token_row]
        slot_mapping = block_tables[token_row, positions // bs].to(torch.int64) * bs + positions % bs

        sampled_seqs = [rows[r][0] for r in sampled]
        params = [seq.params for seq in sampled_seqs]
        plan = StepPlan(
            request_ids=tuple(seq.request_id for seq, _ in rows),
            input_ids=torch.tensor(ids, dtype=torch.int64),
            positions=positions,
            query_start=query_start,
            context_lens=context_lens,
            block_tables=block_tables,
            slot_mapping=slot_mapping,
            num_decode=num_decode,
            copy_src=torch.tensor(list(copies.values()), dtype=torch.int64),
            copy_dst=torch.tensor(list(copies), dtype=torch.int64),
            sample_rows=torch.tensor(sampled, dtype=torch.int64),
            temperature=torch.tensor([p.temperature for p in params], dtype=torch.float32),
            top_k=torch.tensor([p.top_k for p in params], dtype=torch.int64),
            top_p=torch.tensor([p.top_p for p in params], dtype=torch.float32),
            seeds=torch.tensor([seq.seed for seq in sampled_seqs], dtype=torch.int64),
            sample_index=torch.tensor(sample_index, dtype=torch.int64),
            banned_rows=torch.tensor(banned_rows, dtype=torch.int64),
            banned_ids=torch.tensor(banned_ids, dtype=torch.int64),
            want_logprobs=any(p.logprobs for p in params),
            num_prefill_tokens=len(ids) - num_decode_tokens,
            num_decode_tokens=num_decode_tokens,
        )
        self._scheduled = (plan, rows, sampled_seqs)
        return plan

    # -- update ------------------------------------------------------------------------------------------

    def update(self, plan: StepPlan, result: StepResult) -> None:
        """Apply a step's result: the scheduled tokens are in the cache, sampled tokens join their requests,
        and requests that reached a stop end (their KV kept as a session if they asked for it)."""
        scheduled, rows, sampled_seqs = self._scheduled
        if plan is not scheduled:
            raise ValueError("update() takes the result of the plan that schedule() returned last")
        self._scheduled = None
        for seq, q_len in rows:
            if seq.copy_from is not None:
                self.kv.copy_done(seq)
            seq.num_computed += q_len
            seq.num_prefilled += q_len
        tokens = result.token_ids.tolist()
        logprobs = result.logprobs.tolist() if result.logprobs is not None else None
        done = False
        for k, (seq, token) in enumerate(zip(sampled_seqs, tokens)):
            seq.output_ids.append(token)
            if logprobs is not None and seq.params.logprobs:
                seq.logprobs.append(logprobs[k])
            if len(seq.output_ids) > seq.params.min_tokens and (token in seq.stop_ids or self._stop_string(seq)):
                reason = "stop"
            elif len(seq.output_ids) >= seq.max_output:
                reason = "length"
            else:
                continue
            self._finish(seq, reason)
            done = True
        if done:
            self.running = [seq for seq in self.running if seq.slot >= 0]

    def _stop_string(self, seq: Sequence) -> bool:
        stop = seq.params.stop
        if not stop or self.detokenize is None:
            return False
        tail = self.detokenize(seq.output_ids[-(max(len(s) for s in stop) + 8) :])
        return any(s in tail for s in stop)

    def _finish(self, seq: Sequence, reason: str) -> None:
        self._leave(seq)
        if seq.keep_kv:
            self.kv.keep(seq)
        else:
            self.kv.free(seq)
        self.finished.append((seq, reason, None))
