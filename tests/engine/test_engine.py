"""The engine against transformers' greedy generate, and its cache, scheduling and sampling behaviour."""

import io
import time

import pytest
import torch
from tqdm import tqdm

import k2batch.engine.engine as engine_module
from k2batch.engine import Engine, EngineConfig, SamplingParams
from k2batch.engine.prefix_cache import common_prefix_len
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
    config = CONFIGS[name]
    engine = Engine(model, config)
    chunks = _record_chunks(engine)
    outputs = engine.generate(prompts, GREEDY)
    assert [o.token_ids for o in outputs] == reference
    assert all(o.finish_reason == "length" for o in outputs)
    _assert_all_blocks_returned(engine)
    cache = engine.prefix_cache_stats()
    if config.enable_prefix_caching:  # one lookup per request, however often it was preempted and resumed
        assert cache["hit_blocks"] + cache["miss_blocks"] == sum((len(p) - 1) // config.block_size for p in prompts)
    if name == "prefix_cache":
        # 28 prompts share a 40-token prefix: two full 16-token blocks, computed once and hit by the other 27.
        assert cache["hit_blocks"] == 27 * 2
    if name == "preemption":
        assert engine.stats.preemptions > 0
    if name == "chunked_prefill":
        prefill_steps = [
            sum(1 for rid, first in chunks if rid == o.request_id and first < len(o.prompt_ids)) for o in outputs
        ]
        assert max(prefill_steps) >= 3  # a 69-token prompt over a 24-token budget


def test_shared_prefix_prefilled_once(model):
    g = torch.Generator().manual_seed(1)
    prefix = torch.randint(2, 256, (1000,), generator=g).tolist()
    suffixes = [
        torch.randint(2, 256, (int(torch.randint(8, 20, (1,), generator=g)),), generator=g).tolist() for _ in range(100)
    ]
    prompts = [prefix + s for s in suffixes]
    params = SamplingParams(temperature=0, max_new_tokens=2, ignore_eos=True)
    cached = Engine(model, EngineConfig(max_num_batched_tokens=4096))
    out_cached = cached.generate(prompts, params)
    # The trie minimum: every distinct token prefix computed once. The prefix ends 8 tokens into block 62
    # (1000 = 62 * 16 + 8); those 8 are copied from the first prompt's block 62, full since suffixes have 8+ tokens.
    distinct = _distinct_prefixes(prompts)
    assert cached.stats.prefill_tokens == distinct
    assert cached.stats.cached_tokens == sum(map(len, prompts)) - distinct
    assert cached.prefix_cache_stats()["hit_blocks"] == 99 * 62
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


@pytest.mark.parametrize("prompt_len, other_prefill", [(11, 1), (12, 2)])
def test_continuation_without_new_tokens_recomputes_the_last_one(model, prompt_len, other_prefill):
    """The continuation is exactly the kept tokens: the last one runs again for its logits. With an 11-token
    prompt 20 tokens are kept, so that token is the last of a full block the prefix cache published and a
    concurrent request reads (it must not be written); with 12 it sits in the sequence's own partial block."""
    engine = Engine(model, EngineConfig(block_size=4))
    prompt = list(range(10, 10 + prompt_len))
    first = engine.add_request(prompt, GREEDY, keep_kv=True)
    (out,) = _run(engine)
    kept = prompt + out.token_ids[:-1]
    before = engine.stats.prefill_tokens
    cont = engine.add_request(kept, GREEDY, continue_from=first)
    other = engine.add_request(kept + [3], GREEDY)  # reuses the kept tokens' full blocks
    outs = {o.request_id: o for o in _run(engine)}
    assert engine.stats.prefill_tokens - before == 1 + other_prefill
    assert outs[cont].num_cached_tokens == len(kept) - 1
    fresh = Engine(model, EngineConfig(enable_prefix_caching=False)).generate([kept, kept + [3]], GREEDY)
    assert [outs[cont].token_ids, outs[other].token_ids] == [o.token_ids for o in fresh]
    _assert_all_blocks_returned(engine)


def test_continuation_that_waits_for_memory_counts_only_what_it_reused(model):
    """A continuation that cannot be admitted gives its blocks back; by the time it runs, some were evicted."""
    engine = Engine(model, EngineConfig(num_kv_blocks=12, block_size=4))
    six = SamplingParams(temperature=0, max_new_tokens=6, ignore_eos=True)
    a = engine.add_request(list(range(10, 20)), six, keep_kv=True)
    (out_a,) = _run(engine)
    engine.add_request(list(range(100, 130)), GREEDY)  # takes the 8 free blocks for its prompt, then evicts
    continued = out_a.prompt_ids + out_a.token_ids + [7, 8, 9, 11]
    cont = engine.add_request(continued, GREEDY, continue_from=a)
    outs = {o.request_id: o for o in [out_a, *_run(engine)]}
    assert engine.stats.preemptions == 0
    assert engine.stats.cached_tokens == sum(o.num_cached_tokens for o in outs.values())
    assert engine.stats.prefill_tokens == sum(len(o.prompt_ids) - o.num_cached_tokens for o in outs.values())
    assert outs[cont].num_cached_tokens < len(continued) - 5  # less than it carried over
    fresh = Engine(model, EngineConfig(enable_prefix_caching=False)).generate([continued], GREEDY)
    assert outs[cont].token_ids == fresh[0].token_ids
    _assert_all_blocks_returned(engine)


def test_copies_of_one_prompt_on_a_small_cache(model):
    """Sampled copies of one prompt share its blocks; cached blocks still under running copies are not evictable."""
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(2, 256, (8,), generator=g).tolist() for _ in range(6)]  # two full 4-token blocks each
    params = [SamplingParams(temperature=1.0, max_new_tokens=12, seed=i, ignore_eos=True) for i in range(18)]
    engine = Engine(model, EngineConfig(num_kv_blocks=10, block_size=4, max_num_seqs=18))
    outputs = engine.generate([p for p in prompts for _ in range(3)], params)
    assert [len(o.token_ids) for o in outputs] == [12] * 18
    assert engine.stats.preemptions > 0
    _assert_all_blocks_returned(engine)


def test_prompt_filling_the_cache_runs_despite_a_partial_prefix_hit(model):
    """Copying 2 cached tokens would hold their block as well: one more than the 3-block cache has left."""
    engine = Engine(model, EngineConfig(num_kv_blocks=3, block_size=4))
    first = list(range(10, 20))
    one = SamplingParams(temperature=0, max_new_tokens=1, ignore_eos=True)
    engine.generate([first], one)
    (out,) = engine.generate([first[:6] + [3, 4, 5, 6]], one)
    assert out.finish_reason == "length"


def test_preemptions_counted_when_they_happen(model):
    # Room for two 10-token prompts, not for their outputs: the younger is preempted long before either finishes.
    engine = Engine(model, EngineConfig(num_kv_blocks=6, block_size=4))
    engine.add_request(list(range(10, 20)), GREEDY)
    engine.add_request(list(range(30, 40)), GREEDY)
    before_first_finish = []
    while not engine.step():
        before_first_finish.append(engine.stats.preemptions)
    assert before_first_finish[-1] == engine.scheduler.num_preemptions == 1


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


def test_text_and_stop_strings_without_tokenizer_get_errors(model):
    engine = Engine(model, EngineConfig())
    stop = SamplingParams(temperature=0, max_new_tokens=NEW_TOKENS, stop=("end",))
    outputs = engine.generate(["hello", [1, 2, 3], [4, 5]], [GREEDY, GREEDY, stop])
    assert [o.finish_reason for o in outputs] == ["error", "length", "error"]
    assert outputs[0].error == "a text prompt needs a tokenizer; this engine has none, so pass token ids"
    assert outputs[2].error == "stop strings need a tokenizer; this engine has none, so pass stop_token_ids"
    assert len(outputs[1].token_ids) == NEW_TOKENS


def test_kv_cache_sized_from_memory_budget(model):
    c = model.config
    block_bytes = c.num_hidden_layers * 16 * (c.kv_lora_rank + c.qk_rope_head_dim) * 4  # float32 latents
    engine = Engine(model, EngineConfig(kv_cache_gib=0.001, block_size=16))
    expected = int(0.001 * 2**30) // block_bytes
    assert engine.kv.num_blocks == expected == 116
    assert engine.runner.kv_cache.shape == (c.num_hidden_layers, expected, 16, c.kv_lora_rank + c.qk_rope_head_dim)


def test_progress_bar_reports_prefill_and_decode_rates(model, monkeypatch):
    bars = []

    class Recorded(tqdm):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **{**kwargs, "file": io.StringIO(), "delay": 0})
            bars.append(self)

    monkeypatch.setattr(engine_module, "tqdm", Recorded)
    engine = Engine(model, EngineConfig(show_progress=True))
    started = time.perf_counter()
    engine.generate([[3, 4, 5, 6], [7, 8]], GREEDY)
    wall = time.perf_counter() - started
    s = engine.stats
    # One prefill step, then decode-only steps: each rate is over the time of its own steps, not the whole call.
    assert 0 < s.prefill_s < s.prefill_s + s.decode_s <= wall
    prefill, decode = s.prefill_tokens / s.prefill_s, s.decode_tokens / s.decode_s
    assert bars[0].postfix == f"prefill {prefill:.0f} tok/s, decode {decode:.0f} tok/s"
    assert (s.prefill_tokens, s.decode_tokens) == (6, 2 * (NEW_TOKENS - 1))


def test_stop_tokens_and_context_limit(model):
    engine = Engine(model, EngineConfig(max_model_len=20))
    probe = engine.generate([[3, 4, 5]], GREEDY)[0].token_ids
    stop_at = probe[3]
    out = engine.generate([[3, 4, 5]], SamplingParams(temperature=0, max_new_tokens=10, stop_token_ids=(stop_at,)))[0]
    assert out.token_ids == probe[: probe.index(stop_at) + 1] and out.finish_reason == "stop"
    long = engine.generate([list(range(2, 17))], SamplingParams(temperature=0, max_new_tokens=50, ignore_eos=True))[0]
    assert len(long.token_ids) == 5 and long.finish_reason == "length"  # 15 + 5 = max_model_len


def test_logprobs(model):
    out = Engine(model, EngineConfig()).generate(
        [[3, 4, 5]], SamplingParams(temperature=0, max_new_tokens=3, logprobs=True)
    )[0]
    assert len(out.logprobs) == 3 and all(lp <= 0 for lp in out.logprobs)
    logits = model.score(torch.tensor([[3, 4, 5]]))[0, -1]
    assert out.logprobs[0] == pytest.approx(logits.log_softmax(-1).max().item(), abs=1e-5)


def _run(engine):
    outs = []
    while engine.has_unfinished():
        outs.extend(engine.step())
    return outs


def _distinct_prefixes(prompts):
    """Distinct token prefixes among the prompts (nodes of their token trie): in sorted order, each prompt adds
    the tokens past its longest common prefix with the one before it."""
    ordered = sorted(prompts)
    return sum(len(p) - (common_prefix_len(p, q) if i else 0) for i, (p, q) in enumerate(zip(ordered, [[]] + ordered)))


def _record_chunks(engine):
    """Record (request, position of its first query token) for each row of each step the model runs."""
    chunks, execute = [], engine.runner.execute

    def recording(plan):
        chunks.extend(zip(plan.request_ids, plan.positions[plan.query_start[:-1]].tolist()))
        return execute(plan)

    engine.runner.execute = recording
    return chunks


def _assert_all_blocks_returned(engine):
    kv = engine.kv
    assert not kv.sessions
    assert not any(kv.ref_count) and kv.num_allocatable == kv.num_blocks


def test_min_tokens_holds_off_stops(model):
    """Until min_tokens are out, stop tokens and end-of-sequence are never drawn (the next best is); after that a
    stop ends the request as usual."""
    engine = Engine(model, EngineConfig())
    free = engine.generate([[3, 4, 5]], GREEDY)[0].token_ids
    stop = (free[0], free[4])
    held = engine.generate(
        [[3, 4, 5]], SamplingParams(temperature=0, max_new_tokens=10, stop_token_ids=stop, min_tokens=3)
    )[0]
    assert len(held.token_ids) >= 3 and not set(held.token_ids[:3]) & set(stop)
    assert held.token_ids[0] != free[0]  # the greedy first token was a stop token: the next best came instead
    sampled = SamplingParams(temperature=1.0, seed=5, max_new_tokens=6, stop_token_ids=tuple(range(256)), min_tokens=4)
    out = engine.generate([[3, 4, 5]], sampled)[0]  # every token stops: the 5th ends it
    assert len(out.token_ids) == 5 and out.finish_reason == "stop"
