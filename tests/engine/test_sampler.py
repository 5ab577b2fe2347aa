"""Batched sampling: per-row filtering, exact greedy rows, seeded draws that ignore the rest of the batch, and
draws that follow the filtered distribution."""

import torch

from k2batch.engine.sampler import filter_top_k_top_p, gumbel_noise, sample


def _kept(logits, top_k=0, top_p=1.0):
    row = filter_top_k_top_p(logits.unsqueeze(0), torch.tensor([top_k]), torch.tensor([top_p]))[0]
    return row.isfinite().tolist()


def test_top_k_keeps_k_largest():
    logits = torch.tensor([1.0, 5.0, 3.0, 4.0, 2.0])
    assert _kept(logits, top_k=2) == [False, True, False, True, False]
    assert _kept(torch.tensor([1.0, 3.0, 3.0, 0.0]), top_k=1) == [False, True, True, False]  # ties with the k-th stay


def test_top_p_keeps_smallest_set_reaching_p():
    logits = torch.tensor([0.5, 0.3, 0.15, 0.05]).log()
    assert _kept(logits, top_p=0.8) == [True, True, False, False]
    assert _kept(logits, top_p=0.81) == [True, True, True, False]
    assert _kept(logits, top_p=0.01) == [True, False, False, False]


def test_filters_apply_per_row():
    """One call over rows with different settings equals each row filtered alone; rows without filters are
    untouched (top_p 1 never drops a token to cumulative rounding)."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 50, generator=g)
    top_k = torch.tensor([0, 5, 0, 10, 1, 0])
    top_p = torch.tensor([1.0, 1.0, 0.7, 0.5, 0.9, 1.0])
    batched = filter_top_k_top_p(logits, top_k, top_p)
    for r in range(6):
        alone = filter_top_k_top_p(logits[r : r + 1], top_k[r : r + 1], top_p[r : r + 1])[0]
        assert torch.equal(batched[r].isfinite(), alone.isfinite())
    assert torch.equal(batched[0], logits[0]) and torch.equal(batched[5], logits[5])
    assert batched[4].isfinite().sum() == 1


def test_greedy_rows_are_exact_argmax_beside_sampled_rows():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(8, 300, generator=g)
    temperature = torch.tensor([0.0, 1.0, 0.0, 0.7, 0.0, 1.5, 0.0, 1.0])
    tokens, _ = sample(
        logits,
        temperature,
        torch.zeros(8, dtype=torch.long),
        torch.ones(8),
        torch.arange(8),
        torch.zeros(8, dtype=torch.long),
    )
    greedy = temperature == 0
    assert torch.equal(tokens[greedy], logits[greedy].argmax(-1))


def test_a_seeded_draw_depends_on_its_seed_and_index_only():
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(1, 100, generator=g)
    row = dict(temperature=torch.tensor([1.0]), top_k=torch.tensor([0]), top_p=torch.tensor([1.0]))
    alone = [int(sample(logits, **row, seeds=torch.tensor([42]), index=torch.tensor([i]))[0]) for i in range(20)]
    batch = torch.cat((torch.randn(5, 100, generator=g), logits))
    mixed = []
    for i in range(20):
        tokens, _ = sample(
            batch,
            torch.tensor([1.0, 0.0, 0.5, 1.0, 2.0, 1.0]),
            torch.tensor([0, 0, 3, 0, 0, 0]),
            torch.tensor([1.0, 1.0, 1.0, 0.5, 1.0, 1.0]),
            torch.tensor([1, 2, 3, 4, 5, 42]),
            torch.full((6,), i),
        )
        mixed.append(int(tokens[-1]))
    assert mixed == alone
    assert len(set(alone)) > 5  # successive indices draw afresh


def test_noise_is_gumbel_and_independent_across_ids_seeds_and_indices():
    seeds = torch.tensor([0, 1, -1, 2**62, -(2**63)])
    noise = gumbel_noise(seeds, torch.tensor([0, 0, 0, 7, 2**31]), 20_000)
    assert noise.isfinite().all()
    # Standard Gumbel: mean 0.5772 (Euler's constant), variance pi^2 / 6.
    assert abs(noise.mean().item() - 0.5772) < 0.02 and abs(noise.var().item() - 1.6449) < 0.05
    corr = torch.corrcoef(noise)
    assert (corr - torch.eye(5)).abs().max() < 0.05


def test_draws_follow_the_filtered_distribution():
    """Over many seeds, each token is drawn about as often as its probability after temperature and top-p."""
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -3.0])
    n = 20_000
    temperature, top_p = 0.8, 0.9
    tokens, _ = sample(
        logits.expand(n, -1),
        torch.full((n,), temperature),
        torch.zeros(n, dtype=torch.long),
        torch.full((n,), top_p),
        torch.arange(n),
        torch.zeros(n, dtype=torch.long),
    )
    expected = filter_top_k_top_p((logits / temperature).unsqueeze(0), torch.tensor([0]), torch.tensor([top_p]))[0]
    expected = expected.softmax(-1)
    observed = torch.bincount(tokens, minlength=6).float() / n
    assert (observed - expected).abs().max() < 0.015
    assert observed[expected == 0].sum() == 0


def test_logprobs_are_the_models_own():
    logits = torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 5.0]])
    tokens, logprobs = sample(
        logits,
        torch.tensor([0.0, 2.0]),
        torch.tensor([0, 0]),
        torch.tensor([1.0, 1.0]),
        torch.tensor([0, 1]),
        torch.tensor([0, 0]),
        want_logprobs=True,
    )
    assert torch.allclose(logprobs, logits.log_softmax(-1).gather(1, tokens.unsqueeze(1)).squeeze(1))
