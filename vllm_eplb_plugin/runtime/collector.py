"""``ExpertLoadCollector``: per-layer routing counts for a plain PyTorch MoE block.

Counting and windows are :class:`~vllm_eplb_plugin.heat.HeatCounter`'s, the same code the
vLLM integration uses. ``E`` logical experts; every ``lb_interval`` calls the collector
closes a round and hands the round's load ``[E]`` to its sink (the transfer pool sends it
to the scheduler).
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from ..heat import HeatCounter

LoadSink = Callable[[int, np.ndarray], None]  # (round, load [E])


class ExpertLoadCollector:
    """Counts the experts a block routes tokens to, one call per forward step.

    Args:
        expert_num: ``E``, logical experts of the block.
        lb_interval: calls per round; each round's load goes to the sink.
        window: ``"sum"`` (the round's counts) or ``"ema"`` (average over rounds,
            the newest weighted ``1 - ema_decay``).
        device: where the counts live (the routing output's device).
    """

    def __init__(
        self,
        expert_num: int,
        lb_interval: int = 1,
        *,
        window: str = "sum",
        ema_decay: float = 0.5,
        device: torch.device | str = "cpu",
    ) -> None:
        if not isinstance(expert_num, int) or expert_num < 1:
            raise ValueError(f"ExpertLoadCollector: expert_num={expert_num!r} must be a positive int.")
        if not isinstance(lb_interval, int) or lb_interval < 1:
            raise ValueError(
                f"ExpertLoadCollector: lb_interval={lb_interval!r} must be a positive int (calls per round)."
            )
        if window not in ("sum", "ema"):
            raise ValueError(f"ExpertLoadCollector: window={window!r} must be 'sum' or 'ema'.")
        self.expert_num, self.lb_interval = expert_num, lb_interval
        # One layer, one choice per row: the collector sees routing outputs flattened.
        # Plain PyTorch modules run eagerly: the counter may arm steps with a Python flag.
        self.counter = HeatCounter(
            1, expert_num, max_rows=1, top_k=1, window=window, ema_decay=ema_decay, traced=False, device=device
        )
        self.rounds = 0
        self.sink: LoadSink | None = None

    def collect_expert_load(self, indices: torch.Tensor) -> None:
        """Count one step's routing: ``indices`` holds logical expert ids, any shape
        (``[N, top_k]`` top-k ids, or the ``[N * top_k]`` expanded ids of a grouped MoE)."""
        ids = indices.reshape(-1, 1)
        self.counter.reserve(ids.shape[0])
        self.counter.begin_step(ids.shape[0])
        self.counter.count(0, ids)
        self.counter.end_step()
        if self.counter.steps_in_interval >= self.lb_interval:
            load = self.counter.close_interval()[0]
            if self.sink is not None:
                self.sink(self.rounds, load)
            self.rounds += 1

    def total_load(self) -> np.ndarray:
        """Assignments counted since start, ``[E]``."""
        return self.counter.total_counts()[0]
