"""One engine over several ranks (gloo on CPU): attention data-parallel, experts split over the ranks."""

import os
import signal
import time

import pytest
import torch

from k2batch.engine import Engine, EngineConfig, SamplingParams
from k2batch.engine.expert_parallel import expert_range
from k2batch.engine.ranks import RankFailure
from k2batch.model.config import ModelConfig
from k2batch.model.export import random_model, save_checkpoint
from k2batch.model.loader import scan_tensors
from k2batch.storage import filesystem
from tests.engine.test_step import _drain

GREEDY = SamplingParams(temperature=0, max_new_tokens=8, ignore_eos=True)
CONFIG = dict(
    model_type="kimi_k2",
    vocab_size=256,
    hidden_size=64,
    intermediate_size=96,
    moe_intermediate_size=32,
    num_hidden_layers=3,
    num_attention_heads=2,
    q_lora_rank=32,
    kv_lora_rank=32,
    qk_nope_head_dim=16,
    qk_rope_head_dim=16,
    v_head_dim=16,
    n_routed_experts=7,
    n_shared_experts=1,
    num_experts_per_tok=3,
    n_group=1,
    topk_group=1,
    first_k_dense_replace=1,
    routed_scaling_factor=2.827,
    max_position_embeddings=4096,
    eos_token_id=1,
    rope_theta=50000.0,
)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """INT4 routed experts, 7 of them: two ranks hold 4 and 3."""
    model = random_model(ModelConfig.from_dict(CONFIG), seed=11)
    return str(save_checkpoint(model, tmp_path_factory.mktemp("dp-ckpt"), int4_experts=True))


def _prompts(n=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    prefixes = [torch.randint(2, 256, (int(length),), generator=g).tolist() for length in (37, 21, 0)]
    return [
        prefixes[i % 3] + torch.randint(2, 256, (int(torch.randint(1, 15, (1,), generator=g)),), generator=g).tolist()
        for i in range(n)
    ]


def _engine(checkpoint, ranks, **overrides):
    config = EngineConfig(
        **{
            "data_parallel_size": ranks,
            "block_size": 4,
            "max_num_seqs": 8,
            "num_kv_blocks": 256,
            "rank_timeout_s": 60.0,
            **overrides,
        }
    )
    return Engine.from_pretrained(checkpoint, config)


def test_two_ranks_give_the_one_rank_outputs(checkpoint):
    prompts = _prompts()
    reference = _engine(checkpoint, 1).generate(prompts, GREEDY)
    with _engine(checkpoint, 2) as engine:
        outputs = engine.generate(prompts, GREEDY)
        assert [o.token_ids for o in outputs] == [o.token_ids for o in reference]
        # Both ranks worked, about equally; each prefilled the shared prefixes it got once and then hit them.
        placed = engine.placement.placed
        assert sum(placed) == len(prompts) and max(placed) - min(placed) <= 4
        for rank, stats in enumerate(engine.rank_stats):
            assert stats.decode_tokens > 0
            assert engine.prefix_cache_stats(rank)["hit_blocks"] > 0
        assert engine.stats.prefill_tokens == sum(s.prefill_tokens for s in engine.rank_stats)
        # Each rank read the shared weights and only its own experts.
        fs, root = filesystem(checkpoint)
        tensors = scan_tensors(fs, root)
        for info in engine.ranks.info:
            own = sum(
                t.end - t.start for key, t in tensors.items() if _expert(key) is None or _expert(key) in info.experts
            )
            assert info.checkpoint_bytes_read == own
        assert [i.experts for i in engine.ranks.info] == [range(0, 4), range(4, 7)]
        total = sum(t.end - t.start for t in tensors.values())
        assert all(i.checkpoint_bytes_read < total for i in engine.ranks.info)
    assert not any(_alive(pid) for pid in engine.ranks.pids or [])


def test_sessions_continue_on_their_rank(checkpoint):
    prompts = _prompts(6, seed=1)
    with _engine(checkpoint, 2) as engine:
        first = {engine.add_request(p, GREEDY, keep_kv=True): p for p in prompts}
        outs = {o.request_id: o for o in _drain(engine)}
        ranks = {rid: engine.placement.session_rank(rid) for rid in first}
        assert set(ranks.values()) == {0, 1}
        cached_before = [s.cached_tokens for s in engine.rank_stats]
        continued = {}
        for rid, p in first.items():
            full = p + outs[rid].token_ids + [5, 6, 7]
            continued[engine.add_request(full, GREEDY, continue_from=rid)] = (full, ranks[rid])
        second = {o.request_id: o for o in _drain(engine)}
        for rid, (full, _) in continued.items():
            assert second[rid].num_cached_tokens == len(full) - 4  # the whole kept context came from the session
        gained = [s.cached_tokens - b for s, b in zip(engine.rank_stats, cached_before)]
        for rank in (0, 1):
            assert gained[rank] == sum(len(full) - 4 for full, r in continued.values() if r == rank)
        reference = _engine(checkpoint, 1).generate([full for full, _ in continued.values()], GREEDY)
        assert [second[rid].token_ids for rid in continued] == [o.token_ids for o in reference]
        assert not any(s.kv.sessions for s in engine.schedulers)


@pytest.mark.slow
def test_four_ranks_give_the_one_rank_outputs(checkpoint):
    """Four ranks over seven experts (2, 2, 2, 1), with more ranks than some steps have requests for."""
    prompts = _prompts(10, seed=2)
    reference = _engine(checkpoint, 1).generate(prompts, GREEDY)
    with _engine(checkpoint, 4, max_num_seqs=2) as engine:
        assert [o.token_ids for o in engine.generate(prompts, GREEDY)] == [o.token_ids for o in reference]
        assert [i.experts for i in engine.ranks.info] == [expert_range(7, r, 4) for r in range(4)]


@pytest.mark.parametrize("how", ["killed", "hung"])
def test_a_dead_or_hung_rank_fails_the_engine_within_its_timeout(checkpoint, how):
    engine = _engine(checkpoint, 2, rank_timeout_s=5.0)
    for p in _prompts(4, seed=3):
        engine.add_request(p, SamplingParams(temperature=0, max_new_tokens=200, ignore_eos=True))
    engine.step()
    victim = engine.ranks.pids[1]
    pids = list(engine.ranks.pids)
    os.kill(victim, signal.SIGKILL if how == "killed" else signal.SIGSTOP)
    started = time.monotonic()
    try:
        with pytest.raises(RankFailure, match="rank 1 (exited with code -9|did not answer)"):
            for _ in range(100):
                engine.step()
        assert time.monotonic() - started < 5.0 + 15.0
        # Every rank process is gone, the stopped one too, and the engine says so if used again.
        assert not any(_alive(pid) for pid in pids)
        with pytest.raises(RankFailure, match="shut down"):
            engine.step()
    finally:
        if how == "hung" and _alive(victim):
            os.kill(victim, signal.SIGKILL)
        engine.close()


def test_one_rank_engine_refuses_a_model_object_with_ranks(checkpoint):
    from k2batch.model import load_model

    with pytest.raises(ValueError, match="needs Engine.from_pretrained"):
        Engine(load_model(checkpoint), EngineConfig(data_parallel_size=2))


def _expert(key):
    import re

    m = re.search(r"\.experts\.(\d+)\.", key)
    return int(m.group(1)) if m else None


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:  # a zombie child is dead
        return f.read().split(") ")[-1][0] != "Z"
