"""The K2 / DeepSeek-V3 causal LM as one plain module over flattened tokens, plus full-sequence scoring."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from k2batch.model.config import ModelConfig
from k2batch.model.layers import Attention, DecoderLayer, MLAttention, RMSNorm
from k2batch.model.rope import RotaryEmbedding


class CausalAttention:
    """Attention over the tokens of the forward itself: B sequences of T tokens each, causal, no cache."""

    def __init__(self, batch: int, seq_len: int):
        self.batch, self.seq_len = batch, seq_len

    def __call__(
        self,
        layer: int,
        mla: MLAttention,
        q_nope: torch.Tensor,
        q_pe: torch.Tensor,
        latent: torch.Tensor,
        k_pe: torch.Tensor,
    ) -> torch.Tensor:
        q, k, v = mla.expand_qkv(q_nope, q_pe, latent, k_pe)
        b, t = self.batch, self.seq_len
        q, k, v = (x.view(b, t, mla.num_heads, -1).transpose(1, 2) for x in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=mla.scale)
        return out.transpose(1, 2).reshape(b * t, mla.num_heads, -1)


class K2ForCausalLM(nn.Module):
    def __init__(self, config: ModelConfig, int4_scale_dtype: torch.dtype | None = None, experts: range | None = None):
        """`experts`: the routed experts to hold (a rank's share under expert parallelism); all by default."""
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(
            DecoderLayer(config, i, int4_scale_dtype, experts) for i in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.rope = RotaryEmbedding(config)

    @property
    def dtype(self) -> torch.dtype:
        return self.embed_tokens.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.embed_tokens.weight.device

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, attention: Attention) -> torch.Tensor:
        """Final hidden states [N, hidden] of N flattened tokens; `attention` knows which tokens each one sees."""
        x = self.embed_tokens(input_ids)
        for layer in self.layers:
            x = layer(x, positions, self.rope, attention)
        return self.norm(x)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)

    @torch.inference_mode()
    def score(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Full causal forward: token ids [B, T] -> logits [B, T, vocab]."""
        if input_ids.dim() == 1:
            input_ids = input_ids.unsqueeze(0)
        b, t = input_ids.shape
        input_ids = input_ids.to(self.device)
        positions = torch.arange(t, device=self.device).repeat(b)
        hidden = self.forward(input_ids.reshape(-1), positions, CausalAttention(b, t))
        return self.compute_logits(hidden).view(b, t, -1)
