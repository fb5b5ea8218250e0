"""Synthetic drifting routing traces for the policy benchmark.

Per layer, expert popularity is Zipf(``s``) over a random permutation of the experts. It
drifts between windows by a log-normal random walk (``drift``: std of the log step per
window) and, inside a window, every step's popularity is the window's times an independent
log-normal factor per expert (``jitter``: batch composition changes from step to step).
Each step routes ``tokens_per_step * top_k`` token-expert pairs, drawn multinomially.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["Shape", "SHAPES", "SKEWS", "drifting_trace"]


@dataclass(frozen=True)
class Shape:
    """An expert-parallel deployment: ``E`` experts on ``R`` ranks with ``K`` slots each."""

    name: str
    experts: int
    ranks: int
    slots_per_rank: int
    top_k: int

    @property
    def slots(self) -> int:
        return self.ranks * self.slots_per_rank


SHAPES = {s.name: s for s in (
    Shape("small-16e-ep4", 16, 4, 5, 2),
    Shape("qwen3-235b-ep16", 128, 16, 9, 8),
    Shape("deepseek-v3-ep32", 256, 32, 9, 8),
    Shape("deepseek-v3-ep64", 256, 64, 5, 8),
    Shape("deepseek-v3-ep144", 256, 144, 2, 8),
    Shape("kimi-k2-ep64", 384, 64, 7, 8),
)}

SKEWS = {"mild": 0.4, "moderate": 0.7, "heavy": 1.0}
"""Zipf exponents. With 256 experts the hottest expert carries about 6x, 17x and 42x the
mean expert load respectively (a layer's own mix varies by permutation and drift)."""


def drifting_trace(num_experts: int, num_layers: int, windows: int, steps: int, tokens_per_step: int,
                   top_k: int, zipf_s: float, drift: float = 0.15, jitter: float = 0.1,
                   seed: int = 0) -> np.ndarray:
    """Token-expert pairs routed per expert per step: ``[W, T, L, E]`` (float64 counts).

    ``W = windows``, ``T = steps`` per window, ``L = num_layers``, ``E = num_experts``.
    """
    rng = np.random.default_rng(seed)
    ranks = np.stack([rng.permutation(num_experts) for _ in range(num_layers)]) + 1  # [L, E]
    log_pop = -zipf_s * np.log(ranks)
    out = np.empty((windows, steps, num_layers, num_experts))
    for w in range(windows):
        if w:
            log_pop = log_pop + rng.normal(0.0, drift, log_pop.shape)
        step_log = log_pop[None] + rng.normal(0.0, jitter, (steps, *log_pop.shape))  # [T, L, E]
        p = np.exp(step_log - step_log.max(axis=-1, keepdims=True))
        p /= p.sum(axis=-1, keepdims=True)
        out[w] = rng.multinomial(tokens_per_step * top_k, p)
    return out
