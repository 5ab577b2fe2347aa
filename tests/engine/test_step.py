"""The step contract: plans are plain data a fresh runner replays, block tables follow the scheduler's sequences,
prefill rows attend together, and sessions give way under memory pressure without losing a request."""

import io
import pickle

import pytest
import torch

from k2batch.engine import Engine, EngineConfig, SamplingParams
from k2batch.engine.model_runner import ModelRunner, PagedAttention
from k2batch.engine.plan import StepPlan
from k2batch.model import load_model
from tests.checkpoints import random_hf_model, save_hf

GREEDY = SamplingParams(temperature=0, max_new_tokens=6, ignore_eos=True)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return load_model(save_hf(random_hf_model(seed=5), tmp_path_factory.mktemp("ckpt")))


def _prompts(n, prefix_len, seed=0):
    g = torch.Generator().manual_seed(seed)
    prefix = torch.randint(2, 256, (prefix_len,), generator=g).tolist()
    return [
        prefix + torch.randint(2, 256, (int(torch.randint(1, 12, (1,), generator=g)),), generator=g).tolist()
        for _ in range(n)
    ]


class _NoRequestObjects(pickle.Unpickler):
    """Unpickles tensors and builtins only: a plan that smuggled a Sequence (or any engine object) fails here."""

    def find_class(self, module, name):
        if module.startswith("k2batch") and (module, name) != ("k2batch.engine.plan", "StepPlan"):
            raise pickle.UnpicklingError(f"a plan must not carry {module}.{name}")
        return super().find_class(module, name)


def test_a_pickled_plan_replays_in_a_fresh_runner(model):
    """Every step of a mixed run (shared prefixes with partial-block copies, chunked prefill next to decode rows,
    greedy next to seeded sampling) is pickled, unpickled without engine classes, and executed by a new runner
    over the same weights and a copy of the cache as it was: same tokens, same log-probabilities, same cache."""
    config = EngineConfig(block_size=4, max_num_batched_tokens=32, max_num_seqs=6, num_kv_blocks=64)
    engine = Engine(model, config)
    execute = engine.runner.execute
    seen = {"plans": 0, "copies": 0, "mixed": 0, "sampled": 0}

    def checked(plan):
        before = engine.runner.kv_cache.clone()
        data = pickle.dumps(plan)
        result = execute(plan)
        fresh = ModelRunner(model, config, config.num_kv_blocks)
        fresh.kv_cache.copy_(before)
        again = fresh.execute(_NoRequestObjects(io.BytesIO(data)).load())
        assert torch.equal(again.token_ids, result.token_ids)
        assert (again.logprobs is None) == (result.logprobs is None)
        if result.logprobs is not None:
            assert torch.equal(again.logprobs, result.logprobs)
        assert torch.equal(fresh.kv_cache, engine.runner.kv_cache)
        seen["plans"] += 1
        seen["copies"] += len(plan.copy_dst) > 0
        seen["mixed"] += 0 < plan.num_decode < plan.num_rows
        seen["sampled"] += bool((plan.temperature > 0).any())
        return result

    engine.runner.execute = checked
    prompts = _prompts(10, 10)
    params = [
        SamplingParams(temperature=0.8, top_p=0.9, top_k=20, seed=i, max_new_tokens=6, ignore_eos=True, logprobs=True)
        if i % 2
        else GREEDY
        for i in range(10)
    ]
    outputs = engine.generate(prompts, params)
    assert all(len(o.token_ids) == 6 for o in outputs)
    assert seen["plans"] > 5 and seen["copies"] and seen["mixed"] and seen["sampled"]


def test_plan_block_tables_follow_the_sequences_through_preemption(model):
    """The tables are extended in place as blocks are allocated, never rebuilt; through preemption and slot reuse
    each row still shows exactly its sequence's blocks, and each token's slot is where its position lives."""
    engine = Engine(model, EngineConfig(num_kv_blocks=20, block_size=4, max_num_seqs=8))
    execute = engine.runner.execute
    checked = []

    def check(plan: StepPlan):
        running = {seq.request_id: seq for seq in engine.scheduler.running}
        for r, request_id in enumerate(plan.request_ids):
            table = running[request_id].block_table
            ctx = int(plan.context_lens[r])
            assert plan.block_tables[r, : -(-ctx // 4)].tolist() == table[: -(-ctx // 4)]
            first, last = int(plan.query_start[r]), int(plan.query_start[r + 1])
            positions = plan.positions[first:last].tolist()
            assert positions == list(range(ctx - (last - first), ctx))
            assert plan.slot_mapping[first:last].tolist() == [table[p // 4] * 4 + p % 4 for p in positions]
        checked.append(plan.num_rows)
        return execute(plan)

    engine.runner.execute = check
    outputs = engine.generate(_prompts(8, 6, seed=1), SamplingParams(temperature=0, max_new_tokens=12, ignore_eos=True))
    assert engine.stats.preemptions > 0 and len(checked) > 12
    assert all(len(o.token_ids) == 12 for o in outputs)


def test_prefill_rows_attend_together_as_each_would_alone(model):
    """One padded, masked call for all prefill rows of a step gives each row what a step of its own gives."""
    prompts = _prompts(5, 0, seed=2) + [list(range(3, 40))]
    together = Engine(model, EngineConfig(max_num_batched_tokens=4096))
    for p in prompts:
        together.add_request(p, GREEDY)
    plan = together.scheduler.schedule()
    assert plan.num_decode == 0 and plan.num_rows == len(prompts)
    logits = together.runner.compute_logits(plan)
    for i, p in enumerate(prompts):
        alone = Engine(model, EngineConfig())
        alone.add_request(p, GREEDY)
        ref = alone.runner.compute_logits(alone.scheduler.schedule())
        torch.testing.assert_close(logits[i : i + 1], ref, atol=2e-5, rtol=1e-5)
        torch.testing.assert_close(logits[i], model.score(torch.tensor([p]))[0, -1].float(), atol=2e-5, rtol=1e-5)


def test_prefill_attention_sees_each_rows_own_context(model):
    """Rows of different query and context lengths (a chunk continuing a cached context) in one call: each query
    sees exactly the keys up to its own position in its own row."""
    engine = Engine(model, EngineConfig(block_size=4, max_num_batched_tokens=7, enable_prefix_caching=False))
    engine.add_request(list(range(3, 20)), GREEDY)  # 17 tokens: chunks of 7, 7, 3
    engine.add_request(list(range(40, 45)), GREEDY)
    plans = []
    execute = engine.runner.execute
    engine.runner.execute = lambda plan: plans.append(plan) or execute(plan)
    outputs = _drain(engine)
    assert any(p.num_rows - p.num_decode >= 2 and int(p.context_lens.max()) > int(p.query_start[-1]) for p in plans)
    fresh = Engine(model, EngineConfig()).generate([list(range(3, 20)), list(range(40, 45))], GREEDY)
    assert sorted(o.token_ids for o in outputs) == sorted(o.token_ids for o in fresh)


def test_paged_attention_pads_queries_without_nans(model):
    """A one-token prefill chunk beside a long one: padding queries exist and must not poison real rows."""
    engine = Engine(model, EngineConfig(max_num_batched_tokens=4096))
    engine.add_request([5, 6], GREEDY)
    engine.add_request(list(range(3, 30)), GREEDY)
    plan = engine.scheduler.schedule()
    attention = PagedAttention(engine.runner.kv_cache, plan, model.device)
    assert attention.max_q == 27 and attention.num_prefill_rows == 2
    assert engine.runner.compute_logits(plan).isfinite().all()


def test_sessions_give_way_under_memory_pressure(model):
    """Six sessions pinned at once need more blocks than the cache has: the oldest are evicted, their
    continuations recompute what was lost, and every output equals a run with room for all."""
    prompts = _prompts(6, 12, seed=3)
    engine = Engine(model, EngineConfig(num_kv_blocks=16, block_size=4, max_num_seqs=2))
    firsts = {engine.add_request(p, GREEDY, keep_kv=True): p for p in prompts}
    outs = {o.request_id: o for o in _drain(engine)}
    assert len(engine.kv.sessions) < 6 and engine.stats.evicted_sessions > 0
    continued = {}
    for rid, prompt in firsts.items():
        full = prompt + outs[rid].token_ids + [7, 8, 9]
        continued[engine.add_request(full, GREEDY, continue_from=rid, keep_kv=True)] = full
    second = {o.request_id: o for o in _drain(engine)}
    for rid in continued:
        engine.release(rid)
    big = Engine(model, EngineConfig(enable_prefix_caching=False))
    reference = big.generate(list(continued.values()), GREEDY)
    assert [second[rid].token_ids for rid in continued] == [o.token_ids for o in reference]
    assert [second[rid].finish_reason for rid in continued] == ["length"] * 6
    # Some continuations found their session, some recomputed: the KV carried over is less than all of it.
    carried = sum(second[rid].num_cached_tokens for rid in continued)
    assert 0 < carried < sum(len(full) - 1 for full in continued.values())
    kv = engine.kv
    assert not kv.sessions and not any(kv.ref_count) and kv.num_allocatable == kv.num_blocks


def test_queued_continuations_holding_blocks_never_deadlock(model):
    """Continuations arrive holding their sessions' KV while nothing runs; the head of the queue needs more than
    is free. The others' blocks are taken back (to the prefix cache) instead of failing the head."""
    engine = Engine(model, EngineConfig(num_kv_blocks=12, block_size=4, max_num_seqs=4))
    six = SamplingParams(temperature=0, max_new_tokens=2, ignore_eos=True)
    prompts = [list(range(10 + 20 * i, 22 + 20 * i)) for i in range(3)]  # 12 tokens: 3 blocks, 4 with outputs
    ids = [engine.add_request(p, six, keep_kv=True) for p in prompts]
    outs = {o.request_id: o for o in _drain(engine)}
    assert len(engine.kv.sessions) == 3
    long_tail = list(range(100, 120))
    fulls = [prompts[0] + outs[ids[0]].token_ids + long_tail] + [
        p + outs[i].token_ids + [5] for p, i in zip(prompts[1:], ids[1:])
    ]
    cont = [engine.add_request(full, six, continue_from=i) for full, i in zip(fulls, ids)]
    got = {o.request_id: o for o in _drain(engine)}
    assert [got[c].finish_reason for c in cont] == ["length"] * 3
    reference = Engine(model, EngineConfig(enable_prefix_caching=False)).generate(fulls, six)
    assert [got[c].token_ids for c in cont] == [o.token_ids for o in reference]


def _drain(engine, limit=2000):
    outs = []
    for _ in range(limit):
        if not engine.has_unfinished():
            return outs
        outs.extend(engine.step())
    raise AssertionError("the engine did not finish its requests")
