"""The offline engine: request intake, then a short loop of schedule -> execute -> update, and outputs."""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Sequence as Seq
from dataclasses import dataclass, replace
from typing import Any

import torch
from tqdm import tqdm

from k2batch.engine.config import EngineConfig, SamplingParams
from k2batch.engine.kv_cache import KVCacheManager
from k2batch.engine.model_runner import ModelRunner, kv_block_bytes
from k2batch.engine.placement import Placement
from k2batch.engine.ranks import RankGroup
from k2batch.engine.scheduler import Scheduler
from k2batch.engine.sequence import RequestOutput, Sequence
from k2batch.model import K2ForCausalLM, load_model
from k2batch.model.config import ModelConfig
from k2batch.model.layers import RoutedExperts
from k2batch.model.loader import parse_dtype, read_config

log = logging.getLogger(__name__)


@dataclass
class EngineStats:
    steps: int = 0
    prefill_tokens: int = 0
    """Prompt tokens run through the model (prefix-cache hits and carried-over context excluded)."""
    cached_tokens: int = 0
    """Prompt tokens served from the prefix cache or carried over from a continued request."""
    decode_tokens: int = 0
    """Sampled tokens run back through the model: one per decoding sequence per step."""
    preemptions: int = 0
    evicted_sessions: int = 0
    """Agent sessions whose pinned KV was let go for memory while they waited (their continuation recomputes)."""
    prefill_s: float = 0.0
    """Seconds of the steps that ran prefill tokens (a step mixing prefill and decode counts in both)."""
    decode_s: float = 0.0
    """Seconds of the steps that ran decode tokens."""


class Engine:
    """The offline engine over one device (a model in this process) or many (`data_parallel_size` ranks, one
    process each, started by `from_pretrained`): the same API either way."""

    def __init__(self, model: K2ForCausalLM, config: EngineConfig = EngineConfig(), tokenizer=None):
        if config.data_parallel_size != 1:
            raise ValueError(
                f"data_parallel_size {config.data_parallel_size} needs Engine.from_pretrained(path, config): each rank "
                "loads its own share of the experts from the checkpoint"
            )
        if config.dequantize_int4:
            for module in model.modules():
                if isinstance(module, RoutedExperts):
                    module.dequantize_(model.dtype)
        num_blocks = _num_blocks(config, model.config)
        self.model = model
        self.runner = ModelRunner(model, config, num_blocks)
        self.ranks: RankGroup | None = None
        self._setup(model.config, config, tokenizer, num_blocks)

    def _setup(self, model_config: ModelConfig, config: EngineConfig, tokenizer, num_blocks: int) -> None:
        self.model_config = model_config
        self.config = config
        self.tokenizer = tokenizer
        self.max_model_len = config.max_model_len or model_config.max_position_embeddings
        detokenize = self._detokenize if tokenizer is not None else None
        self.schedulers = [
            Scheduler(
                config,
                KVCacheManager(num_blocks, config.block_size, config.enable_prefix_caching),
                self.max_model_len,
                detokenize,
            )
            for _ in range(config.data_parallel_size)
        ]
        self.placement = (
            Placement([s.kv.cache for s in self.schedulers], config.block_size) if len(self.schedulers) > 1 else None
        )
        c = model_config
        eos = c.eos_token_id if isinstance(c.eos_token_id, list) else [c.eos_token_id]
        if tokenizer is not None and tokenizer.eos_token_id is not None:
            eos.append(tokenizer.eos_token_id)
        self.eos_token_ids = frozenset(t for t in eos if t is not None)
        self.stats = EngineStats()
        self.rank_stats = [EngineStats() for _ in self.schedulers]
        """Per rank: its tokens, cache hits, preemptions and evicted sessions (its steps' seconds are the engine's)."""
        self._ids = itertools.count()
        self._default_rng = torch.Generator().manual_seed(0)

    @classmethod
    def from_pretrained(
        cls, path: str, config: EngineConfig = EngineConfig(), storage_options: dict[str, Any] | None = None
    ) -> Engine:
        """The engine over a checkpoint directory or fsspec URI (`storage_options` for object stores). With
        `data_parallel_size` N > 1 it starts N rank processes, each reading only its own experts."""
        tokenizer = _load_tokenizer_if_present(path, storage_options)
        if config.data_parallel_size == 1:
            model = load_model(path, dtype=config.dtype, device=config.device, storage_options=storage_options)
            engine = cls(model, config, tokenizer)
        else:
            model_config = read_config(path, storage_options)
            num_blocks = _num_blocks(config, model_config)
            engine = cls.__new__(cls)
            engine.model, engine.runner = None, None
            engine.ranks = RankGroup(path, config, dict(storage_options or {}) or None, num_blocks)
            engine._setup(model_config, config, tokenizer, num_blocks)
        engine.eos_token_ids |= _generation_config_eos(path, storage_options)
        return engine

    @property
    def scheduler(self) -> Scheduler:
        """The scheduler of a one-rank engine (rank 0's otherwise)."""
        return self.schedulers[0]

    @property
    def kv(self) -> KVCacheManager:
        """The KV-cache manager of a one-rank engine (rank 0's otherwise)."""
        return self.schedulers[0].kv

    def close(self) -> None:
        """Stop the rank processes of a data-parallel engine (a one-rank engine has none)."""
        if self.ranks is not None:
            self.ranks.close()

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- incremental API (agent loops) -------------------------------------------------------------------

    def add_request(
        self,
        prompt: str | Seq[int],
        params: SamplingParams = SamplingParams(),
        *,
        request_id: str | None = None,
        keep_kv: bool = False,
        continue_from: str | None = None,
    ) -> str:
        """Queue a request. `keep_kv` keeps its KV as a session after it finishes; `continue_from` names such a
        session whose tokens this prompt extends: the KV of the tokens they share is reused, so only the new
        tokens are prefilled (if memory pressure evicted the session meanwhile, the prefix cache serves what
        is left and the rest is recomputed). A continuation runs on the rank that holds its session."""
        request_id = request_id or f"req-{next(self._ids)}"
        prompt_ids = self._encode(prompt)
        seed = params.seed if params.seed is not None else int(torch.randint(2**62, (1,), generator=self._default_rng))
        stop_ids = frozenset(params.stop_token_ids) | (frozenset() if params.ignore_eos else self.eos_token_ids)
        seq = Sequence(
            request_id,
            prompt_ids or [],
            params,
            seed=_int64(seed),
            stop_ids=stop_ids,
            max_output=min(params.max_new_tokens, self.max_model_len - len(prompt_ids or [])),
            keep_kv=keep_kv,
        )
        error = self._check(prompt_ids, params)
        if error:
            if continue_from:
                self.release(continue_from)
            self.schedulers[0].reject(seq, error)
            return request_id
        rank = self.placement.place(request_id, seq.prompt_ids, continue_from) if self.placement else 0
        self.schedulers[rank].add(seq, continue_from)
        return request_id

    def release(self, request_id: str) -> None:
        """End a kept request's session: its KV is unpinned (full blocks stay in the prefix cache until evicted)."""
        if self.placement is None:
            self.scheduler.release(request_id)
            return
        rank = self.placement.session_rank(request_id)
        if rank is not None:
            self.schedulers[rank].release(request_id)
            self.placement.released(request_id)

    def has_unfinished(self) -> bool:
        return any(s.has_work() for s in self.schedulers)

    def step(self) -> list[RequestOutput]:
        """Run one step (on every rank together); return the requests that finished (or were rejected) since the
        last step."""
        plans = [s.schedule() for s in self.schedulers]
        if any(plan is not None for plan in plans):
            started = time.perf_counter()
            if self.ranks is None:
                results = [self.runner.execute(plans[0])]  # sampled ids on the host: the device is done
            else:
                results = self.ranks.execute(plans)
            elapsed = time.perf_counter() - started
            for scheduler, plan, result, stats in zip(self.schedulers, plans, results, self.rank_stats):
                if plan is None:
                    continue
                scheduler.update(plan, result)
                stats.steps += 1
                stats.prefill_tokens += plan.num_prefill_tokens
                stats.decode_tokens += plan.num_decode_tokens
            s = self.stats
            s.steps += 1
            s.prefill_tokens += sum(p.num_prefill_tokens for p in plans if p is not None)
            s.decode_tokens += sum(p.num_decode_tokens for p in plans if p is not None)
            s.prefill_s += elapsed if any(p is not None and p.num_prefill_tokens for p in plans) else 0.0
            s.decode_s += elapsed if any(p is not None and p.num_decode_tokens for p in plans) else 0.0
        outputs = []
        for scheduler, stats in zip(self.schedulers, self.rank_stats):
            stats.cached_tokens = scheduler.num_cached_tokens
            stats.preemptions = scheduler.num_preemptions
            stats.evicted_sessions = scheduler.kv.num_sessions_evicted
            for seq, reason, error in scheduler.take_finished():
                if self.placement is not None:
                    self.placement.finished(seq.request_id, kept=seq.keep_kv and reason != "error")
                outputs.append(self._output(seq, reason, error))
        self.stats.cached_tokens = sum(r.cached_tokens for r in self.rank_stats)
        self.stats.preemptions = sum(r.preemptions for r in self.rank_stats)
        self.stats.evicted_sessions = sum(r.evicted_sessions for r in self.rank_stats)
        return outputs

    def _output(self, seq: Sequence, reason: str, error: str | None = None) -> RequestOutput:
        text = None
        if self.tokenizer is not None and seq.output_ids:
            text = self._detokenize(seq.output_ids)
            if seq.params.stop and reason == "stop":
                cut = min((text.find(s) for s in seq.params.stop if s in text), default=-1)
                text = text[:cut] if cut >= 0 else text
        return RequestOutput(
            seq.request_id,
            seq.prompt_ids,
            list(seq.output_ids),
            reason,
            text=text,
            error=error,
            num_cached_tokens=seq.num_cached_prompt,
            logprobs=list(seq.logprobs) if seq.params.logprobs else None,
        )

    def _detokenize(self, ids: list[int]) -> str:
        # Embedding matrices are often padded past the tokenizer's vocabulary; such ids have no text.
        return self.tokenizer.decode([t for t in ids if t < self.tokenizer.vocab_size])

    def _encode(self, prompt: str | Seq[int]) -> list[int] | None:
        """Token ids of a prompt; None for text when there is no tokenizer (the request gets an error)."""
        if isinstance(prompt, str):
            return self.tokenizer.encode_chat(prompt) if self.tokenizer is not None else None
        return [int(t) for t in prompt]

    def _check(self, ids: list[int] | None, params: SamplingParams) -> str | None:
        vocab = self.model_config.vocab_size
        if ids is None:
            return "a text prompt needs a tokenizer; this engine has none, so pass token ids"
        if params.stop and self.tokenizer is None:
            return "stop strings need a tokenizer; this engine has none, so pass stop_token_ids"
        if not ids:
            return "empty prompt"
        bad = next((t for t in ids if not 0 <= t < vocab), None)
        if bad is not None:
            return f"token id {bad} is outside the vocabulary (size {vocab})"
        if len(ids) >= self.max_model_len:
            return f"prompt has {len(ids):,} tokens, context is {self.max_model_len:,}"
        if -(-(len(ids) + 1) // self.config.block_size) > self.kv.num_blocks:
            held = self.kv.num_blocks * self.config.block_size
            return f"prompt has {len(ids):,} tokens, the KV cache (of one rank) holds {held:,}"
        return None

    # -- batch API ---------------------------------------------------------------------------------------

    def generate(
        self,
        prompts: Seq[str | Seq[int]],
        params: SamplingParams | Seq[SamplingParams] = SamplingParams(),
        *,
        use_tqdm: bool | None = None,
    ) -> list[RequestOutput]:
        """Run all prompts to completion; outputs in the order of `prompts`.

        Requests are queued in token order, so prompts sharing a prefix run next to each other and the prefix
        is prefilled once.
        """
        params_list = list(params) if not isinstance(params, SamplingParams) else [params] * len(prompts)
        encoded = [self._encode(p) for p in prompts]
        order = sorted(range(len(prompts)), key=lambda i: encoded[i] or [])
        ids = {}
        for i in order:
            prompt = encoded[i] if encoded[i] is not None else prompts[i]
            ids[self.add_request(prompt, params_list[i], request_id=f"gen-{next(self._ids)}")] = i
        results: list[RequestOutput | None] = [None] * len(prompts)
        show = self.config.show_progress if use_tqdm is None else use_tqdm
        # disable=None: shown only when stderr is a terminal; the delay keeps short calls quiet.
        disable = None if show is None else not show
        bar = tqdm(total=len(prompts), desc="generate", disable=disable, delay=1.0, dynamic_ncols=True)
        start = replace(self.stats)
        while self.has_unfinished():
            finished = self.step()
            for out in finished:
                results[ids[out.request_id]] = out
            bar.update(len(finished))
            s = self.stats
            prefill = _rate(s.prefill_tokens - start.prefill_tokens, s.prefill_s - start.prefill_s)
            decode = _rate(s.decode_tokens - start.decode_tokens, s.decode_s - start.decode_s)
            bar.set_postfix_str(f"prefill {prefill:.0f} tok/s, decode {decode:.0f} tok/s", refresh=False)
        bar.close()
        return results  # type: ignore[return-value]

    def prefix_cache_stats(self, rank: int | None = None) -> dict[str, int]:
        """Prefix-cache hits and misses (in full prompt blocks) and cached blocks: of one rank, or summed."""
        caches = [s.kv.cache for s in (self.schedulers if rank is None else [self.schedulers[rank]])]
        caches = [c for c in caches if c is not None]
        return {
            "hit_blocks": sum(c.hit_blocks for c in caches),
            "miss_blocks": sum(c.miss_blocks for c in caches),
            "cached_blocks": sum(len(c) for c in caches),
        }


def _num_blocks(config: EngineConfig, model_config: ModelConfig) -> int:
    """KV blocks per rank: the configured number, or as many as kv_cache_gib holds."""
    if config.num_kv_blocks is not None:
        return config.num_kv_blocks
    block = kv_block_bytes(model_config, parse_dtype(config.dtype), config.block_size)
    return max(1, int(config.kv_cache_gib * 2**30) // block)


def _int64(seed: int) -> int:
    """A seed of any size as the signed 64-bit value with the same low 64 bits."""
    seed &= 2**64 - 1
    return seed - 2**64 if seed >= 2**63 else seed


def _rate(tokens: int, seconds: float) -> float:
    return tokens / seconds if seconds > 0 else 0.0


def _generation_config_eos(path: str, storage_options: dict[str, Any] | None) -> frozenset[int]:
    """End-of-sequence ids from generation_config.json (chat models end turns with e.g. <|im_end|>)."""
    import json

    import fsspec

    fs, root = fsspec.core.url_to_fs(path, **(storage_options or {}))
    name = f"{root.rstrip('/')}/generation_config.json"
    if not fs.exists(name):
        return frozenset()
    with fs.open(name, "rb") as f:
        eos = json.load(f).get("eos_token_id")
    return frozenset(eos if isinstance(eos, list) else [eos] if eos is not None else [])


def _load_tokenizer_if_present(path: str, storage_options: dict[str, Any] | None):
    import fsspec

    fs, root = fsspec.core.url_to_fs(path, **(storage_options or {}))
    names = {p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(root, detail=False)}
    if not names & {"tokenizer.json", "tiktoken.model"}:
        log.info("%s has no tokenizer files; the engine takes token ids only", path)
        return None
    from k2batch.tokenizer import load_tokenizer

    return load_tokenizer(path, storage_options)
