"""The DeepSeek-V3 / Kimi-K2 architecture in plain PyTorch, and its checkpoint loader."""

from k2batch.model.config import ModelConfig
from k2batch.model.loader import CheckpointError, load_model, read_config
from k2batch.model.model import CausalAttention, K2ForCausalLM

__all__ = ["CausalAttention", "CheckpointError", "K2ForCausalLM", "ModelConfig", "load_model", "read_config"]
