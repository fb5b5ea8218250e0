"""An out-of-tree EPLB policy: the template for writing your own.

Install it (``pip install ./policies/eplb-example-policy``) and select it with
``{"eplb": {"policy": "example-lpt"}}``; check it with ``vllm-eplb conformance example-lpt``.
"""

from __future__ import annotations

import numpy as np

from vllm_eplb_plugin import PlacementPolicy
from vllm_eplb_plugin.moves import preserve_slots, separate_duplicates
from vllm_eplb_plugin.policies.deepseek import replicate

__all__ = ["LptPolicy"]


class LptPolicy(PlacementPolicy):
    """Longest-processing-time packing over all ranks at once, one layer at a time."""

    name = "example-lpt"

    def place(self, table: np.ndarray, heat: np.ndarray, expert_load: np.ndarray) -> np.ndarray:
        L, R, K = table.shape
        phy2log, count = replicate(expert_load, R * K, cap=R)  # [L, S], [L, E]
        target = np.empty_like(table)
        for l in range(L):
            replica_load = expert_load[l, phy2log[l]] / count[l, phy2log[l]]
            rank_load = np.zeros(R)
            filled = np.zeros(R, dtype=np.int64)
            holds = np.zeros((R, expert_load.shape[1]), dtype=bool)
            for p in np.argsort(-replica_load, kind="stable"):
                e = phy2log[l, p]
                # Lightest rank with a free slot, preferring ranks that do not hold e yet.
                free = np.where(filled < K, rank_load, np.inf)
                fresh = np.where(holds[:, e], np.inf, free)
                r = int((fresh if np.isfinite(fresh).any() else free).argmin())
                target[l, r, filled[r]] = e
                holds[r, e] = True
                rank_load[r] += replica_load[p]
                filled[r] += 1
        return preserve_slots(table, separate_duplicates(target, expert_load))
