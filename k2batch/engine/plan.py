"""The engine step as data: what the scheduler asks the model runner to compute, and what comes back.

A plan holds tensors and ids only (no request objects), is frozen and pickles, so a runner in another process
(one per device) executes it the same as the one beside the scheduler.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True, eq=False)
class StepPlan:
    """One forward over R rows (one scheduled request each) holding N query tokens in all.

    Rows [0, num_decode) have a single query token and attend in latent space; the others are prefill chunks.
    Row r's tokens are input_ids[query_start[r] : query_start[r + 1]].
    """

    request_ids: tuple[str, ...]
    """[R] the request of each row (for logs, tests and scripted policies; the runner does not need them)."""
    input_ids: torch.Tensor
    """[N] int64."""
    positions: torch.Tensor
    """[N] int64: each token's position in its request."""
    query_start: torch.Tensor
    """[R + 1] int64: cumulative query lengths."""
    context_lens: torch.Tensor
    """[R] int64: tokens of each row in the cache once this step has written its own."""
    block_tables: torch.Tensor
    """[R, W] int32: the KV blocks of each row, W wide enough for the longest context."""
    slot_mapping: torch.Tensor
    """[N] int64: the cache slot (block * block_size + offset) each query token's latent is written to."""
    num_decode: int
    copy_src: torch.Tensor
    """[C] int64: cache slots whose latents are copied to copy_dst before attention (a prefix-cache hit that ends
    inside a block: the shared tokens are copied into the request's own block, not recomputed)."""
    copy_dst: torch.Tensor
    sample_rows: torch.Tensor
    """[S] int64: rows whose last query token completes their context, so a next token is sampled there."""
    temperature: torch.Tensor
    """[S] float32; 0 is greedy (exact argmax)."""
    top_k: torch.Tensor
    """[S] int64; 0 keeps every token."""
    top_p: torch.Tensor
    """[S] float32; 1 keeps every token."""
    seeds: torch.Tensor
    """[S] int64: each row's sampling seed."""
    sample_index: torch.Tensor
    """[S] int64: the position in its request's output of the token sampled; with the seed it fixes the draw, so a
    seeded request gets the same tokens whatever else is in the batch."""
    banned_rows: torch.Tensor
    """[B] int64 with banned_ids [B] int64: (sample row index, token) pairs that must not be sampled (the stop
    tokens of a request still under its min_tokens)."""
    banned_ids: torch.Tensor
    want_logprobs: bool
    num_prefill_tokens: int
    """Query tokens that are not a just-sampled token running back through the model."""
    num_decode_tokens: int

    @property
    def num_rows(self) -> int:
        return len(self.request_ids)

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[0])


@dataclass(frozen=True, eq=False)
class StepResult:
    """The runner's answer to a plan: one sampled token per sample row."""

    token_ids: torch.Tensor
    """[S] int64, in the order of plan.sample_rows."""
    logprobs: torch.Tensor | None
    """[S] float32 log-probability of each sampled token under the model's distribution; None unless asked."""
