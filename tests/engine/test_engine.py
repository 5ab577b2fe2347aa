"""The engine against transformers' greedy generate, and its cache, scheduling and sampling behaviour."""

import pytest
import torch

from k2batch.engine import Engine, EngineConfig, SamplingParams
from k2batch.model import load_model
from tests.checkpoints import random_hf_model, save_hf

NEW_TOKENS = 10
GREEDY = SamplingParams(temperature=0, max_new_tokens=NEW_TOKENS, ignore_eos=True)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    hf = random_hf_model(seed=3)
    path = save_hf(hf, tmp_path_factory.mktemp("ckpt"))
    return hf, path


@pytest.fixture(scope="module")
def model(checkpoint):
    return load_model(checkpoint[1])


@pytest.fixture(scope="module")
def prompts_and_reference(checkpoint):
    """56 ragged prompts, half sharing a 40-token prefix, and transformers' greedy continuations."""
    hf, _ = checkpoint
    g = torch.Generator().manual_seed(0)
    prefix = torch.randint(2, 256, (40,), generator=g).tolist()
    prompts = []
    for i in range(56):
        n = int(torch.randint(1, 30, (1,), generator=g))
        prompts.append((prefix if i % 2 else []) + torch.randint(2, 256, (n,), generator=g).tolist())
    reference = []
    with torch.no_grad():
        for p in prompts:
            out = hf.generate(
                torch.tensor([p]), max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0
            )
            reference.append(out[0, len(p) :].tolist())
    return prompts, reference


CONFIGS = {
    "prefix_cache": EngineConfig(),
    "no_prefix_cache": EngineConfig(enable_prefix_caching=False),
    "preemption": EngineConfig(num_kv_blocks=40, block_size=4, max_num_seqs=16),
    "chunked_prefill": EngineConfig(max_num_batched_tokens=24, block_size=4),
}


@pytest.mark.parametrize("name", CONFIGS)
def test_greedy_matches_transformers(model, prompts_and_reference, name):
    prompts, reference = prompts_and_reference
    engine = Engine(model, CONFIGS[name])
    outputs = engine.generate(prompts, GREEDY)
    assert [o.token_ids for o in outputs] == reference
    assert all(o.finish_reason == "length" for o in outputs)
    if name == "preemption":
        assert engine.stats.preemptions > 0
    if name == "chunked_prefill":
        assert engine.stats.steps > len(prompts)


def test_shared_prefix_prefilled_once(model):
    g = torch.Generator().manual_seed(1)
    prefix = torch.randint(2, 256, (1000,), generator=g).tolist()
    suffixes = [torch.randint(2, 256, (int(torch.randint(1, 12, (1,), generator=g)),), generator=g).tolist() for _ in range(100)]
    prompts = [prefix + s for s in suffixes]
    params = SamplingParams(temperature=0, max_new_tokens=2, ignore_eos=True)
    cached = Engine(model, EngineConfig(max_num_batched_tokens=4096))
    out_cached = cached.generate(prompts, params)
    distinct = len(prefix) + sum(len(s) for s in suffixes)
    # Each prompt recomputes at most its partial last prefix block (block 16: 1000 = 62 * 16 + 8).
    assert cached.stats.prefill_tokens <= distinct + 100 * 8
    assert cached.stats.cached_tokens >= 99 * 992
    assert cached.prefix_cache_stats()["hit_blocks"] >= 99 * 62
    uncached = Engine(model, EngineConfig(enable_prefix_caching=False, max_num_batched_tokens=8192))
    out_uncached = uncached.generate(prompts, params)
    assert uncached.stats.prefill_tokens == sum(len(p) for p in prompts)
    assert [o.token_ids for o in out_cached] == [o.token_ids for o in out_uncached]


def test_continuation_prefills_only_new_tokens(model):
    engine = Engine(model, EngineConfig())
    prompt = list(range(10, 60))
    first = engine.add_request(prompt, GREEDY, keep_kv=True)
    (out,) = _run(engine)
    extra = [7, 8, 9, 11]
    before = engine.stats.prefill_tokens
    engine.add_request(prompt + out.token_ids + extra, GREEDY, continue_from=first)
    (cont,) = _run(engine)
    # The only tokens without KV: the last sampled one, and the new ones.
    assert engine.stats.prefill_tokens - before == 1 + len(extra)
    assert cont.num_cached_tokens == len(prompt) + len(out.token_ids) - 1
    fresh = Engine(model, EngineConfig(enable_prefix_caching=False)).generate([prompt + out.token_ids + extra], GREEDY)
    assert cont.token_ids == fresh[0].token_ids


def test_seeded_sampling_independent_of_batch(model):
    params = SamplingParams(temperature=0.9, top_p=0.9, top_k=50, max_new_tokens=12, seed=1234, ignore_eos=True)
    alone = Engine(model, EngineConfig()).generate([[5, 6, 7, 8]], params)[0].token_ids
    others = [[i, i + 1, i + 2] for i in range(20, 60)]
    mixed = Engine(model, EngineConfig()).generate(
        others + [[5, 6, 7, 8]], [SamplingParams(temperature=1.0, max_new_tokens=12)] * len(others) + [params]
    )
    assert mixed[-1].token_ids == alone
    assert Engine(model, EngineConfig()).generate([[5, 6, 7, 8]], params)[0].token_ids == alone


def test_bad_requests_get_errors_and_others_finish(model):
    engine = Engine(model, EngineConfig(max_model_len=64))
    outputs = engine.generate([[1, 2, 3], [], [5, 99999], list(range(2, 80)), [4, 5]], GREEDY)
    assert [o.finish_reason for o in outputs] == ["length", "error", "error", "error", "length"]
    assert outputs[1].error == "empty prompt"
    assert "token id 99999 is outside the vocabulary (size 256)" in outputs[2].error
    assert outputs[3].error == "prompt has 78 tokens, context is 64"
    assert len(outputs[0].token_ids) == NEW_TOKENS


def test_stop_tokens_and_context_limit(model):
    engine = Engine(model, EngineConfig(max_model_len=20))
    probe = engine.generate([[3, 4, 5]], GREEDY)[0].token_ids
    stop_at = probe[3]
    out = engine.generate([[3, 4, 5]], SamplingParams(temperature=0, max_new_tokens=10, stop_token_ids=(stop_at,)))[0]
    assert out.token_ids == probe[: probe.index(stop_at) + 1] and out.finish_reason == "stop"
    long = engine.generate([list(range(2, 17))], SamplingParams(temperature=0, max_new_tokens=50, ignore_eos=True))[0]
    assert len(long.token_ids) == 5 and long.finish_reason == "length"  # 15 + 5 = max_model_len


def test_logprobs(model):
    out = Engine(model, EngineConfig()).generate([[3, 4, 5]], SamplingParams(temperature=0, max_new_tokens=3, logprobs=True))[0]
    assert len(out.logprobs) == 3 and all(lp <= 0 for lp in out.logprobs)
    logits = model.score(torch.tensor([[3, 4, 5]]))[0, -1]
    assert out.logprobs[0] == pytest.approx(logits.log_softmax(-1).max().item(), abs=1e-5)


def _run(engine):
    outs = []
    while engine.has_unfinished():
        outs.extend(engine.step())
    return outs
