"""Balance metrics of a placement under a load.

``table [L, R, K]``, ``expert_load [L, E]``; every metric is per layer ``[L]``. A layer
with no load counts as perfectly balanced.
"""

from __future__ import annotations

import numpy as np

from .placement import rank_load

__all__ = ["imbalance", "balancedness"]


def imbalance(table: np.ndarray, expert_load: np.ndarray) -> np.ndarray:
    """Max rank load / mean rank load ``[L]`` (1.0 is perfect; what every step waits for)."""
    loads = rank_load(table, expert_load)
    mean = loads.mean(axis=1)
    return np.divide(loads.max(axis=1), mean, out=np.ones_like(mean), where=mean > 0)


def balancedness(table: np.ndarray, expert_load: np.ndarray) -> np.ndarray:
    """Mean rank load / max rank load ``[L]`` in (0, 1], the figure vLLM logs."""
    return 1.0 / imbalance(table, expert_load)
