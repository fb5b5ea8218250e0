"""Synthetic drifting routing traces for the policy benchmark, physically possible ones.

Each token picks ``top_k`` *distinct* experts, so an expert receives at most one
assignment per token: its load is at most ``E / top_k`` times the mean expert load.
Routing is drawn from inclusion probabilities ``pi [L, E]`` (the chance a token picks
expert ``e``; ``sum_e pi_e = top_k``, every ``pi_e <= 1``), obtained from a Zipf
popularity ``p`` by water-filling: ``pi = min(1, lam * p)``. A step's count for an expert
is ``Binomial(tokens, pi_e)``: the marginal of any top-k routing with those inclusion
probabilities (counts of different experts are drawn independently, so a step's total is
``tokens * top_k`` only on average).

Skew is named by what it does to the hottest expert: ``hottest`` = its load over the mean
expert load at the start, a fraction of the way from uniform (1) to the physical cap
(``E / top_k``). The Zipf exponent that gives it is solved per shape.

Popularity is a Zipf law over a random permutation of the experts per layer; it drifts
between windows by a log-normal random walk (``drift``: std of the log step per window)
and, inside a window, every step's popularity is the window's times an independent
log-normal factor per expert (``jitter``: batch composition changes from step to step).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["Shape", "SHAPES", "SKEWS", "hottest_ratio", "zipf_exponent", "inclusion", "drifting_trace"]


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
    Shape("mixtral-8e-ep4x3", 8, 4, 3, 2),
    Shape("small-16e-ep4", 16, 4, 5, 2),
    Shape("qwen3-235b-ep16", 128, 16, 9, 8),
    Shape("deepseek-v3-ep32", 256, 32, 9, 8),
    Shape("deepseek-v3-ep64", 256, 64, 5, 8),
    Shape("deepseek-v3-ep96x3", 256, 96, 3, 8),
    Shape("deepseek-v3-ep144", 256, 144, 2, 8),
    Shape("kimi-k2-ep64", 384, 64, 7, 8),
)}

SKEWS = {"mild": 0.1, "moderate": 0.25, "heavy": 0.5, "extreme": 0.97}
"""Where the hottest expert's start load sits between uniform (0) and the top-k cap (1):
with DeepSeek-V3's 256 experts and top-8 (cap 32x the mean) that is about 4x, 9x, 16x
and 31x; with 8 experts and top-2 (cap 4x) 1.3x, 1.8x, 2.5x and 3.9x."""


def hottest_ratio(num_experts: int, top_k: int, skew: float) -> float:
    """Hottest expert's load over the mean expert load for ``skew`` in ``[0, 1]``."""
    return 1 + skew * (num_experts / top_k - 1)


def inclusion(popularity: np.ndarray, top_k: int) -> np.ndarray:
    """Inclusion probabilities ``[..., E]`` of top-k routing from popularity ``[..., E]``:
    ``min(1, lam * p)`` with ``lam`` per row such that each row sums to ``top_k``.
    The capped set only grows from one pass to the next, so ``top_k + 1`` passes settle it."""
    p = popularity / popularity.sum(axis=-1, keepdims=True)
    capped = np.zeros(p.shape, dtype=bool)
    for _ in range(top_k + 1):
        free = np.where(capped, 0.0, p).sum(axis=-1, keepdims=True)
        lam = (top_k - capped.sum(axis=-1, keepdims=True)) / free
        capped = capped | (lam * p >= 1)
    return np.where(capped, 1.0, lam * p)


def _zipf(num_experts: int, s: float) -> np.ndarray:
    return np.arange(1, num_experts + 1, dtype=np.float64) ** -s


def zipf_exponent(num_experts: int, top_k: int, skew: float) -> float:
    """The Zipf exponent whose hottest expert carries ``hottest_ratio(E, top_k, skew)``
    times the mean load (bisection: the ratio grows with the exponent)."""
    target = hottest_ratio(num_experts, top_k, skew)
    lo, hi = 0.0, 20.0
    for _ in range(60):
        mid = (lo + hi) / 2
        ratio = inclusion(_zipf(num_experts, mid), top_k)[0] * num_experts / top_k
        lo, hi = (mid, hi) if ratio < target else (lo, mid)
    return (lo + hi) / 2


def drifting_trace(num_experts: int, num_layers: int, windows: int, steps: int, tokens_per_step: int,
                   top_k: int, skew: float, drift: float = 0.15, jitter: float = 0.1,
                   seed: int = 0) -> np.ndarray:
    """Token-expert assignments routed per expert per step: ``[W, T, L, E]`` (float64).

    ``W = windows``, ``T = steps`` per window, ``L = num_layers``, ``E = num_experts``;
    ``skew`` in ``[0, 1]`` (see ``SKEWS``). No count exceeds ``tokens_per_step``.
    """
    rng = np.random.default_rng(seed)
    s = zipf_exponent(num_experts, top_k, skew)
    ranks = np.stack([rng.permutation(num_experts) for _ in range(num_layers)]) + 1  # [L, E]
    log_pop = -s * np.log(ranks)
    out = np.empty((windows, steps, num_layers, num_experts))
    for w in range(windows):
        if w:
            log_pop = log_pop + rng.normal(0.0, drift, log_pop.shape)
        step_log = log_pop[None] + rng.normal(0.0, jitter, (steps, *log_pop.shape))  # [T, L, E]
        pi = inclusion(np.exp(step_log - step_log.max(axis=-1, keepdims=True)), top_k)
        out[w] = rng.binomial(tokens_per_step, pi)
    return out
