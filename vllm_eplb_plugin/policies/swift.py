"""Migration-aware placement (the SwiftBalancer idea): repair the current table with as
few slot changes as possible, and fall back to a fresh placement only where repair
cannot get close to it.

Repair: replica counts move to the min-max counts, each changed replica costing one slot
(``recount``); then swaps between the costliest rank and any other, each taken only if it
lowers that rank's load by more than ``min_gain`` of the mean rank load, until the peak is
within ``target`` of the lower bound (each swap moves two slots, so stopping there rather
than at the last gain saves moves: 0.20 -> 0.17 of the slots per update on the
benchmark's large-K shapes, at fit >= 0.99). Of the swaps that bring both ranks within
``target``, a hot rank takes one that touches the fewest slots still holding what they held
before the update (giving away a replica placed earlier in this update changes one slot, not
two): 0.13-0.17 -> 0.11-0.15 on those shapes. That choice runs where the repair starts
under ``NEAR`` lower bounds (a speed knob: the steady updates of the benchmark start at
1.06-1.37; a first call from vLLM's linear table on heavy heat starts at 1.7-2.8 and
changes most slots anyway). While a layer's peak is above ``COARSE``
lower bounds, a quarter of its ranks swap per step before that search (a speed knob:
from vLLM's linear table, V3 EP32 with the physical extreme heat, 27 -> 23 ms per call).
The fresh placement is the ``optimal`` policy's greedy start and swap search, with ranks
renumbered to keep experts in place and replicas of nearly equal load traded back to the
ranks that held them (``search.trade_back``: on EP144 x 2 23-39 % fewer moves);
where every replica-count vector can be tried (few experts), it is the table that moves
least among those within ``target`` of the lowest peak over the most promising count
vectors (``search.every_count_table``).
A layer whose repair stays more than ``slack`` above the lower bound is first repaired again
with every rank as a partner, kept where that reaches ``target`` (on Kimi extreme heat one
layer in 40 updates is stuck this way; the second search brings it within target for 2-15
more slots than the stuck repair, where the fresh placement changed 433-436 of Kimi's 448
slots before its trade back, 342 after, and 292 of V3 EP64's 320). Elsewhere,
per layer, repair wins unless its peak is more than ``slack`` above the fresh one; this is
what lets the policy converge from any start (a linear start needs the fresh placement
once, every later update is a repair). The fresh placement is only computed for layers
whose repaired peak is more than ``slack`` above the lower bound, so a steady-state call
costs about one repair.
"""

from __future__ import annotations

import numpy as np

from ..policy import Option, PlacementPolicy
from .search import every_count_table, fresh_table, rank_cost, recount, refine, replica_counts

__all__ = ["SwiftPolicy"]


class SwiftPolicy(PlacementPolicy):
    """Few moves per update, peak within ``slack`` of a fresh placement."""

    name = "swift"
    PARTNERS = 8  # swap partners tried per step: the 8 least loaded ranks (speed; see search.refine)
    HOT_RANKS = 2  # ranks relieved per swap step (speed; see search.refine)
    COARSE = 1.1  # coarse swap steps while the peak is above this many lower bounds (speed; see search.refine)
    NEAR = 1.5  # swaps keep old slots where the repair starts under this many lower bounds (speed; see search.refine)
    OPTIONS = {
        "target": Option(0.008, "Repair stops swapping once the peak rank load is within this fraction above the "
                                "lower bound.", 0.0, 10.0),
        "min_gain": Option(0.001, "A swap must lower the hottest rank's load by more than this fraction of the "
                                  "mean rank load.", 0.0, 1.0),
        "slack": Option(0.01, "Repair is kept while its peak is within this fraction of a fresh placement's.",
                        0.0, 10.0),
    }

    def place(self, table: np.ndarray, heat: np.ndarray, expert_load: np.ndarray) -> np.ndarray:
        L, R, K = table.shape
        slack = 1 + self.options["slack"]
        counts = replica_counts(expert_load, R, R * K)
        mean_rank = expert_load.sum(axis=1) / R
        bound = np.maximum(mean_rank, (expert_load / counts).max(axis=1))  # search.lower_bound, counts reused
        min_gain, good = self.options["min_gain"] * mean_rank, (1 + self.options["target"]) * bound  # [L]
        target = refine(recount(table, counts, expert_load), expert_load, partners=self.PARTNERS, min_gain=min_gain,
                        good_enough=good, hot_ranks=self.HOT_RANKS, coarse=self.COARSE * bound, old=table,
                        near=self.NEAR * bound)
        peak = rank_cost(target, expert_load).max(axis=1)
        far = np.flatnonzero(peak > slack * bound)
        if far.size:
            # A repair stuck above ``slack`` mostly lacks a partner among the coolest few:
            # with every rank as a partner it often reaches ``target`` for a few more slots,
            # where a fresh placement would change most of them.
            deep = refine(target[far], expert_load[far], min_gain=min_gain[far], good_enough=good[far], old=table[far])
            done = rank_cost(deep, expert_load[far]).max(axis=1) <= good[far]
            target[far[done]] = deep[done]
            far = far[~done]
        if far.size:
            # Where every replica-count vector can be tried (few experts), the fresh
            # placement tries them (min-max counts pack badly there) and, of the tables
            # within ``target`` of the lowest peak, takes the one that moves least.
            fresh = every_count_table(expert_load[far], R, K, old=table[far], tolerance=self.options["target"])
            if fresh is None:
                fresh = fresh_table(table[far], expert_load[far])
            use = peak[far] > slack * rank_cost(fresh, expert_load[far]).max(axis=1)
            target[far[use]] = fresh[use]
        return target
