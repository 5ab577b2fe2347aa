"""Top-k / top-p filtering keeps exactly the tokens it should."""

import torch

from k2batch.engine.sampler import _filter_top_k_top_p


def test_top_k_keeps_k_largest():
    logits = torch.tensor([1.0, 5.0, 3.0, 4.0, 2.0])
    kept = _filter_top_k_top_p(logits, top_k=2, top_p=1.0).isfinite()
    assert kept.tolist() == [False, True, False, True, False]


def test_top_p_keeps_smallest_set_reaching_p():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    kept = _filter_top_k_top_p(probs.log(), top_k=0, top_p=0.8).isfinite()
    assert kept.tolist() == [True, True, False, False]
    kept = _filter_top_k_top_p(probs.log(), top_k=0, top_p=0.81).isfinite()
    assert kept.tolist() == [True, True, True, False]
    kept = _filter_top_k_top_p(probs.log(), top_k=0, top_p=0.01).isfinite()
    assert kept.tolist() == [True, False, False, False]
