"""The offline engine: paged latent KV cache, radix prefix cache, token-budget scheduler, sampler."""

from k2batch.engine.config import EngineConfig, SamplingParams
from k2batch.engine.engine import Engine, EngineStats
from k2batch.engine.sequence import RequestOutput

__all__ = ["Engine", "EngineConfig", "EngineStats", "RequestOutput", "SamplingParams"]
