"""A small expert-parallel MoE in plain PyTorch, adopting the runtime as any model would.

Used by the runtime's end-to-end test, its stall benchmark and README's example. Every
rank holds a shard of the experts and its own tokens; a block routes (softmax, top-k),
counts its routing, then dispatches:

- ``A2A``/``EX``: token rows go to the rank of the physical slot
  :meth:`DynamicDispatcher.to_physical` picks, with ``all_to_all_single``; results come
  back the same way and are combined with the routing weights;
- ``AG``: every rank gathers all tokens, computes its slots with the weights of
  ``combine [N, E] @ get_expert_trans_tensor() [E, S]``, and the partial outputs are summed
  with an all-reduce.

Shapes: ``N`` tokens of this rank, ``H`` hidden, ``F`` expert FFN width, ``E`` experts,
``k`` top-k, ``R`` ranks, ``K`` local slots, ``S = R * K``.

:class:`ToyMoE` checks all its blocks' tables in one all-gather per step
(:meth:`DynamicDispatcher.check_consistency_all`) before the first block runs; a lone
:class:`ToyMoEBlock` checks its own.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from .collector import ExpertLoadCollector
from .dispatcher import DynamicDispatcher


def _experts(rows: torch.Tensor, slots: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """``rows [M, H]`` through the expert of local slot ``slots [M]`` -> ``[M, H]``.

    One small matmul per row: a row's result does not depend on which other rows share the
    batch, so outputs are bit-identical whichever rank or replica computes them."""
    hidden = torch.relu(torch.bmm(rows.unsqueeze(1), w1[slots]))
    return torch.bmm(hidden, w2[slots]).squeeze(1)


class ToyMoEBlock(nn.Module):
    """One MoE layer; ``expert_load_collector`` and ``dispatcher`` are the runtime's hooks.

    Expert weights are drawn from ``seed`` for all ``E`` experts and sliced, so every rank
    (and a run without EPLB) has the same model. ``skew`` biases the router towards the
    first experts (logit bias ``-skew * log(1 + e)``). ``check_each_step=False``: the
    model checks the dispatcher for it (:class:`ToyMoE` does, for all blocks at once).
    """

    def __init__(self, hidden: int, ffn: int, num_experts: int, top_k: int, rank: int, ep_size: int,
                 *, seed: int, skew: float = 0.0, lb_interval: int = 1, group: dist.ProcessGroup | None = None,
                 check_each_step: bool = True) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.gate = torch.randn(hidden, num_experts, generator=gen) / hidden**0.5
        self.bias = -skew * torch.log1p(torch.arange(num_experts, dtype=torch.float32))
        w1 = torch.randn(num_experts, hidden, ffn, generator=gen) / hidden**0.5
        w2 = torch.randn(num_experts, ffn, hidden, generator=gen) / ffn**0.5
        local = num_experts // ep_size
        self.w1 = w1[rank * local:(rank + 1) * local].clone()
        self.w2 = w2[rank * local:(rank + 1) * local].clone()
        self.top_k, self.rank, self.ep_size, self.group = top_k, rank, ep_size, group
        self.check_each_step = check_each_step
        self.expert_load_collector = ExpertLoadCollector(num_experts, lb_interval)
        self.dispatcher = DynamicDispatcher(num_experts, self.w1, self.w2, rank, ep_size, group=group)
        self.last_rows = 0  # token-expert rows this rank computed in the last forward

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``x [N, H]`` -> top-k weights ``[N, k]`` (renormalised) and expert ids ``[N, k]``."""
        probs = torch.softmax(x @ self.gate + self.bias, dim=-1)
        weights, ids = probs.topk(self.top_k, dim=-1)
        return weights / weights.sum(dim=-1, keepdim=True), ids

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights, ids = self.route(x)
        self.expert_load_collector.collect_expert_load(ids)
        if self.check_each_step:
            self.dispatcher.check_consistency()
        if self.dispatcher.update_flag:
            update = self.dispatcher.update_module_weight_and_map()
            self.w1, self.w2 = update.weight1, update.weight2
        if self.dispatcher.mode == "AG":
            return x + self._all_gather_forward(x, weights, ids)
        return x + self._all_to_all_forward(x, weights, ids)

    def _all_to_all_forward(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        n, k = ids.shape
        slots_per_rank = self.dispatcher.local_expert_num
        phys = self.dispatcher.to_physical(ids).reshape(-1)  # [N * k]
        order = torch.argsort(phys // slots_per_rank, stable=True)
        send_counts = torch.bincount(phys // slots_per_rank, minlength=self.ep_size)
        recv_counts = torch.empty_like(send_counts)
        dist.all_to_all_single(recv_counts, send_counts, group=self.group)
        send_split, recv_split = send_counts.tolist(), recv_counts.tolist()
        rows = x[order // k]
        got_rows = x.new_empty(sum(recv_split), x.shape[1])
        dist.all_to_all_single(got_rows, rows, recv_split, send_split, group=self.group)
        got_slots = phys.new_empty(sum(recv_split))
        dist.all_to_all_single(got_slots, phys[order] % slots_per_rank, recv_split, send_split, group=self.group)
        self.last_rows = got_rows.shape[0]
        done = _experts(got_rows, got_slots, self.w1, self.w2)
        back = torch.empty_like(rows)
        dist.all_to_all_single(back, done, send_split, recv_split, group=self.group)
        out = torch.empty_like(back)
        out[order] = back
        return (out.view(n, k, -1) * weights.unsqueeze(-1)).sum(dim=1)

    def _all_gather_forward(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        xs = [torch.empty_like(x) for _ in range(self.ep_size)]
        dist.all_gather(xs, x, group=self.group)
        every = torch.cat(xs)  # [R * N, H]; the router is replicated, so routing is the same on every rank
        w, i = self.route(every)
        combine = torch.zeros(every.shape[0], self.dispatcher.expert_num).scatter_(1, i, w)  # [R * N, E]
        per_slot = combine @ self.dispatcher.get_expert_trans_tensor()  # [R * N, S]
        slots_per_rank = self.dispatcher.local_expert_num
        local = per_slot[:, self.rank * slots_per_rank:(self.rank + 1) * slots_per_rank]  # [R * N, K]
        token, slot = torch.nonzero(local, as_tuple=True)
        self.last_rows = token.shape[0]
        partial = torch.zeros_like(every).index_add_(
            0, token, _experts(every[token], slot, self.w1, self.w2) * local[token, slot].unsqueeze(1)
        )
        dist.all_reduce(partial, group=self.group)
        return partial[self.rank * n:(self.rank + 1) * n]


class ToyMoE(nn.Module):
    """``num_layers`` :class:`ToyMoEBlock` in a row (each with a residual)."""

    def __init__(self, num_layers: int, hidden: int, ffn: int, num_experts: int, top_k: int, rank: int,
                 ep_size: int, *, seed: int = 0, skew: float = 0.0, lb_interval: int = 1,
                 group: dist.ProcessGroup | None = None) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            ToyMoEBlock(hidden, ffn, num_experts, top_k, rank, ep_size, seed=seed + l, skew=skew,
                        lb_interval=lb_interval, group=group, check_each_step=False)
            for l in range(num_layers)
        )
        self.dispatchers = [block.dispatcher for block in self.blocks]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # One all-gather for every block's table and staged update, not one per block.
        DynamicDispatcher.check_consistency_all(self.dispatchers)
        for block in self.blocks:
            x = block(x)
        return x
