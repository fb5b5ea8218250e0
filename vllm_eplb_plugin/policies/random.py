"""A random valid placement, for tests (vLLM Ascend's ``eplb_policy_type`` 0).

Each layer gets a random relabelling of its logical experts and a random order of its
ranks: a bijection on ids and ranks keeps every invariant, so the result is valid and
usually moves most slots. Seeded, so one input always gives one output.
"""

from __future__ import annotations

import numpy as np

from ..policy import Option, PlacementPolicy

__all__ = ["RandomPolicy"]


class RandomPolicy(PlacementPolicy):
    """Shuffle expert ids and ranks per layer; ignores the load."""

    name = "random"
    keep_unimproved = False  # it exists to move weights (tests, vLLM Ascend's type 0)
    hierarchical = False  # ignores the load and the topology: any valid table will do
    OPTIONS = {"seed": Option(0, "Seed of the shuffle; the same seed gives the same table.", 0, 2**32 - 1)}

    def place(self, table: np.ndarray, heat: np.ndarray, expert_load: np.ndarray) -> np.ndarray:
        L, R, _ = table.shape
        E = expert_load.shape[1]
        rng = np.random.default_rng(self.options["seed"])
        relabel = rng.permuted(np.broadcast_to(np.arange(E), (L, E)), axis=1)  # [L, E]
        rank_order = rng.permuted(np.broadcast_to(np.arange(R), (L, R)), axis=1)  # [L, R]
        shuffled = np.take_along_axis(relabel, table.reshape(L, -1), axis=1).reshape(table.shape)
        return np.take_along_axis(shuffled, rank_order[:, :, None], axis=1)
