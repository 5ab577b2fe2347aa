"""One request as the engine tracks it: tokens, KV blocks, sampling state, and what it produced."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from k2batch.engine.config import SamplingParams


@dataclass
class Sequence:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    keep_kv: bool = False
    output_ids: list[int] = field(default_factory=list)
    block_table: list[int] = field(default_factory=list)
    num_computed: int = 0
    """Tokens whose latent KV is in the cache (a prefix of `tokens`)."""
    copy_from: int | None = None
    """A cached block whose first `num_computed % block_size` latents the next forward copies into this
    sequence's own block instead of recomputing them (a prefix that ends inside a block)."""
    num_cached_prompt: int = 0
    """Prompt tokens found in the prefix cache or carried over from a continued request, not prefilled."""
    num_prefilled: int = 0
    """Tokens run through the model so far (0 until the sequence's first step)."""
    logprobs: list[float] = field(default_factory=list)
    generator: torch.Generator | None = None

    @property
    def tokens(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    def __len__(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

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
