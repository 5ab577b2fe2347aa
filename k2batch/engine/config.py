"""Engine and sampling settings: what the engine is built with, and what each request asks for."""

from __future__ import annotations

import msgspec


class EngineConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """How the offline engine runs: slots, prefill chunking, KV cache size, device."""

    max_num_seqs: int = 64
    """Decode slots: sequences decoded together in one forward (static batch)."""
    max_num_batched_tokens: int = 2048
    """Token budget of one forward: prefill chunks plus decode tokens."""
    block_size: int = 16
    """Tokens per KV-cache block (and the granularity of the prefix cache)."""
    kv_cache_gib: float = 1.0
    """Memory for the paged latent KV cache; the number of blocks follows from the model's layer sizes."""
    num_kv_blocks: int | None = None
    """Exact number of KV blocks; overrides kv_cache_gib (tests use tiny caches to force preemption)."""
    max_model_len: int | None = None
    """Context length; defaults to the model's max_position_embeddings."""
    enable_prefix_caching: bool = True
    dequantize_int4: bool = False
    """Dequantize INT4 experts once at start (dense copies, ~4-8x their memory) instead of per use. For CPU
    runs, where unpacking every touched expert on every step costs more than the matmuls; the GPU kernel reads
    packed weights directly."""
    dtype: str = "float32"
    device: str = "cpu"
    data_parallel_size: int = 1
    """Ranks the engine spans (one process each, one GPU each on CUDA): attention data-parallel, every rank with its
    own requests, KV cache and prefix cache; routed experts split over the ranks (expert parallelism). 1 runs the
    model in the calling process."""
    rank_timeout_s: float = 600.0
    """Seconds a rank may take for one step (and one MoE exchange) before the engine gives up with an error."""
    rank_start_timeout_s: float = 3600.0
    """Seconds the ranks may take to start and load their weights."""
    show_progress: bool | None = None
    """Progress bar for `generate` (prefill and decode tokens/s); None: only on a terminal, for calls over a second."""


class SamplingParams(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """Per-request decoding: greedy when temperature is 0."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_new_tokens: int = 256
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    min_tokens: int = 0
    """Tokens generated before a stop may end the request: until then its stop tokens and end-of-sequence are never
    sampled and stop strings do not count."""
    logprobs: bool = False
