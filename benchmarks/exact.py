"""The best possible table of one layer, by exhaustive search: an exact reference for the
policy benchmark's fit ratio where the lower bound is loose and the problem is small
(Mixtral-like: 8 experts on 4 ranks x 3 slots), and for tests that check policies against
the optimum.

A table is a choice of ``K`` distinct experts per rank; every expert must be held at
least once, and each expert's load splits evenly over its replicas. The search scores
every multiset of ``R`` rank contents at once, in chunks.
"""

from __future__ import annotations

import functools
import itertools
import math

import numpy as np

__all__ = ["EXACT_LIMIT", "exact_tables", "rank_contents", "table_peaks", "best_peak"]

EXACT_LIMIT = 1_000_000
"""Largest number of tables :func:`best_peak` scores (Mixtral EP4 x 3: 455,126)."""


def exact_tables(num_experts: int, num_ranks: int, slots_per_rank: int) -> int:
    """How many tables exhaustive search scores: multisets of ``R`` rank contents, each
    one of the ``C(E, K)`` sets of distinct experts."""
    sets = math.comb(num_experts, slots_per_rank)
    return math.comb(sets + num_ranks - 1, num_ranks)


@functools.lru_cache(maxsize=4)
def rank_contents(num_experts: int, num_ranks: int, slots_per_rank: int) -> tuple[np.ndarray, np.ndarray]:
    """Every table, up to the order of its ranks: ``member [S, E]`` (0/1: which experts
    each of the ``S = C(E, K)`` possible rank contents holds) and ``choices [N, R]`` (the
    rank contents of each table, a multiset: ascending)."""
    if exact_tables(num_experts, num_ranks, slots_per_rank) > EXACT_LIMIT:
        raise ValueError(f"{exact_tables(num_experts, num_ranks, slots_per_rank)} tables for E={num_experts}, "
                         f"R={num_ranks}, K={slots_per_rank}: more than EXACT_LIMIT={EXACT_LIMIT}")
    sets = np.array(list(itertools.combinations(range(num_experts), slots_per_rank)))
    member = np.zeros((len(sets), num_experts))
    member[np.arange(len(sets))[:, None], sets] = 1
    choices = np.array(list(itertools.combinations_with_replacement(range(len(sets)), num_ranks)))
    return member, choices


def table_peaks(weight: np.ndarray, num_ranks: int, slots_per_rank: int) -> np.ndarray:
    """Max rank load ``[N]`` of every table of :func:`rank_contents` for one layer's
    ``weight [E]`` (each expert's load split evenly over its replicas); ``inf`` where a
    table leaves an expert out."""
    member, choices = rank_contents(len(weight), num_ranks, slots_per_rank)
    peaks = np.empty(len(choices))
    for chunk in np.array_split(np.arange(len(choices)), max(1, len(choices) // 50_000)):
        held = member[choices[chunk]]  # [n, R, E]
        counts = held.sum(axis=1)  # [n, E]
        per_replica = weight / np.maximum(counts, 1)
        peak = (held * per_replica[:, None, :]).sum(axis=-1).max(axis=1)
        peaks[chunk] = np.where((counts > 0).all(axis=1), peak, np.inf)
    return peaks


def best_peak(weight: np.ndarray, num_ranks: int, slots_per_rank: int) -> float:
    """Smallest max rank load over every valid table of one layer, ``weight [E]``."""
    return float(table_peaks(weight, num_ranks, slots_per_rank).min())
