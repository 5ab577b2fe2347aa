"""The launchpad's run config (dg.Config) and its mapping onto k2batch.config.BatchConfig.

Defaults are the values of configs/default.toml (overlaid by the settings' batch_config), so a run launched
without config runs as `k2batch run` would."""

from typing import Any

import dagster as dg
import msgspec
from pydantic import Field

from k2batch.config import BatchConfig, ConfigError
from pipelines.settings import base_batch_config

BASE = base_batch_config()


class EngineRunConfig(dg.Config):
    """How the offline engine runs."""

    max_num_seqs: int = Field(BASE.engine.max_num_seqs, description="Decode slots: sequences decoded together.")
    max_num_batched_tokens: int = Field(
        BASE.engine.max_num_batched_tokens, description="Token budget of one forward (prefill chunks + decodes)."
    )
    block_size: int = Field(BASE.engine.block_size, description="Tokens per KV-cache block.")
    kv_cache_gib: float = Field(BASE.engine.kv_cache_gib, description="Memory of the paged KV cache, GiB.")
    num_kv_blocks: int | None = Field(BASE.engine.num_kv_blocks, description="Exact KV blocks (overrides GiB).")
    max_model_len: int | None = Field(BASE.engine.max_model_len, description="Context length; null: the model's.")
    enable_prefix_caching: bool = Field(
        BASE.engine.enable_prefix_caching, description="Reuse KV blocks of shared prefixes."
    )
    dequantize_int4: bool = Field(
        BASE.engine.dequantize_int4, description="Dequantize INT4 experts once at start (faster on CPU)."
    )
    dtype: str = Field(BASE.engine.dtype, description="float32 on CPU, bfloat16 on GPU.")
    device: str = Field(BASE.engine.device, description="cpu or cuda.")


class SamplingRunConfig(dg.Config):
    """Decoding defaults for every job; a job's own columns win."""

    temperature: float = Field(BASE.sampling.temperature, description="0 is greedy.")
    top_p: float = Field(BASE.sampling.top_p, description="Nucleus sampling mass.")
    top_k: int = Field(BASE.sampling.top_k, description="0 disables top-k.")
    max_new_tokens: int = Field(BASE.sampling.max_new_tokens, description="Tokens per step (one model turn).")
    seed: int = Field(BASE.sampling.seed, description="Base seed for jobs without a seed.")


class AgentRunConfig(dg.Config):
    """Budgets and tool execution of the episode loop."""

    max_steps: int = Field(BASE.agent.max_steps, description="Model turns before status step_limit.")
    max_new_tokens_per_episode: int = Field(
        BASE.agent.max_new_tokens_per_episode, description="Generated tokens before status token_limit."
    )
    max_context_tokens: int | None = Field(
        BASE.agent.max_context_tokens, description="Context budget of an episode; null: the engine's."
    )
    tool_timeout_s: float = Field(BASE.agent.tool_timeout_s, description="Seconds a tool call may run.")
    max_tool_result_chars: int = Field(BASE.agent.max_tool_result_chars, description="Longer results are cut.")
    tool_workers: int = Field(BASE.agent.tool_workers, description="Threads running tool calls.")


class ToolsRunConfig(dg.Config):
    """The built-in tools."""

    enabled: list[str] = Field(list(BASE.tools.enabled), description="Tools a job gets when its tools column is null.")
    search_corpus: str = Field(BASE.tools.search_corpus, description="Corpus Parquet (URI) the search tool ranks.")
    read_object_prefixes: list[str] = Field(
        list(BASE.tools.read_object_prefixes), description="URI prefixes read_object may read under."
    )
    now: str = Field(BASE.tools.now.isoformat(), description="The batch's logical time (ISO 8601 with zone).")


class BatchRunConfig(dg.Config):
    """What a batch runs with: model, engine, sampling, agent budgets, tools and shard size."""

    model: str = Field(BASE.model, description="Checkpoint directory or fsspec URI.")
    engine: EngineRunConfig = Field(EngineRunConfig(), description=EngineRunConfig.__doc__)
    sampling: SamplingRunConfig = Field(SamplingRunConfig(), description=SamplingRunConfig.__doc__)
    agent: AgentRunConfig = Field(AgentRunConfig(), description=AgentRunConfig.__doc__)
    tools: ToolsRunConfig = Field(ToolsRunConfig(), description=ToolsRunConfig.__doc__)
    rows_per_shard: int = Field(BASE.shards.rows_per_shard, description="Input rows per shard (unit of retry).")

    def batch_config(self, base: BatchConfig = BASE) -> BatchConfig:
        """`base` with this run's values; what the launchpad does not show (prices, tasks, ...) stays as in base."""
        data: dict[str, Any] = msgspec.to_builtins(base)
        data["model"] = self.model
        data["engine"] = {**data["engine"], **self.engine.model_dump()}
        data["sampling"] = {**data["sampling"], **self.sampling.model_dump()}
        data["agent"] = {**data["agent"], **self.agent.model_dump()}
        data["tools"] = {**data["tools"], **self.tools.model_dump()}
        data["shards"] = {**data["shards"], "rows_per_shard": self.rows_per_shard}
        try:
            return msgspec.convert(data, BatchConfig)
        except msgspec.ValidationError as exc:
            raise ConfigError(f"run config: {exc}") from None
