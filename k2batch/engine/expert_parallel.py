"""Expert-parallel MoE: the routed experts of every layer split over the ranks, tokens sent to their experts' ranks
and the results sent back (all-to-all), under torch.distributed (NCCL on GPUs, gloo on CPU)."""

from __future__ import annotations

import torch
import torch.distributed as dist

from k2batch.model import K2ForCausalLM
from k2batch.model.layers import MoE, RoutedExperts


def expert_range(num_experts: int, rank: int, world_size: int) -> range:
    """The experts rank `rank` holds: a contiguous share, the first ranks taking one more when it does not divide."""
    base, extra = divmod(num_experts, world_size)
    start = rank * base + min(rank, extra)
    return range(start, start + base + (rank < extra))


class ExpertExchange:
    """One MoE layer's routed experts over all ranks. Every rank calls it once per MoE layer per step, in the same
    order, also with no tokens (a rank without work still joins every exchange, or the others would wait).

    Each (token, expert) pair goes to the expert's rank in one all-to-all, comes back unweighted in another, and is
    weighted and summed here in ascending expert order, as the one-rank MoE sums it.
    """

    def __init__(self, num_experts: int, group: dist.ProcessGroup | None = None):
        self.group = group
        self.world_size = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        self.ranges = [expert_range(num_experts, r, self.world_size) for r in range(self.world_size)]
        # Owner of every expert, for a lookup instead of a search.
        self.owner = torch.tensor([r for r, share in enumerate(self.ranges) for _ in share], dtype=torch.long)
        self.first = torch.tensor([share.start for share in self.ranges], dtype=torch.long)

    def __call__(
        self, x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor, experts: RoutedExperts
    ) -> torch.Tensor:
        device = x.device
        top_k = topk_ids.shape[1]
        flat = topk_ids.flatten()
        order = torch.argsort(flat, stable=True)  # pairs by expert, so also by owning rank
        expert_of = flat[order]
        token_of = order // top_k
        owner = self.owner.to(device)[expert_of]
        send_counts = torch.bincount(owner, minlength=self.world_size)
        recv_counts = self._exchange_counts(send_counts)
        send, recv = send_counts.tolist(), recv_counts.tolist()
        local_ids = expert_of - self.first.to(device)[owner]
        recv_x = self._all_to_all(x[token_of], recv, send)
        recv_ids = self._all_to_all(local_ids, recv, send)
        # Each received pair is its own row with weight 1 (exact), so the expert outputs come back unweighted.
        y = experts(
            recv_x, torch.ones(len(recv_ids), 1, dtype=topk_weights.dtype, device=device), recv_ids.unsqueeze(1)
        )
        back = self._all_to_all(y, send, recv)
        weights = topk_weights.flatten()[order].unsqueeze(1)
        return torch.zeros_like(x).index_add_(0, token_of, (back * weights).to(x.dtype))

    def _exchange_counts(self, send_counts: torch.Tensor) -> torch.Tensor:
        recv = torch.empty_like(send_counts)
        dist.all_to_all_single(recv, send_counts, group=self.group)
        return recv

    def _all_to_all(self, t: torch.Tensor, output_splits: list[int], input_splits: list[int]) -> torch.Tensor:
        out = t.new_empty(sum(output_splits), *t.shape[1:])
        dist.all_to_all_single(out, t.contiguous(), output_splits, input_splits, group=self.group)
        return out


def enable_expert_parallel(model: K2ForCausalLM, group: dist.ProcessGroup | None = None) -> None:
    """Route every MoE layer of a model loaded with one rank's experts through the exchange."""
    c = model.config
    exchange = ExpertExchange(c.n_routed_experts, group)
    share = exchange.ranges[exchange.rank]
    for layer in model.layers:
        if isinstance(layer.mlp, MoE):
            if layer.mlp.expert_range != share:
                raise ValueError(
                    f"rank {exchange.rank} must hold experts {share}, the model holds {layer.mlp.expert_range}"
                )
            layer.mlp.exchange = exchange


def join_moe_layers(model: K2ForCausalLM) -> None:
    """A rank with nothing to run in a step: take part in every MoE layer's exchange with no tokens."""
    c = model.config
    x = torch.empty(0, c.hidden_size, dtype=model.dtype, device=model.device)
    weights = torch.empty(0, c.num_experts_per_tok, dtype=torch.float32, device=model.device)
    ids = torch.empty(0, c.num_experts_per_tok, dtype=torch.long, device=model.device)
    for layer in model.layers:
        if isinstance(layer.mlp, MoE) and layer.mlp.exchange is not None:
            layer.mlp.exchange(x, weights, ids, layer.mlp.experts)
