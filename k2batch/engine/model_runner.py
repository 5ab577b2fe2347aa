"""Executes a step plan: the model forward over the paged latent cache, then batched sampling."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from k2batch.engine.config import EngineConfig
from k2batch.engine.plan import StepPlan, StepResult
from k2batch.engine.sampler import sample
from k2batch.kernels.mla_decode import mla_decode
from k2batch.model import K2ForCausalLM
from k2batch.model.config import ModelConfig
from k2batch.model.layers import MLAttention


def kv_block_bytes(config: ModelConfig, dtype: torch.dtype, block_size: int) -> int:
    """Bytes of one KV-cache block: every layer's latents (kv_lora_rank + rope key) for block_size tokens."""
    return config.num_hidden_layers * block_size * config.kv_cache_dim * dtype.itemsize


class PagedAttention:
    """Attention for one step over the paged cache of latents (kv_lora_rank + rope key per token per layer).

    Each layer first writes the step's new latents, then performs the plan's copies, then attends, so a row may
    read or copy blocks that another row of the same step computes (two prompts sharing a prefix prefill it
    once). Decode rows run in latent space with absorbed weights (MQA over 576-dim keys), all in one call.
    Prefill rows up-project their contexts to per-head keys and values and attend in one padded, masked call:
    query i of a row sits at position context_len - query_len + i and sees the keys up to there. The indices
    for that are built once per step, not per layer.
    """

    def __init__(self, kv_cache: torch.Tensor, plan: StepPlan, device: torch.device):
        self.kv_cache = kv_cache  # [layers, blocks, block_size, dim]
        bs = kv_cache.shape[2]
        self.slot_mapping = plan.slot_mapping.to(device)
        self.copy_src = plan.copy_src.to(device)
        self.copy_dst = plan.copy_dst.to(device)
        d = self.num_decode = plan.num_decode
        if d:
            self.decode_tables = plan.block_tables[:d].to(device)
            self.decode_lens = plan.context_lens[:d].to(device, torch.int32)
        self.num_prefill_rows = plan.num_rows - d
        if not self.num_prefill_rows:
            return
        q_lens = (plan.query_start[d + 1 :] - plan.query_start[d:-1]).to(device)
        ctx_lens = plan.context_lens[d:].to(device)
        tables = plan.block_tables[d:].to(device, torch.int64)
        rows = torch.arange(len(q_lens), device=device)
        # Context tokens of all prefill rows, concatenated: their row, position, and cache slot.
        ctx_row = rows.repeat_interleave(ctx_lens)
        ctx_pos = torch.arange(len(ctx_row), device=device) - (ctx_lens.cumsum(0) - ctx_lens).repeat_interleave(
            ctx_lens
        )
        self.ctx_slots = tables[ctx_row, ctx_pos // bs] * bs + ctx_pos % bs
        self.ctx_index = (ctx_row, ctx_pos)
        # Query tokens of the prefill rows (the step's tokens after the decode rows): their row and index.
        q_row = rows.repeat_interleave(q_lens)
        q_idx = torch.arange(len(q_row), device=device) - (q_lens.cumsum(0) - q_lens).repeat_interleave(q_lens)
        self.q_index = (q_row, q_idx)
        self.max_q, self.max_ctx = int(q_lens.max()), int(ctx_lens.max())
        i = torch.arange(self.max_q, device=device).view(1, -1, 1)
        j = torch.arange(self.max_ctx, device=device).view(1, 1, -1)
        last_visible = (ctx_lens - q_lens).view(-1, 1, 1) + i
        mask = j <= last_visible
        # Padding queries (past a row's length) see key 0 only, so no softmax row is empty; their output is dropped.
        mask |= (i >= q_lens.view(-1, 1, 1)) & (j == 0)
        self.mask = mask.unsqueeze(1)  # [P, 1, max_q, max_ctx], broadcast over heads

    def __call__(
        self,
        layer: int,
        mla: MLAttention,
        q_nope: torch.Tensor,
        q_pe: torch.Tensor,
        latent: torch.Tensor,
        k_pe: torch.Tensor,
    ) -> torch.Tensor:
        cache = self.kv_cache[layer]
        flat = cache.view(-1, cache.shape[-1])
        flat[self.slot_mapping] = torch.cat((latent, k_pe), dim=-1).to(flat.dtype)
        if len(self.copy_dst):
            flat[self.copy_dst] = flat[self.copy_src]
        out = q_nope.new_empty(q_nope.shape[0], mla.num_heads, mla.v_dim)
        d = self.num_decode
        if d:
            w_uk, w_uv = mla.absorbed()
            q_latent = torch.einsum("nhd,hdl->nhl", q_nope[:d], w_uk)
            q = torch.cat((q_latent, q_pe[:d]), dim=-1)
            o_latent = mla_decode(q, cache, self.decode_tables, self.decode_lens, mla.scale, mla.kv_lora_rank)
            out[:d] = torch.einsum("nhl,hvl->nhv", o_latent.to(w_uv.dtype), w_uv)
        if self.num_prefill_rows:
            c_kv, kpe_ctx = flat[self.ctx_slots].split([mla.kv_lora_rank, mla.qk_rope_dim], dim=-1)
            q, k, v = mla.expand_qkv(q_nope[d:], q_pe[d:], c_kv.to(q_nope.dtype), kpe_ctx.to(q_nope.dtype))
            p, h = self.num_prefill_rows, mla.num_heads
            qp = q.new_zeros(p, self.max_q, h, q.shape[-1])
            qp[self.q_index] = q
            kp = k.new_zeros(p, self.max_ctx, h, k.shape[-1])
            kp[self.ctx_index] = k
            vp = v.new_zeros(p, self.max_ctx, h, v.shape[-1])
            vp[self.ctx_index] = v
            o = F.scaled_dot_product_attention(
                qp.transpose(1, 2), kp.transpose(1, 2), vp.transpose(1, 2), attn_mask=self.mask, scale=mla.scale
            )  # [P, H, max_q, v]
            out[d:] = o.transpose(1, 2)[self.q_index]
        return out


class ModelRunner:
    """Owns the model and the KV cache of one device; turns a StepPlan into a StepResult and nothing else."""

    def __init__(self, model: K2ForCausalLM, config: EngineConfig, num_blocks: int):
        self.model = model
        c = model.config
        self.kv_cache = torch.zeros(
            c.num_hidden_layers, num_blocks, config.block_size, c.kv_cache_dim, dtype=model.dtype, device=model.device
        )

    @torch.inference_mode()
    def execute(self, plan: StepPlan) -> StepResult:
        logits = self.compute_logits(plan)
        device = logits.device
        if len(plan.banned_rows):
            logits[plan.banned_rows.to(device), plan.banned_ids.to(device)] = float("-inf")
        tokens, logprobs = sample(
            logits,
            plan.temperature.to(device),
            plan.top_k.to(device),
            plan.top_p.to(device),
            plan.seeds.to(device),
            plan.sample_index.to(device),
            plan.want_logprobs,
        )
        return StepResult(tokens.cpu(), logprobs.cpu() if logprobs is not None else None)

    @torch.inference_mode()
    def compute_logits(self, plan: StepPlan) -> torch.Tensor:
        """Forward the plan's tokens (writing their latents to the cache); float32 logits [S, vocab] at the last
        query token of each sample row."""
        device = self.model.device
        attention = PagedAttention(self.kv_cache, plan, device)
        hidden = self.model(plan.input_ids.to(device), plan.positions.to(device), attention)
        last = (plan.query_start[1:] - 1)[plan.sample_rows].to(device)
        return self.model.compute_logits(hidden[last]).float()
