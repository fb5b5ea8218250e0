"""Variance-aware placement (the FlashLB idea): plan on the per-step series so the next
window's per-step peaks stay low, not only its sum.

A step waits for its slowest rank, so what matters is the expected per-step maximum. From
the per-step load ``[T, L, E]`` each expert gets a per-step mean and variance; a rank's cost
is ``mean + z * std`` of its per-step load (variances of the replicas it holds add up,
treating experts as independent), and the ``optimal`` machinery minimises the largest
cost: replica counts and greedy packing on ``mean + z * std``, then the swap search on the
cost, then replicas of nearly equal load traded back to the ranks that held them where no
rank's cost rises past what ``search.trade_back`` allows (EP144 x 2: 23-44 % fewer moves).
With a single window (``T = 1``) it is the ``optimal`` policy.
"""

from __future__ import annotations

import numpy as np

from ..policy import Option, PlacementPolicy
from .search import fresh_table, rank_cost

__all__ = ["FlashLBPolicy"]


class FlashLBPolicy(PlacementPolicy):
    """Lowest ``mean + z * std`` of the per-step rank load."""

    name = "flashlb"
    OPTIONS = {"z": Option(1.0, "Weight of the per-step standard deviation in a rank's cost.", 0.0, 10.0)}

    def place(self, table: np.ndarray, heat: np.ndarray, expert_load: np.ndarray) -> np.ndarray:
        return fresh_table(table, heat.mean(axis=0), heat.var(axis=0), self.options["z"])

    def layer_cost(self, table: np.ndarray, heat: np.ndarray, expert_load: np.ndarray) -> np.ndarray:
        return rank_cost(table, heat.mean(axis=0), heat.var(axis=0), self.options["z"]).max(axis=1)
