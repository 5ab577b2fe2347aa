"""Next tokens for all sample rows of a step in one batched operation: greedy rows take the exact argmax, the
others draw with their own temperature, top-k, top-p and seed.

A draw is the Gumbel-max trick with noise that is a pure function of (seed, index of the token in the request's
output, vocabulary id), computed by an integer hash on the device. So a seeded request gets the same tokens
whatever else is in the batch, in whichever process or on whichever device runs the step, with no generator
state to carry from step to step.
"""

from __future__ import annotations

import numpy as np
import torch

_MASK32 = 0xFFFFFFFF
_MIX = 0x45D9F3B  # a 32-bit integer hash multiplier with good avalanche (small enough that products fit int64)
_GOLDEN = 0x9E3779B9  # spreads consecutive vocabulary ids over the 32-bit range before hashing


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A bijective 32-bit integer hash, in place, of an int64 tensor holding values in [0, 2**32)."""
    x ^= x >> 16
    x.mul_(_MIX).bitwise_and_(_MASK32)
    x ^= x >> 16
    x.mul_(_MIX).bitwise_and_(_MASK32)
    x ^= x >> 16
    return x


def gumbel_noise(seeds: torch.Tensor, index: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """[S, vocab] standard Gumbel noise; row s depends only on seeds[s] and index[s]."""
    lo, hi = seeds & _MASK32, (seeds >> 32) & _MASK32
    row = _mix32(_mix32(_mix32(hi ^ 0x9E3779B9) ^ lo) ^ (index & _MASK32))
    ids = torch.arange(vocab_size, device=seeds.device, dtype=torch.int64) * _GOLDEN
    bits = _mix32((row.unsqueeze(1) + ids).bitwise_and_(_MASK32))
    uniform = (bits >> 8).to(torch.float32).add_(0.5).mul_(2.0**-24)  # 24 bits, in (0, 1)
    return uniform.log_().neg_().log_().neg_()


def _ascending(x: torch.Tensor) -> torch.Tensor:
    """Each row sorted, values only. On CPU numpy's vectorized sort is several times faster than torch's."""
    if x.device.type == "cpu":
        return torch.from_numpy(np.sort(x.detach().contiguous().numpy(), axis=-1))
    return x.sort(dim=-1).values


def filter_top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Mask to -inf what each row's top-k (0: off) and then top-p (1: off) leave out. logits [S, V].

    Top-k keeps the tokens at least as likely as the k-th; top-p then keeps the most likely tokens down to the
    first at which their probability (renormalized over top-k) reaches p. Both cut at a threshold value, so
    tokens tied with the last one kept are kept too. One sort of the values serves both: softmax keeps order.
    """
    vocab = logits.shape[-1]
    use_k = (top_k > 0) & (top_k < vocab)
    use_p = top_p < 1.0
    if not bool(use_k.any()) and not bool(use_p.any()):
        return logits
    ascending = _ascending(logits)
    threshold = ascending.gather(1, (vocab - torch.where(use_k, top_k, vocab)).unsqueeze(1))  # the k-th largest
    if bool(use_p.any()):
        probs = ascending.masked_fill(ascending < threshold, float("-inf")).softmax(-1)
        mass_from = probs.flip(-1).cumsum(-1).flip(-1)  # [s, i]: probability of the i-th smallest and all above
        # The highest cut whose kept mass still reaches p; a row without top-p (p = 2) keeps everything.
        p = torch.where(use_p, top_p, torch.full_like(top_p, 2.0)).unsqueeze(1)
        cut = ((mass_from >= p).sum(-1, keepdim=True) - 1).clamp_(min=0)
        threshold = torch.maximum(threshold, ascending.gather(1, cut))
    return logits.masked_fill(logits < threshold, float("-inf"))


def sample(
    logits: torch.Tensor,
    temperature: torch.Tensor,
    top_k: torch.Tensor,
    top_p: torch.Tensor,
    seeds: torch.Tensor,
    index: torch.Tensor,
    want_logprobs: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One token per row of `logits` [S, vocab] (float32), and, if asked, each token's log-probability under the
    model's own distribution (before temperature and filtering)."""
    tokens = logits.argmax(-1)
    drawn = (temperature > 0).nonzero().squeeze(1)
    if len(drawn):
        scaled = logits[drawn] / temperature[drawn].unsqueeze(1)
        scaled = filter_top_k_top_p(scaled, top_k[drawn], top_p[drawn])
        noise = gumbel_noise(seeds[drawn], index[drawn], logits.shape[-1])
        tokens[drawn] = (scaled + noise).argmax(-1)
    logprobs = None
    if want_logprobs:
        logprobs = logits.log_softmax(-1).gather(1, tokens.unsqueeze(1)).squeeze(1)
    return tokens, logprobs
