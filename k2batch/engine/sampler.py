"""Next-token choice per sequence: greedy, or temperature / top-k / top-p sampling from the sequence's own RNG."""

from __future__ import annotations

import torch

from k2batch.engine.sequence import Sequence


def _filter_top_k_top_p(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    if top_k > 0 and top_k < logits.shape[-1]:
        kth = logits.topk(top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(descending=True)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        # Drop a token once the tokens before it already reach top_p; the top token always stays.
        drop = cumulative - sorted_logits.softmax(-1) >= top_p
        logits = logits.masked_fill(drop.scatter(0, order, drop), float("-inf"))
    return logits


def sample(logits: torch.Tensor, seqs: list[Sequence]) -> tuple[list[int], list[float]]:
    """One token per row of `logits` [B, vocab] (float32); also each chosen token's log-probability.

    Each sequence draws from its own generator, so a seeded request gets the same tokens whatever else is
    in the batch.
    """
    logprobs = logits.log_softmax(-1)
    greedy = logits.argmax(-1).tolist()
    tokens = []
    for i, seq in enumerate(seqs):
        p = seq.params
        if p.temperature <= 0:
            tokens.append(greedy[i])
            continue
        filtered = _filter_top_k_top_p(logits[i] / p.temperature, p.top_k, p.top_p)
        probs = filtered.softmax(-1)
        tokens.append(int(torch.multinomial(probs.cpu(), 1, generator=seq.generator)))
    chosen = logprobs.gather(1, torch.tensor(tokens, device=logits.device).unsqueeze(1)).squeeze(1)
    return tokens, chosen.tolist()
