"""Runs one engine step through the model: flattens the scheduled tokens and attends over the paged latent cache."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from k2batch.engine.config import EngineConfig
from k2batch.engine.sequence import Sequence
from k2batch.model import K2ForCausalLM
from k2batch.model.layers import MLAttention
from kernels.mla_decode import mla_decode


def kv_block_bytes(model: K2ForCausalLM, block_size: int) -> int:
    c = model.config
    return c.num_hidden_layers * block_size * c.kv_cache_dim * model.dtype.itemsize


class PagedAttention:
    """Attention for one step over the paged cache of latents (kv_lora_rank + rope key per token per layer).

    Each layer first writes the step's new latents, then copies the latents that sequences reuse from inside
    cached blocks (`Sequence.copy_from`), then attends, so a sequence may read or copy blocks that another
    sequence of the same step computes (two prompts sharing a prefix prefill it once). Decode tokens run in
    latent space with absorbed weights (MQA over 576-dim keys); prefill chunks up-project their context to
    per-head keys and values.
    """

    def __init__(self, kv_cache: torch.Tensor, batch: list[tuple[Sequence, int]], device: torch.device):
        self.kv_cache = kv_cache  # [layers, blocks, block_size, dim]
        bs = kv_cache.shape[2]
        slots, decode_rows, decode_tables, decode_lens = [], [], [], []
        source: dict[int, int] = {}  # copy destination slot -> slot written by this step's forward or earlier
        self.prefills: list[tuple[int, int, torch.Tensor]] = []  # (first row, query length, context slots)
        row = 0
        for seq, q_len in batch:
            start, ctx = seq.num_computed, seq.num_computed + q_len
            positions = torch.arange(ctx)
            table = torch.tensor(seq.block_table, dtype=torch.long)
            ctx_slots = table[positions // bs] * bs + positions % bs
            slots.append(ctx_slots[start:])
            if seq.copy_from is not None:
                # A copy may read another copy's destination in the same step: point it at the original slot.
                dst, src = seq.block_table[start // bs] * bs, seq.copy_from * bs
                for i in range(start % bs):
                    source[dst + i] = source.get(src + i, src + i)
            if q_len == 1:
                decode_rows.append(row)
                decode_tables.append(table)
                decode_lens.append(ctx)
            else:
                self.prefills.append((row, q_len, ctx_slots.to(device)))
            row += q_len
        self.slot_mapping = torch.cat(slots).to(device)
        self.copy_dst = torch.tensor(list(source), dtype=torch.long, device=device)
        self.copy_src = torch.tensor(list(source.values()), dtype=torch.long, device=device)
        self.decode_rows = torch.tensor(decode_rows, dtype=torch.long, device=device)
        if decode_rows:
            width = max(len(t) for t in decode_tables)
            self.decode_tables = torch.stack([F.pad(t, (0, width - len(t))) for t in decode_tables]).to(device, torch.int32)
            self.decode_lens = torch.tensor(decode_lens, dtype=torch.int32, device=device)

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
        if len(self.decode_rows):
            w_uk, w_uv = mla.absorbed()
            rows = self.decode_rows
            q_latent = torch.einsum("nhd,hdl->nhl", q_nope[rows], w_uk)
            q = torch.cat((q_latent, q_pe[rows]), dim=-1)
            o_latent = mla_decode(q, cache, self.decode_tables, self.decode_lens, mla.scale, mla.kv_lora_rank)
            out[rows] = torch.einsum("nhl,hvl->nhv", o_latent.to(w_uv.dtype), w_uv)
        for row, q_len, ctx_slots in self.prefills:
            ctx = ctx_slots.shape[0]
            kv = flat[ctx_slots]
            c_kv, kpe_ctx = kv.split([mla.kv_lora_rank, mla.qk_rope_dim], dim=-1)
            k_nope, v = mla.expand_kv(c_kv)
            k = torch.cat((k_nope, kpe_ctx.unsqueeze(1).expand(-1, mla.num_heads, -1)), dim=-1)
            q = torch.cat((q_nope[row : row + q_len], q_pe[row : row + q_len]), dim=-1)
            # Query i sits at position ctx - q_len + i and sees keys up to there.
            mask = None
            if ctx != q_len:
                mask = torch.ones(q_len, ctx, dtype=torch.bool, device=q.device).tril(ctx - q_len)
            o = F.scaled_dot_product_attention(
                q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1),
                attn_mask=mask, is_causal=mask is None, scale=mla.scale,
            )  # fmt: skip
            out[row : row + q_len] = o.transpose(0, 1)
        return out


class ModelRunner:
    def __init__(self, model: K2ForCausalLM, config: EngineConfig, num_blocks: int):
        self.model = model
        c = model.config
        self.kv_cache = torch.zeros(
            c.num_hidden_layers, num_blocks, config.block_size, c.kv_cache_dim, dtype=model.dtype, device=model.device
        )

    @torch.inference_mode()
    def run(self, batch: list[tuple[Sequence, int]]) -> torch.Tensor:
        """Forward the scheduled tokens; logits [len(batch), vocab] at each sequence's last scheduled token."""
        device = self.model.device
        ids, positions, last_rows = [], [], []
        row = -1
        for seq, q_len in batch:
            start = seq.num_computed
            ids.extend(seq.tokens[start : start + q_len])
            positions.extend(range(start, start + q_len))
            row += q_len
            last_rows.append(row)
        attention = PagedAttention(self.kv_cache, batch, device)
        hidden = self.model(
            torch.tensor(ids, dtype=torch.long, device=device),
            torch.tensor(positions, dtype=torch.long, device=device),
            attention,
        )
        return self.model.compute_logits(hidden[torch.tensor(last_rows, device=device)]).float()
