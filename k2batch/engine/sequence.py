"""One request as the scheduler tracks it (tokens, KV blocks, progress), and what it produced.

Only the scheduler and its KV-cache manager write a `Sequence`; the model runner sees the step plan built from it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from k2batch.engine.config import SamplingParams


@dataclass(eq=False)
class Sequence:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    seed: int
    """The sampling seed as a signed 64-bit value: the request's own, or one the engine drew for it."""
    stop_ids: frozenset[int]
    """Token ids that end the request: its stop tokens, and end-of-sequence unless it ignores that."""
    max_output: int
    """Tokens it may generate: its max_new_tokens, less if the context would overflow first."""
    keep_kv: bool = False
    output_ids: list[int] = field(default_factory=list)
    block_table: list[int] = field(default_factory=list)
    num_computed: int = 0
    """Tokens whose latent KV is in the cache (a prefix of the prompt and output)."""
    copy_from: int | None = None
    """A cached block whose first `num_computed % block_size` latents the next forward copies into this
    sequence's own block instead of recomputing them (a prefix that ends inside a block)."""
    num_cached_prompt: int = 0
    """Prompt tokens found in the prefix cache or carried over from a continued request, not prefilled."""
    num_prefilled: int = 0
    """Tokens run through the model so far (0 until the sequence's first step)."""
    logprobs: list[float] = field(default_factory=list)
    slot: int = -1
    """Row of the scheduler's block-table tensor while running; -1 otherwise."""
    num_synced_blocks: int = 0
    """Entries of `block_table` already written to that row."""

    def __len__(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def tokens(self) -> list[int]:
        """All token ids, prompt then output (a new list: for admission and continuation, not every step)."""
        return self.prompt_ids + self.output_ids

    def token_slice(self, start: int, end: int) -> list[int]:
        """tokens[start:end] without building the whole token list."""
        p = len(self.prompt_ids)
        if start >= p:
            return self.output_ids[start - p : end - p]
        if end <= p:
            return self.prompt_ids[start:end]
        return self.prompt_ids[start:] + self.output_ids[: end - p]

    @property
    def num_pending(self) -> int:
        """Tokens still to run through the model before the next token can be sampled."""
        return len(self) - self.num_computed


@dataclass(frozen=True)
class RequestOutput:
    request_id: str
    prompt_ids: list[int]
    token_ids: list[int]
    finish_reason: str  # "stop" | "length" | "error"
    text: str | None = None
    error: str | None = None
    num_cached_tokens: int = 0
    logprobs: list[float] | None = None
