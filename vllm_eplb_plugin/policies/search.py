"""Building blocks of the optimal, swift and flashlb policies: the lower bound, a swap
local search on rank costs, a replica recount that moves few slots, and rank alignment.

Shapes: ``table [L, R, K]`` (``S = R * K`` slots), per-expert ``mean [L, E]`` and
``var [L, E]``. Load splits evenly over an expert's replicas, so a replica of an expert
with ``c`` replicas carries ``mean / c`` and ``var / c**2``. A rank's cost is
``mean + z * sqrt(var)`` of what it carries (``z = 0``: the plain load).
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Callable
from typing import NamedTuple

import numpy as np

from ..moves import separate_duplicates
from ..placement import logcnt, rank_load
from .deepseek import deepseek_phy2log, pack, replicate

__all__ = ["replica_counts", "lower_bound", "rank_cost", "refine", "move_replicas", "swap_pairs", "pairing_counts",
           "pairing_search", "pair_table", "recount", "align_ranks", "count_space", "count_vectors",
           "table_for_counts", "every_count_table", "fresh_table", "trade_back"]


ROUNDING = 1e-12
"""Relative change below which the searches here treat a peak as unchanged (float rounding:
without it a search with no gain floor can undo and redo one move until its step limit)."""


def replica_counts(weight: np.ndarray, num_ranks: int, num_slots: int) -> np.ndarray:
    """Replica counts ``[L, E]`` minimising the largest per-replica weight (one replica
    per expert first, then each extra one to the expert with the largest weight per
    replica; at most one replica per rank). Greedy is exact for this objective."""
    return replicate(weight, num_slots, cap=num_ranks)[1]


def lower_bound(expert_load: np.ndarray, num_ranks: int, num_slots: int) -> np.ndarray:
    """No placement's max rank load is below ``max(total / R, min over replica counts of
    max_e load_e / count_e)``. ``expert_load [L, E]`` -> ``[L]``."""
    counts = replica_counts(expert_load, num_ranks, num_slots)
    return np.maximum(expert_load.sum(axis=1) / num_ranks, (expert_load / counts).max(axis=1))


def _items(table: np.ndarray, mean: np.ndarray, var: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-slot mean and variance ``[L, R, K]`` of ``table`` (even split over replicas)."""
    L = table.shape[0]
    cnt = np.maximum(logcnt(table, mean.shape[1]), 1)
    flat = table.reshape(L, -1)
    item_m = np.take_along_axis(mean / cnt, flat, axis=1).reshape(table.shape)
    item_v = np.take_along_axis(var / cnt**2, flat, axis=1).reshape(table.shape)
    return item_m, item_v


def rank_cost(table: np.ndarray, mean: np.ndarray, var: np.ndarray | None = None, z: float = 0.0) -> np.ndarray:
    """Cost of every rank ``[L, R]``: ``mean + z * sqrt(var)`` of the load it carries."""
    if var is None or z == 0:
        return rank_load(table, mean)
    item_m, item_v = _items(table, mean, var)
    return item_m.sum(axis=-1) + z * np.sqrt(item_v.sum(axis=-1))


def refine(table: np.ndarray, mean: np.ndarray, var: np.ndarray | None = None, z: float = 0.0,
           min_gain: np.ndarray | float = 0.0, max_steps: int | None = None,
           partners: int | None = None, good_enough: np.ndarray | float = 0.0, hot_ranks: int = 1,
           coarse: np.ndarray | float | None = None, old: np.ndarray | None = None,
           near: np.ndarray | float = np.inf) -> np.ndarray:
    """Swap local search: while it helps, swap one replica of the costliest rank with one
    replica of another rank, choosing the swap that leaves the pair's larger cost lowest
    (only the ``partners`` least costly ranks are tried when given: faster, a little less
    thorough).

    With ``hot_ranks = H > 1``, one step also swaps for the next ``H - 1`` costliest
    ranks: each, costliest first, takes its best swap with a partner no costlier rank took
    in that step (``partners + H - 1`` candidates, so each still has ``partners`` to
    choose from). Pairs are disjoint, so this is the one-at-a-time search in fewer steps
    (a step's time is mostly numpy call overhead, not arithmetic).

    With ``coarse`` (``[L]`` or scalar), a layer whose peak is above it first takes coarse
    steps (:func:`_coarse_steps`): a quarter of its ranks swap at once, each with one
    partner. From vLLM's linear table this takes ~25 % off the search's time; a table
    whose peak is at or below ``coarse`` takes none. ``max_steps`` bounds each phase.

    A swap is taken only if it lowers the costliest rank's cost by more than ``min_gain``
    (``[L]`` or scalar, absolute), and a layer stops once its peak is ``<= good_enough``
    (``[L]`` or scalar), so a caller that pays for moves can skip marginal ones.

    With ``old [L, R, K]`` (the table before this update; plain loads only), a hot rank
    instead takes, of its swaps that leave both ranks at or under ``good_enough``, one
    that touches the fewest slots still holding what ``old`` held there, then the lowest
    pair peak (no such swap: the lowest peak, as without ``old``). A swap that gives
    away a replica placed earlier in this update changes one more slot, not two. This
    applies in the layers whose peak starts at or under ``near`` (``[L]`` or scalar): a
    layer far above it is rebuilt and most of its slots change anyway, so there the
    extra arithmetic (about one more scoring pass per step) would only cost time.

    Replica counts never change; the result is valid if ``table`` is. All layers advance
    together. (Moves that change replica counts were tried too: on the benchmark shapes
    they never lowered a converged peak and cost 3-5x time.)

    ``table [L, R, K]``, ``mean, var [L, E]`` -> ``[L, R, K]``.
    """
    t = table.copy()
    L, R, K = t.shape
    E = mean.shape[1]
    item_m, item_v = _items(t, mean, np.zeros_like(mean) if var is None else var)
    rank_m, rank_v = item_m.sum(axis=-1), item_v.sum(axis=-1)
    holds = np.zeros((L, R, E), dtype=bool)
    holds[np.arange(L)[:, None, None], np.arange(R)[None, :, None], t] = True
    # Flat views: one integer index per gather is the cheapest fancy indexing numpy has,
    # and a step is mostly gathers on small arrays.
    book = _Book(t.reshape(L * R, K), item_m.reshape(L * R, K), rank_m.ravel(), holds.reshape(-1), E,
                 item_v.reshape(L * R, K) if z else None, rank_v.ravel() if z else None)
    gain_floor = np.broadcast_to(np.asarray(min_gain, dtype=np.float64), (L,))
    stop_at = np.broadcast_to(np.asarray(good_enough, dtype=np.float64), (L,))
    J = R - 1 if partners is None else min(partners, R - 1)
    H = max(1, min(hot_ranks, (R - J + 1) // 2))  # H hot ranks and J + H - 1 partners, all distinct
    J += H - 1
    # One grid buffer for every step: a fresh array of its size pays its page faults each time.
    work = np.empty(J * K * K * L * H) if z == 0 else None
    scores = functools.partial(_swap_scores, work=work) if z == 0 else functools.partial(_swap_scores_risk, z=z)
    far = None if coarse is None else np.broadcast_to(np.asarray(coarse, dtype=np.float64), (L,))
    # The layers whose swaps count the slots kept from ``old``, and what each slot held
    # before this update (-1, which no slot holds, in the other layers).
    keep = np.zeros(L, dtype=bool)
    before = np.full((L * R, K), -1)
    if old is not None and z == 0:
        keep = rank_m.max(axis=1) <= near
        before = np.where(keep[:, None, None], old, -1).reshape(L * R, K)

    def cost_of(rows: np.ndarray) -> np.ndarray:  # [n] -> [n, R]
        return rank_m[rows] if z == 0 else rank_m[rows] + z * np.sqrt(np.maximum(rank_v[rows], 0))

    steps = max_steps if max_steps is not None else 4 * R * K
    if far is not None and R > 1:
        _coarse_steps(book, cost_of, scores, far, gain_floor, steps)
    active = np.arange(L) if R > 1 else np.arange(0)
    for _ in range(steps):
        cost = cost_of(active)  # [n, R]
        above = cost.max(axis=1) > stop_at[active]  # layers already good enough are done
        a, cost = active[above], cost[above]
        if not a.size:
            break
        n = len(a)
        if H == 1:
            i = cost.argmax(axis=1)[:, None]  # costliest rank [n, 1]
            others = cost.copy()
            others[np.arange(n), i[:, 0]] = np.inf
            j = np.argpartition(others, J - 1, axis=1)[:, :J]  # partner ranks [n, J]: the J least costly
        else:
            by_cost = np.argsort(cost, axis=1)
            i, j = by_cost[:, :-H - 1:-1], by_cost[:, :J]  # [n, H] costliest first, [n, J]
        hot, cold = (a[:, None] * R + i).ravel(), a[:, None] * R + j  # flat rank ids [n H], [n, J]
        if H > 1:
            cold = np.repeat(cold, H, axis=0)  # [n H, J]
        score, grid = scores(book, hot, cold)  # [J, n H], [J, K K, n H]
        order, best = score, None
        if keep[a].any():
            score, order, best = _keep_old(book, before, hot, cold, grid, np.repeat(stop_at[a], H))
        now = cost[np.arange(n)[:, None], i]  # [n, H]
        # A swap must gain more than rounding: the score (the pair's mean load plus |...|,
        # see _swap_scores) can land an ulp below an unchanged peak, and a search with no
        # gain floor would then swap one pair back and forth until max_steps.
        need = np.maximum(gain_floor[a][:, None], ROUNDING * now)  # [n, H]
        partner, taken = _pick_partners(score.reshape(J, n, H), order.reshape(J, n, H), now, need, stop_at[a])
        which = np.flatnonzero(taken)  # into the n H rows
        jj = partner.ravel()[which]
        swap = grid[jj, :, which].argmin(axis=1) if best is None else best[jj, which]  # the swap behind the score
        k, kj = np.divmod(swap, K)
        book.swap(hot[which], k, cold[which, jj], kj)
        active = a[taken[:, 0]]
    return t


def _coarse_steps(book: _Book, cost_of: Callable[[np.ndarray], np.ndarray], scores: Scorer, far: np.ndarray,
                  gain_floor: np.ndarray, max_steps: int) -> None:
    """The coarse phase of :func:`refine`, on ``book`` in place: while a layer's peak is
    above ``far [L]``, its ``P = R // 4`` costliest ranks are paired with its ``P`` least
    costly (costliest with least costly), and each pair takes its best swap where the hot
    rank is above ``far`` and gains more than ``gain_floor [L]``.

    From vLLM's linear table a DeepSeek-V3 layer needs ~40 swaps; the fine search makes
    ``hot_ranks`` of them per step, this makes up to ``P``, at about the cost of a fine
    step (one partner per hot rank instead of ``partners``). Only ranks above ``far``
    swap, so it moves about as much as the fine search does (swift, ``far`` 1.1 lower
    bounds: 0.331 of the slots on that first call, 0.328 without); the fine search then
    finishes from a table near balance.
    ``cost_of(rows [n]) -> [n, R]`` and ``scores`` are :func:`refine`'s.
    """
    L = far.shape[0]
    R = book.rank_m.size // L
    K = book.item_m.shape[1]
    P = max(1, R // 4)
    active = np.arange(L)
    for _ in range(max_steps):
        cost = cost_of(active)  # [n, R]
        above = cost.max(axis=1) > far[active]
        a, cost = active[above], cost[above]
        if not a.size:
            break
        n = len(a)
        by_cost = np.argsort(cost, axis=1)
        i, j = by_cost[:, :-P - 1:-1], by_cost[:, :P]  # [n, P] costliest first, least costly first
        hot, cold = (a[:, None] * R + i).ravel(), (a[:, None] * R + j).reshape(-1, 1)  # [n P], [n P, 1]
        score, grid = scores(book, hot, cold)  # [1, n P], [1, K K, n P]
        now = cost[np.arange(n)[:, None], i].ravel()  # [n P]
        need = np.maximum(np.repeat(gain_floor[a], P), ROUNDING * now)
        taken = (now > np.repeat(far[a], P)) & (now - score[0] > need)
        which = np.flatnonzero(taken)
        k, kj = np.divmod(grid[0, :, which].argmin(axis=1), K)
        book.swap(hot[which], k, cold[which, 0], kj)
        active = a[taken.reshape(n, P).any(axis=1)]


def _keep_old(book: _Book, before: np.ndarray, hot: np.ndarray, cold: np.ndarray, grid: np.ndarray,
              stop: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """:func:`refine`'s choice with ``old``: per hot rank ``hot [m]`` and partner ``cold
    [m, J]``, the swap that keeps both ranks at or under ``stop [m]`` and touches the
    fewest slots still holding what ``before [L * R, K]`` says, then the lowest peak; the
    lowest peak where no swap keeps both under ``stop``.

    ``grid [J, K K, m]`` is :func:`_swap_scores`'s (the peak minus ``(H + C) / 2``); it is
    overwritten. Returns the chosen swap's peak ``[J, m]``, an order over partners ``[J, m]`` (the
    swap's class times ``span``, plus its peak: class 0-2 old slots touched, 3 over
    ``stop``) and the swap ``[J, m]`` (an index into ``K K``). A slot that would hold its
    old expert again counts as touched: such restores are rare, and counting them would
    double the arithmetic.
    """
    J, KK, m = grid.shape
    base = ((book.rank_m[hot][:, None] + book.rank_m[cold]) / 2).T  # [J, m]
    # In int8 and in place, without boolean masks: on this grid a masked write costs
    # 10x a pass, and a fresh float array of its size pays its page faults every step.
    kept = book.table == before  # [L * R, K]: one pass here is cheaper than gathering both
    kept_h = np.ascontiguousarray(kept[hot].T)  # [K, m]
    kept_c = np.ascontiguousarray(kept[cold].transpose(1, 2, 0))  # [J, K, m]
    cls = np.add(kept_h[None, :, None], kept_c[:, None], dtype=np.int8).reshape(J, KK, m)
    over = np.greater(grid, (stop - base)[:, None]).view(np.int8)
    cls *= 1 - over
    cls += 3 * over
    span = 4 * float(np.abs(stop).max() + np.abs(base).max())  # above any grid value within stop
    grid *= 1 / span
    grid += cls  # the order (class, then peak) over swaps, in units of span
    best = grid.argmin(axis=1)  # [J, m]
    at = (np.arange(J)[:, None] * KK + best) * m + np.arange(m)  # flat index of each chosen swap
    order = grid.ravel()[at] * span  # [J, m]
    peak = order - cls.ravel()[at] * span + base
    return peak, order + base, best


def _pick_partners(score: np.ndarray, order: np.ndarray, now: np.ndarray, need: np.ndarray,
                   stop_at: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Partner of each hot rank and whether its swap is taken: ``score [J, n, H]`` (the
    peak of hot rank ``h``'s chosen swap with partner ``j``), ``order [J, n, H]`` (how
    partners rank: ``score`` itself, or :func:`_keep_old`'s order), ``now [n, H]`` (the
    hot ranks' costs), ``need [n, H]`` (the gain a swap must beat), ``stop_at [n]`` ->
    ``partner, taken [n, H]``. Costliest first, each hot rank takes its first partner no
    costlier one took; a layer whose costliest rank cannot gain takes no swap at all."""
    J, n, H = score.shape
    cols = np.arange(n)
    if H == 1:
        jj = order[:, :, 0].argmin(axis=0)
        return jj[:, None], (now[:, 0] - score[jj, cols, 0] > need[:, 0])[:, None]
    taken = np.zeros((n, H), dtype=bool)
    partner = np.zeros((n, H), dtype=np.int64)
    free = np.ones((J, n), dtype=bool)
    for h in range(H):
        partner[:, h] = jj = np.where(free, order[:, :, h], np.inf).argmin(axis=0)
        taken[:, h] = free[jj, cols] & (now[:, h] - score[jj, cols, h] > need[:, h]) & (now[:, h] > stop_at)
        free[jj[taken[:, h]], cols[taken[:, h]]] = False
    taken &= taken[:, :1]
    return partner, taken


class _Book(NamedTuple):
    """What :func:`refine` keeps per slot and rank, as flat views it updates in place:
    ``table, item_m [L * R, K]``, ``rank_m [L * R]``, ``holds [L * R * E]`` (rank ``q``
    holds expert ``e`` at ``q * E + e``), and the variances (None where they do not count)."""

    table: np.ndarray
    item_m: np.ndarray
    rank_m: np.ndarray
    holds: np.ndarray
    num_experts: int
    item_v: np.ndarray | None
    rank_v: np.ndarray | None

    def can_swap(self, hot: np.ndarray, cold: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Which swaps keep every rank free of duplicates: ``i_ok [m, J, K]`` (rank ``hot
        [m]`` lacks the partner's expert) and ``j_ok [m, K, J]`` (partner ``cold [m, J]``
        lacks the hot rank's expert)."""
        E = self.num_experts
        i_ok = ~self.holds[(hot * E)[:, None, None] + self.table[cold]]
        j_ok = ~self.holds[(cold * E)[:, None, :] + self.table[hot][:, :, None]]
        return i_ok, j_ok

    def swap(self, p: np.ndarray, k: np.ndarray, q: np.ndarray, kq: np.ndarray) -> None:
        """Swap slot ``k`` of rank ``p`` with slot ``kq`` of rank ``q`` (flat rank ids, all
        ``[m]``; no rank in two swaps), updating every record."""
        E = self.num_experts
        x, y = self.table[p, k], self.table[q, kq]
        self.table[p, k], self.table[q, kq] = y, x
        self.holds[p * E + x] = self.holds[q * E + y] = False
        self.holds[p * E + y] = self.holds[q * E + x] = True
        for item, rank in ((self.item_m, self.rank_m), (self.item_v, self.rank_v)):
            if item is not None and rank is not None:
                u, w = item[p, k], item[q, kq]
                item[p, k], item[q, kq] = w, u
                rank[p] += w - u
                rank[q] += u - w


Scorer = Callable[["_Book", np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]
"""A swap scorer: (book, hot ranks ``[m]``, partners ``[m, J]``) -> best peak per partner
``[J, m]`` and the grid ``[J, K K, m]`` it comes from (:func:`_swap_scores`)."""

BIG = 1e300
"""Stands for an impossible swap's load in :func:`_swap_scores` (finite, so that
differences of two impossible terms stay ordered instead of turning into nan)."""


def _swap_scores(book: _Book, hot: np.ndarray, cold: np.ndarray,
                 work: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Swaps between rank ``hot [m]`` and each of ``cold [m, J]`` on plain loads: the
    lowest peak per partner ``[J, m]`` and the grid ``[J, K K, m]`` it comes from (the
    swap of hot slot ``k`` with partner slot ``kj`` is at ``k * K + kj``, and its peak is
    the grid value plus ``(H + C) / 2``).

    Moving ``d = a - b`` (a replica ``a`` out of the hot rank, ``b`` in) leaves the pair's
    larger load at ``max(H - d, C + d) = (H + C) / 2 + |a - (b + (H - C) / 2)|``, so per
    partner the best swap is the closest pair of two short lists: a subtraction, an
    absolute value and a minimum. The grid is laid out with the rows last so that every
    operand is contiguous along the long axis: with the short ``K`` last, numpy's per-row
    overhead was most of a step. ``work``, if large enough, holds the grid (no allocation).
    """
    m, J = cold.shape
    K = book.item_m.shape[1]
    H, C = book.rank_m[hot], book.rank_m[cold]  # [m], [m, J]
    i_ok, j_ok = book.can_swap(hot, cold)
    give = np.where(j_ok, book.item_m[hot][:, :, None], BIG).transpose(2, 1, 0)  # [J, K, m]
    take = np.where(i_ok, book.item_m[cold] + ((H[:, None] - C) / 2)[:, :, None], -BIG).transpose(1, 2, 0)  # [J, K, m]
    out = None if work is None or work.size < J * K * K * m else work[:J * K * K * m].reshape(J, K, K, m)
    grid = np.subtract(np.ascontiguousarray(give)[:, :, None], np.ascontiguousarray(take)[:, None],
                       out=out)  # [J, K, K, m]
    np.abs(grid, out=grid)
    grid = grid.reshape(J, K * K, m)
    return grid.min(axis=1) + ((H[:, None] + C) / 2).T, grid


def _swap_scores_risk(book: _Book, hot: np.ndarray, cold: np.ndarray, z: float) -> tuple[np.ndarray, np.ndarray]:
    """:func:`_swap_scores` on the cost ``mean + z * sqrt(var)``, which has no such
    shortcut: both ranks' costs on the full grid, whose values are the peaks."""
    assert book.item_v is not None and book.rank_v is not None
    m, J = cold.shape
    K = book.item_m.shape[1]
    i_ok, j_ok = book.can_swap(hot, cold)

    def cost(mean: np.ndarray, var: np.ndarray) -> np.ndarray:
        return mean + z * np.sqrt(np.maximum(var, 0))

    am, av = book.item_m[hot][:, :, None, None], book.item_v[hot][:, :, None, None]  # [m, K, 1, 1]
    jm, jv = book.item_m[cold][:, None], book.item_v[cold][:, None]  # [m, 1, J, K]
    new_i = cost(book.rank_m[hot][:, None, None, None] - am + jm, book.rank_v[hot][:, None, None, None] - av + jv)
    new_j = cost(book.rank_m[cold][:, None, :, None] - jm + am, book.rank_v[cold][:, None, :, None] - jv + av)
    peak = np.where(i_ok[:, None] & j_ok[..., None], np.maximum(new_i, new_j), np.inf)  # [m, K, J, K]
    grid = peak.transpose(2, 1, 3, 0).reshape(J, K * K, m)
    return grid.min(axis=1), grid


LOOKAHEAD = 8
"""Count moves :func:`move_replicas` re-packs before it gives up on a layer."""


def move_replicas(table: np.ndarray, mean: np.ndarray, good_enough: np.ndarray | None = None) -> np.ndarray:
    """Joint search over replica counts and packing: while it lowers the peak, move one
    replica slot from one expert to another (the slot's rank drops a replica of ``b``,
    ``c_b > 1``, and takes a new one of ``a``), then re-run the swap searches
    (:func:`swap_pairs`). A layer stops early once its peak is ``<= good_enough [L]``.

    The min-max counts of :func:`replica_counts` are not always best for packing: with few
    slots per rank, one replica less on a hot expert can free a slot that pairs well
    elsewhere. Only moves that lower the peak rank can lower the peak, so candidates are
    (a held by the peak rank, any slot whose expert has spare replicas) and (a slot of
    the peak rank, any expert); each is scored on every rank exactly, and when none
    lowers the peak by itself the ``LOOKAHEAD`` best are re-packed before giving up.
    Replica counts stay within ``[1, R]`` and no rank holds an expert twice.

    ``table [L, R, K]``, ``mean [L, E]`` -> ``[L, R, K]``.
    """
    t = swap_pairs(table, mean)
    L, R, K = t.shape
    E = mean.shape[1]
    for l in range(L):  # layer by layer: few layers get here, and each needs its own moves
        w = mean[l]
        for _ in range(R * K):  # each move lowers the peak rank; R * K bounds the time
            tl = t[l]
            cnt = np.bincount(tl.ravel(), minlength=E)
            per = w / np.maximum(cnt, 1)
            load = per[tl].sum(axis=1)  # [R]
            holds = np.zeros((E, R), dtype=bool)
            holds[tl, np.arange(R)[:, None]] = True
            top = int(load.argmax())
            if good_enough is not None and load[top] <= good_enough[l]:
                break
            gain = per - w / (cnt + 1)  # [E]: what each holder of a sheds if a gains a replica
            lose = np.where(cnt > 1, w / np.maximum(cnt - 1, 1) - per, np.inf)  # [E]: what holders of b take on
            slot_r, slot_k = np.nonzero(cnt[tl] > 1)  # slots that can give up their replica
            peak_r = np.repeat(top, K)
            a = np.concatenate([np.repeat(tl[top], len(slot_r)), np.tile(np.arange(E), K)])
            r = np.concatenate([np.tile(slot_r, K), np.repeat(peak_r, E)])
            k = np.concatenate([np.tile(slot_k, K), np.repeat(np.arange(K), E)])
            b = tl[r, k]
            ok = (cnt[a] < R) & ~holds[a, r] & (cnt[b] > 1)
            a, r, k, b = a[ok], r[ok], k[ok], b[ok]
            if not a.size:
                break
            new = load[None] - gain[a, None] * holds[a] + lose[b, None] * holds[b]  # [n, R]
            n = np.arange(len(a))
            new[n, r] = load[r] - per[b] + w[a] / (cnt[a] + 1)
            peak = new.max(axis=1)
            # A move that does not lower the peak by itself can after re-packing: the few
            # most promising are re-packed and the first that ends lower is taken.
            for m in np.argsort(peak, kind="stable")[:LOOKAHEAD]:
                trial = tl.copy()
                trial[r[m], k[m]] = a[m]
                trial = swap_pairs(trial[None], w[None])[0]
                if rank_cost(trial[None], w[None]).max() < load[top] * (1 - ROUNDING):
                    t[l] = trial
                    break
            else:
                break
    return t


def swap_pairs(table: np.ndarray, mean: np.ndarray) -> np.ndarray:
    """Two-for-two swap search: while it lowers the peak, exchange two replicas of the
    most loaded rank with two of another rank (the pair of ranks' larger load as low as
    possible), running the one-for-one search (:func:`refine`) after each exchange.

    One-for-one swaps stall when every single exchange overshoots: the peak rank needs to
    shed a load no single replica difference matches. With ``C(K, 2)`` pairs per rank, the
    two-for-two exchanges offer ``C(K, 2)**2`` differences per pair of ranks, which evens
    out layers the one-for-one search leaves a few tenths of a percent above the bound.
    Replica counts never change; no rank ends up holding an expert twice.

    ``table [L, R, K]``, ``mean [L, E]`` -> ``[L, R, K]``.
    """
    t = refine(table, mean)
    L, R, K = t.shape
    if K < 2 or R < 2:
        return t
    pi, pj = np.triu_indices(K, 1)  # [m]: the slot pairs of a rank
    for l in range(L):  # layer by layer: used on the few layers the other searches leave above the bound
        w = mean[l]
        for _ in range(R * K):  # each swap lowers the peak rank; R * K bounds the time
            tl = t[l]
            item = (w / np.bincount(tl.ravel(), minlength=len(w)))[tl]  # [R, K]
            load = item.sum(axis=1)
            top = int(load.argmax())
            pair = item[:, pi] + item[:, pj]  # [R, m]
            shed = pair[top][None, :, None] - pair[:, None, :]  # [R, m_top, m]: what the top rank sheds
            peak = np.maximum(load[top] - shed, load[:, None, None] + shed)
            # Invalid: a rank would hold one expert twice (an expert that comes in and is not
            # among the two going out).
            give = np.stack([tl[top, pi], tl[top, pj]], axis=-1)  # [m, 2]
            take = np.stack([tl[:, pi], tl[:, pj]], axis=-1)  # [R, m, 2]
            holds = np.zeros((R, len(w)), dtype=bool)
            holds[np.arange(R)[:, None], tl] = True
            dup_top = (holds[top][take][:, None]  # [R, 1, m, 2]: comes into the top rank, already there
                       & ~(take[:, None, :, :, None] == give[None, :, None, None, :]).any(-1)).any(-1)
            dup_other = (holds[np.arange(R)[:, None, None], give[None]][:, :, None]  # [R, m_top, 1, 2]
                         & ~(give[None, :, None, :, None] == take[:, None, :, None, :]).any(-1)).any(-1)
            peak = np.where(dup_top | dup_other, np.inf, peak)
            peak[top] = np.inf
            r, a, b = np.unravel_index(int(peak.argmin()), peak.shape)
            if peak[r, a, b] >= load[top] * (1 - ROUNDING):
                break
            tl[top, [pi[a], pj[a]]], tl[r, [pi[b], pj[b]]] = tl[r, [pi[b], pj[b]]], tl[top, [pi[a], pj[a]]].copy()
            t[l] = refine(tl[None], w[None])[0]
    return t


def _pairing_peak(items: np.ndarray) -> np.ndarray:
    """Smallest max pair sum over pairings of ``items [..., 2R]``: largest with smallest."""
    a = np.sort(items, axis=-1)
    return (a + a[..., ::-1]).max(axis=-1)


def pairing_counts(weight: np.ndarray, num_ranks: int) -> np.ndarray:
    """Replica counts ``[L, E]`` for two slots per rank, chosen for the pairing.

    With ``K = 2`` a rank's load is a pair sum, and for given counts the best tables pair
    the largest replica with the smallest (sorted pairing). The min-max counts of
    :func:`replica_counts` make mid-sized replicas that pair badly; here each extra replica
    goes, one at a time, to the expert that leaves the lowest sorted-pairing peak (slots
    not yet given count as empty; ties go to the smallest load per replica). On skewed
    layers this leaves mid-sized experts whole and splits cold ones into small partners
    for them (measured against the exact optimum in ``benchmarks/pairing_bound.py``).
    ``weight [L, E]`` -> ``[L, E]``.
    """
    L, E = weight.shape
    S = 2 * num_ranks
    counts = np.ones((L, E), dtype=np.int64)
    owner = np.broadcast_to(np.r_[np.arange(E), np.full(S - E, -1)], (L, S)).copy()  # [L, S], -1: empty
    items = np.where(owner >= 0, np.take_along_axis(weight, np.maximum(owner, 0), axis=1), 0.0)  # [L, S]
    mine = owner[:, None, :] == np.arange(E)[None, :, None]  # [L, E, S]: slots of each candidate
    rows = np.arange(L)
    for free in range(E, S):
        split = weight / (counts + 1)  # [L, E]
        trial = np.where(mine, split[..., None], items[:, None, :])
        trial[:, :, free] = split
        peak = np.where(counts < num_ranks, _pairing_peak(trial), np.inf)  # [L, E]
        tied = peak <= peak.min(axis=1, keepdims=True) * (1 + ROUNDING)
        pick = np.where(tied, -(weight / counts), -np.inf).argmax(axis=1)  # ties: split the coldest
        counts[rows, pick] += 1
        mine[rows, pick, free] = True
        items = np.where(mine[rows, pick], split[rows, pick][:, None], items)
    return counts


def pairing_search(weight: np.ndarray, counts: np.ndarray, num_ranks: int) -> np.ndarray:
    """Local search over replica counts ``[L, E]`` for two slots per rank, on the exact
    sorted-pairing peak: while it lowers the peak, move one replica from an expert with
    spare replicas to another expert (counts stay in ``[1, R]``).

    One move changes the sizes of two experts' replicas and so re-sorts the whole pairing,
    which a greedy choice of counts cannot foresee; every (receiver, donor) move is scored
    exactly. There are at most ``E x (2R - E)`` of them (only ``2R - E`` replicas are
    extra), each scored by one sort of ``2R`` sizes. ``weight [L, E]`` -> ``[L, E]``.
    """
    counts = counts.copy()
    E = weight.shape[1]
    for w, c in zip(weight, counts, strict=True):  # rows of counts: updated in place
        while True:
            owner = np.repeat(np.arange(E), c)
            owner = owner[np.argsort(w[owner] / c[owner], kind="stable")]  # [2R], by replica size
            size = w / c
            pairs = size[owner[:num_ranks]] + size[owner[::-1][:num_ranks]]  # [R]: i-th smallest + i-th largest
            i = int(pairs.argmax())
            peak, small, big = pairs[i], size[owner[i]], size[owner[-1 - i]]
            donor = np.flatnonzero(c > 1)
            a = np.repeat(np.flatnonzero(c < num_ranks), len(donor))
            b = np.tile(donor, len(a) // max(len(donor), 1))
            # The peak pair only drops if fewer replicas stay >= big (a or b owns one) or
            # more fall below small (a's new size does): other moves cannot help.
            ok = (a != b) & ((size[a] >= big) | (size[b] >= big) | (w[a] / (c[a] + 1) < small))
            a, b = a[ok], b[ok]
            if not a.size:
                break
            first = np.full(E, -1)
            first[owner[::-1]] = np.arange(len(owner))[::-1]  # each expert's first slot
            trial = np.where(owner == a[:, None], (w[a] / (c[a] + 1))[:, None], size[owner])  # [n, 2R]
            trial = np.where(owner == b[:, None], (w[b] / (c[b] - 1))[:, None], trial)
            trial[np.arange(len(a)), first[b]] = w[a] / (c[a] + 1)  # b's slot goes to a
            # Nearly sorted rows (only a's and b's replicas are out of place): timsort is fast.
            trial.sort(axis=1, kind="stable")
            trial_peak = (trial + trial[:, ::-1]).max(axis=1)
            best = int(trial_peak.argmin())
            if trial_peak[best] >= peak * (1 - ROUNDING):
                break
            c[a[best]] += 1
            c[b[best]] -= 1
    return counts


def pair_table(weight: np.ndarray, counts: np.ndarray, num_ranks: int) -> np.ndarray:
    """Sorted pairing of the replicas of ``counts [L, E]`` onto ``num_ranks`` ranks of two
    slots: rank ``r`` takes the ``r``-th largest and the ``r``-th smallest replica; a
    rank left holding one expert twice swaps one of them for the replica of closest load
    elsewhere (:func:`separate_duplicates`). ``-> [L, R, 2]``."""
    L, E = weight.shape
    owner = np.stack([np.repeat(np.arange(E), c) for c in counts])  # [L, 2R]
    size = np.take_along_axis(weight / counts, owner, axis=1)
    owner = np.take_along_axis(owner, np.argsort(-size, axis=1, kind="stable"), axis=1)
    table = np.stack([owner[:, :num_ranks], owner[:, ::-1][:, :num_ranks]], axis=-1)
    return separate_duplicates(table, weight)


def recount(table: np.ndarray, counts: np.ndarray, mean: np.ndarray) -> np.ndarray:
    """Change replica counts to ``counts [L, E]`` moving one slot per replica gained.

    A surplus replica leaves the slot of the most loaded rank that holds it; freed slots
    take the missing replicas, heaviest replica into the least loaded rank that does not
    hold its expert yet. If every freed slot is on a rank that holds it, a replica of
    similar load on another rank moves into the freed slot and makes room (two slots).
    All layers advance together, one missing replica per layer per step.
    ``table [L, R, K]``, ``mean [L, E]`` -> ``[L, R, K]``.
    """
    L, R, K = table.shape
    E = mean.shape[1]
    current = logcnt(table, E)
    if np.array_equal(current, counts):
        return table.copy()
    t = table.reshape(L, R * K).copy()  # [L, S]
    slot_rank = np.arange(R * K) // K  # [S]
    load = rank_cost(table, mean)  # [L, R]
    # 1. Free the surplus: per (layer, expert), its slots on the most loaded ranks first.
    surplus = np.maximum(current - counts, 0)  # [L, E]
    lay, col = np.nonzero(np.take_along_axis(surplus, t, axis=1) > 0)  # only slots of experts with a surplus
    exp, slot_load = t[lay, col], load[lay, slot_rank[col]]
    order = np.lexsort((-slot_load, exp, lay))  # grouped by (layer, expert), hottest rank first
    key = lay[order] * E + exp[order]
    first = np.r_[0, np.flatnonzero(np.diff(key)) + 1]
    nth = np.arange(order.size) - np.repeat(first, np.diff(np.r_[first, order.size]))
    freed = np.zeros((L, R * K), dtype=bool)
    keep = nth < surplus.ravel()[key]
    freed[lay[order[keep]], col[order[keep]]] = True
    rows, cols = np.nonzero(freed)
    load[rows, slot_rank[cols]] -= (mean / np.maximum(current, 1))[rows, t[rows, cols]]
    t[freed] = -1
    # 2. Fill the freed slots, heaviest missing replica first.
    per_replica = mean / np.maximum(counts, 1)
    needed, missing = _missing_replicas(np.maximum(counts - current, 0), per_replica)  # [L, M], [L]
    holds = np.zeros((L, R, E + 1), dtype=bool)  # column E: an empty slot
    holds[np.arange(L)[:, None], slot_rank, np.where(t < 0, E, t)] = True
    # Candidates are the freed slots only ([L, M], in slot order): as many as replicas
    # are missing, far fewer than all slots. Ranks are flat ids ``l * R + r`` below: one
    # integer index per gather is the cheapest fancy indexing numpy has.
    per_layer = np.bincount(rows, minlength=L)
    M = needed.shape[1]
    freed_slots = np.zeros((L, M), dtype=np.int64)
    freed_slots[rows, np.arange(rows.size) - np.repeat(np.cumsum(per_layer) - per_layer, per_layer)] = cols
    is_open = np.arange(M) < per_layer[:, None]  # [L, M]: the freed slot is still empty
    cand_rank = np.arange(L)[:, None] * R + slot_rank[freed_slots]  # [L, M]
    flat_load, flat_holds = load.reshape(-1), holds.reshape(-1)
    for j in range(M):
        active = np.flatnonzero(missing > j)
        e = needed[active, j]
        ranks = cand_rank[active]  # [n, M]
        ok = is_open[active] & ~flat_holds[ranks * (E + 1) + e[:, None]]
        pick = np.where(ok, flat_load[ranks], np.inf).argmin(axis=1)
        placed = ok[np.arange(len(active)), pick]
        pl, pe, pk = active[placed], e[placed], pick[placed]
        t[pl, freed_slots[pl, pk]] = pe
        is_open[pl, pk] = False
        pr = cand_rank[pl, pk]
        flat_holds[pr * (E + 1) + pe] = True
        flat_load[pr] += per_replica[pl, pe]
        if not placed.all():  # every freed slot's rank holds the expert (e.g. a linear start)
            stuck = active[~placed]
            pk = np.where(is_open[stuck], flat_load[cand_rank[stuck]], np.inf).argmin(axis=1)  # least loaded
            _make_room(t, flat_holds, flat_load, per_replica, stuck, e[~placed], freed_slots[stuck, pk], slot_rank)
            is_open[stuck, pk] = False
    return t.reshape(L, R, K)


def _missing_replicas(deficit: np.ndarray, per_replica: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The replicas each layer lacks, heaviest first: ``deficit [L, E]`` (replicas to add
    per expert), ``per_replica [L, E]`` -> ``needed [L, M]`` (expert ids, padded with -1)
    and ``missing [L]`` (how many of each row are real)."""
    L, E = deficit.shape
    flat = np.repeat(np.arange(L * E), deficit.ravel())  # one entry per missing replica
    layer, expert = flat // E, flat % E
    order = np.lexsort((-per_replica[layer, expert], layer))  # by layer, heaviest replica first
    layer, expert = layer[order], expert[order]
    missing = deficit.sum(axis=1)
    starts = np.r_[0, np.cumsum(missing)[:-1]]
    needed = np.full((L, int(missing.max(initial=0))), -1, dtype=np.int64)
    needed[layer, np.arange(layer.size) - starts[layer]] = expert
    return needed, missing


def _make_room(t: np.ndarray, holds: np.ndarray, load: np.ndarray, per_replica: np.ndarray,
               layers: np.ndarray, experts: np.ndarray, empty: np.ndarray, slot_rank: np.ndarray) -> None:
    """Place a replica of ``experts [n]`` in ``layers [n]`` whose freed slots are all on
    ranks holding it: the rank ``r`` of the freed slot ``empty [n]`` takes the replica of
    closest load from a slot whose rank lacks the expert (and whose expert ``r`` lacks),
    and the expert goes there (two slots). ``t [L, S]`` (-1: freed), ``holds`` (flat
    ``[L, R, E + 1]``) and ``load`` (flat ``[L, R]``) are updated in place."""
    n = np.arange(len(layers))
    E1 = per_replica.shape[1] + 1
    R = load.size // t.shape[0]
    tl = t[layers]  # [n, S]
    ranks = layers[:, None] * R + slot_rank  # [n, S] flat rank ids
    r = layers * R + slot_rank[empty]
    x_all = np.maximum(tl, 0)
    fits = (tl >= 0) & ~holds[ranks * E1 + experts[:, None]] & ~holds[(r * E1)[:, None] + x_all]
    size = per_replica[layers]  # [n, E]
    gap = np.abs(np.take_along_axis(size, x_all, axis=1) - size[n, experts][:, None])
    s2 = np.where(fits, gap, np.inf).argmin(axis=1)
    x, r2 = tl[n, s2], ranks[n, s2]
    t[layers, empty], t[layers, s2] = x, experts
    holds[r * E1 + x] = holds[r2 * E1 + experts] = True
    holds[r2 * E1 + x] = False
    load[r] += size[n, x]
    load[r2] += size[n, experts] - size[n, x]


def align_ranks(old: np.ndarray, new: np.ndarray, num_experts: int) -> np.ndarray:
    """Renumber the ranks of ``new`` so each keeps as many of its experts as it can from
    the same rank of ``old`` (ranks are interchangeable, slots moved are not).

    Mutually best (old, new) pairs by overlap are matched in rounds; a round without one
    matches the largest remaining overlap. ``old, new [L, R, K]`` -> ``[L, R, K]``.
    """
    L, R, _ = new.shape
    li = np.arange(L)[:, None, None]
    ri = np.arange(R)[None, :, None]
    h_old = np.zeros((L, R, num_experts), dtype=np.float32)
    h_new = np.zeros((L, R, num_experts), dtype=np.float32)
    h_old[li, ri, old] = 1
    h_new[li, ri, new] = 1
    overlap = h_old @ h_new.transpose(0, 2, 1)  # [L, R_old, R_new]
    source = np.full((L, R), -1)  # source[l, old rank] = new rank placed there
    for l in range(L):
        ov = overlap[l].copy()
        free_old, free_new = np.ones(R, dtype=bool), np.ones(R, dtype=bool)
        while free_old.any():
            ov[~free_old] = -1
            ov[:, ~free_new] = -1
            best_new = ov.argmax(axis=1)  # for each old rank
            best_old = ov.argmax(axis=0)  # for each new rank
            olds = np.flatnonzero(free_old & (best_old[best_new] == np.arange(R)))
            if not olds.size:
                olds = np.array([ov.max(axis=1).argmax()])
            source[l, olds] = best_new[olds]
            free_old[olds] = False
            free_new[best_new[olds]] = False
    return np.take_along_axis(new, source[:, :, None], axis=1)


TRADE_STEPS = ((0.01, 1.0), (0.05, 0.95))
"""What :func:`trade_back` may add to a rank's cost: pairs (rise, ceiling), a rise of at
most ``rise`` times the mean rank load that leaves the rank at most ``ceiling`` times its
layer's peak cost; any one pair suffices. Ranks near the peak only take small rises."""


TRADE_ROUNDS = 4
"""Rounds of :func:`trade_back`. Each takes about half the trades left (EP144 x 2, 58 layers:
1717, 735, 326, 143, then 68 in four more rounds), so four take ~97 % of them."""


def trade_back(old: np.ndarray, new: np.ndarray, mean: np.ndarray, var: np.ndarray | None = None, z: float = 0.0,
               steps: tuple[tuple[float, float], ...] = TRADE_STEPS) -> np.ndarray:
    """Put experts back where ``old`` had them by trading replicas of nearly equal load:
    a rank that lost expert ``e`` takes a replica of ``e`` from a rank that did not hold
    ``e`` before and gives it a replica ``y`` it did not hold before (one slot kept, two
    where that rank held ``y``).

    A fresh placement re-pairs replicas freely, and many of its choices among replicas of
    similar load are arbitrary. A trade raises a rank's cost (``mean + z * sqrt(var)`` of
    what it carries, :func:`rank_cost`) only as ``steps`` allow: by default by 1 % of the
    mean rank load up to the layer's peak cost, or by 5 % up to 95 % of it. So the peak
    does not change, and the ranks near it, where the next window's peak comes from, gain
    little: a repair that put more ranks near the peak realized worse (README, "Moves").
    On DeepSeek-V3 EP144 x 2, where ``swift`` places afresh on most updates, its steady
    moves drop by 23-39 % at a realized imbalance within +0.3 %. Rounds of disjoint
    trades (each rank in at most one per round), all layers together. Replica counts
    never change; the result is valid if ``new`` is.

    ``old, new [L, R, K]``, ``mean, var [L, E]`` -> ``[L, R, K]``.
    """
    t = new.copy()
    L, R, K = t.shape
    E = mean.shape[1]
    cnt = np.maximum(logcnt(t, E), 1)
    per_m = (mean / cnt).ravel()  # [L E]: a replica's mean load, at (layer, expert) l * E + e
    per_v = (np.zeros_like(mean) if var is None else var / cnt**2).ravel()
    le = np.arange(L).reshape(L, 1, 1) * E  # (layer, expert) ids are le + e
    old_id = le + old  # [L, R, K]
    rank_m = per_m[le + t].sum(axis=-1).ravel()  # [L R]
    rank_v = per_v[le + t].sum(axis=-1).ravel()

    def cost(m: np.ndarray, v: np.ndarray) -> np.ndarray:
        return m + z * np.sqrt(np.maximum(v, 0)) if z else m

    start = cost(rank_m, rank_v).reshape(L, R)
    mean_rank, peak = mean.sum(axis=1, keepdims=True) / R, start.max(axis=1, keepdims=True)
    # The highest cost each rank may reach: any one step allows it.
    limit = np.max([np.minimum(start + rise * mean_rank, np.maximum(ceiling * peak, start)) for rise, ceiling in steps],
                   axis=0).ravel()  # [L R]
    # The second key of a trade's score: its load change, below one slot (|dm| is within
    # the largest rise).
    scale = (1 + max(rise for rise, _ in steps)) * mean_rank.reshape(L, 1, 1, 1) + 1e-300
    # Flat ids: rank q = l * R + r, (rank, expert) q * E + e: one integer per gather.
    q = np.arange(L * R).reshape(L, R, 1)
    held_old = q * E + old  # [L, R, K]: ``old``'s (rank, expert) pairs
    held = np.zeros(L * R * E, dtype=bool)
    held[held_old.ravel()] = True
    holds = np.zeros(L * R * E, dtype=bool)
    holds[(q * E + t).ravel()] = True
    for _ in range(TRADE_ROUNDS):
        foreign = ~held[q * E + t]  # [L, R, K]: a slot whose expert its rank did not hold
        lost = ~holds[held_old]  # [L, R, K]: an old expert its rank no longer holds
        # One rank per (layer, expert) where a replica of it is foreign (any: if it cannot
        # trade, the next round may pick another).
        source = np.full(L * E, -1)
        fl, fr, fk = np.nonzero(foreign)
        source[fl * E + t[fl, fr, fk]] = fl * R + fr
        r2 = np.where(lost, source[old_id], -1)  # [L, R, K]: giver of old slot j
        # Trades [L, R, j, k]: rank r takes back its old expert e (slot j) from r2 and gives
        # it its foreign slot k (expert y); r gains dm (and dv), r2 loses them.
        e_id, y_id = old_id[..., :, None], (le + t)[..., None, :]
        dm, dv = per_m[e_id] - per_m[y_id], per_v[e_id] - per_v[y_id]
        giver = np.maximum(r2, 0)[..., None]
        taker = q.reshape(L, R, 1, 1)
        pair = giver * E + t[:, :, None, :]  # (giver, y)
        ok = (r2 >= 0)[..., None] & foreign[:, :, None, :] & ~holds[pair]
        ok &= cost(rank_m[taker] + dm, rank_v[taker] + dv) <= limit[taker]
        ok &= cost(rank_m[giver] - dm, rank_v[giver] - dv) <= limit[giver]
        if not ok.any():
            break
        # Each rank's best trade: most slots kept, then the smallest load change ...
        score = np.where(ok, 1 + held[pair] - np.abs(dm) / scale, -np.inf).reshape(L * R, -1)
        best = score.argmax(axis=1)
        takers = np.flatnonzero(score[np.arange(L * R), best] > -np.inf)
        j, k = np.divmod(best[takers], K)
        givers = r2.reshape(L * R, K)[takers, j]
        # ... taken where it comes first for both its ranks, so no rank is in two.
        position = np.empty(takers.size, dtype=np.int64)
        position[np.argsort(-score[takers, best[takers]], kind="stable")] = np.arange(takers.size)
        first = np.full(L * R, takers.size)
        np.minimum.at(first, takers, position)
        np.minimum.at(first, givers, position)
        take = (first[takers] == position) & (first[givers] == position)
        takers, givers, j, k = takers[take], givers[take], j[take], k[take]
        tf = t.reshape(L * R, K)
        e, y = old.reshape(L * R, K)[takers, j], tf[takers, k]
        k2 = np.argmax(tf[givers] == e[:, None], axis=1)  # the slot of e on the giver
        tf[takers, k], tf[givers, k2] = e, y
        holds[takers * E + y] = holds[givers * E + e] = False
        holds[takers * E + e] = holds[givers * E + y] = True
        layer = takers // R * E
        moved_m, moved_v = per_m[layer + e] - per_m[layer + y], per_v[layer + e] - per_v[layer + y]
        rank_m[takers] += moved_m
        rank_m[givers] -= moved_m
        rank_v[takers] += moved_v
        rank_v[givers] -= moved_v
    return t


COUNT_SPACE = 4096
"""Largest number of replica-count vectors :func:`every_count_table` tries per layer."""


def count_space(num_experts: int, num_slots: int) -> int:
    """How many ways ``S - E`` redundant slots split over ``E`` experts (``C(E + x - 1, x)``;
    the cap of ``R`` replicas per expert only removes some)."""
    extra = num_slots - num_experts
    return math.comb(num_experts + extra - 1, extra)


@functools.lru_cache(maxsize=16)
def count_vectors(num_experts: int, num_ranks: int, num_slots: int) -> np.ndarray | None:
    """Every replica-count vector ``[N, E]`` (each count in ``[1, R]``, sum ``S``), or None
    when :func:`count_space` exceeds ``COUNT_SPACE``. Cached (read-only): engines ask for
    the same shape on every plan."""
    if count_space(num_experts, num_slots) > COUNT_SPACE:
        return None
    extra = np.array(list(itertools.combinations_with_replacement(range(num_experts), num_slots - num_experts)),
                     dtype=np.int64).reshape(count_space(num_experts, num_slots), -1)  # [N, x]: who gets each extra
    vectors = np.ones((len(extra), num_experts), dtype=np.int64)
    np.add.at(vectors, (np.arange(len(extra))[:, None], extra), 1)
    vectors = vectors[(vectors <= num_ranks).all(axis=1)]
    vectors.flags.writeable = False
    return vectors


def table_for_counts(weight: np.ndarray, counts: np.ndarray, num_ranks: int) -> np.ndarray:
    """Greedy packing of the replicas of ``counts [X, E]`` (heaviest first, into the
    lightest rank with a free slot that lacks the expert), then the swap search.
    ``weight [X, E]`` -> ``[X, R, K]``."""
    X, E = weight.shape
    S = int(counts[0].sum())
    K = S // num_ranks
    owner = np.stack([np.repeat(np.arange(E), c) for c in counts])  # [X, S]
    size = np.take_along_axis(weight / counts, owner, axis=1)
    rank, slot = pack(size, num_ranks, labels=owner)
    table = np.empty_like(owner)
    np.put_along_axis(table, rank * K + slot, owner, axis=1)
    return refine(separate_duplicates(table.reshape(X, num_ranks, K), weight), weight)


def every_count_table(mean: np.ndarray, num_ranks: int, slots_per_rank: int, keep: int = 64,
                      old: np.ndarray | None = None, tolerance: float = 0.0) -> np.ndarray | None:
    """Joint choice of replica counts and packing by trying count vectors: for small
    problems (:func:`count_vectors`), the ``keep`` most promising vectors per layer are
    packed (:func:`table_for_counts`) and the best table is kept; None when the count
    space is too large.

    Promise is a bound for the counts: the rank holding the largest replica also holds
    ``K - 1`` replicas of other, distinct experts, at least the ``K - 1`` smallest, so no
    table of those counts peaks below ``max(total / R, largest + those)``. On few experts
    the min-max counts are often not the best for packing: splitting two small experts
    into fillers can beat a third replica of a hot one (``tests/test_policies.py``
    measures this against exhaustive search). With ``old [L, R, K]``, ranks are renumbered to match it and, of the
    tables whose peak is within ``tolerance`` of the lowest, the one that moves the fewest
    weights is kept, and :func:`trade_back` keeps more in place. ``mean [L, E]`` -> ``[L, R, K]``.
    """
    L, E = mean.shape
    K = slots_per_rank
    vectors = count_vectors(E, num_ranks, num_ranks * K)
    if vectors is None:
        return None
    sizes = np.sort(mean[:, None, :] / vectors[None], axis=-1)  # [L, N, E]: each expert's replica size
    # The K - 1 partners of the largest replica are distinct experts, other than its own.
    partners = sizes[..., : min(K - 1, E - 1)].sum(axis=-1)
    bound = np.maximum(sizes[..., -1] + partners, mean.sum(axis=1, keepdims=True) / num_ranks)  # [L, N]
    best = np.argsort(bound, axis=1, kind="stable")[:, :keep]  # [L, M]
    rows = np.repeat(np.arange(L), best.shape[1])
    tables = table_for_counts(mean[rows], vectors[best.ravel()], num_ranks)  # [L * M, R, K]
    peak = rank_cost(tables, mean[rows]).max(axis=1).reshape(L, -1)
    if old is None:
        pick = peak.argmin(axis=1)
    else:  # the fewest moves among the tables within ``tolerance`` of the lowest peak
        near = (peak <= peak.min(axis=1, keepdims=True) * (1 + tolerance)).ravel()
        tables[near] = align_ranks(old[rows[near]], tables[near], E)  # only those can be picked
        moves = np.full(rows.size, np.iinfo(np.int64).max)
        moves[near] = _rank_moves(old[rows[near]], tables[near], E)
        pick = moves.reshape(L, -1).argmin(axis=1)
    chosen = tables.reshape(L, -1, num_ranks, K)[np.arange(L), pick]
    return chosen if old is None else trade_back(old, chosen, mean)


def _rank_moves(old: np.ndarray, new: np.ndarray, num_experts: int) -> np.ndarray:
    """Weights each table moves, ``[X]``: per rank, the experts of ``new [X, R, K]`` that
    the same rank of ``old [X, R, K]`` does not hold (slots are kept, so no other slot moves)."""
    X, R, _ = old.shape
    held = np.zeros((X, R, num_experts), dtype=bool)
    held[np.arange(X)[:, None, None], np.arange(R)[None, :, None], old] = True
    kept = held[np.arange(X)[:, None, None], np.arange(R)[None, :, None], new]
    return (~kept).reshape(X, -1).sum(axis=1)


def fresh_table(old: np.ndarray, mean: np.ndarray, var: np.ndarray | None = None, z: float = 0.0,
                search_counts: bool = False, pairing: bool = False) -> np.ndarray:
    """A placement computed from scratch, then moved as little as possible from ``old``:
    replica counts and greedy packing on ``mean + z * sqrt(var)`` (DeepSeek's global
    algorithm), the swap search to convergence (with ``search_counts``, and ``z = 0``:
    also over replica counts, :func:`move_replicas`; with ``pairing`` and two slots per
    rank, also from :func:`pairing_counts` and :func:`pairing_search` where that is
    better), ranks renumbered to match ``old`` and replicas of nearly equal load traded
    back to the ranks of ``old`` that held them (:func:`trade_back`).

    ``old [L, R, K]``, ``mean, var [L, E]`` -> ``[L, R, K]`` (slot order not preserved).
    """
    L, R, K = old.shape
    risk = mean if var is None else mean + z * np.sqrt(var)
    start = separate_duplicates(deepseek_phy2log(risk, R, K).reshape(L, R, K), risk)
    placed = refine(start, mean, var, z)
    if search_counts and not z:
        peak = rank_cost(placed, mean).max(axis=1)
        if pairing and K == 2:
            # The count search stops in different local optima from the greedy and the
            # min-max counts, and a pairing that puts two replicas of one expert on a rank
            # must be repaired, so any of the three can give the best table.
            greedy = pairing_counts(mean, R)
            for counts in (greedy, pairing_search(mean, greedy, R),
                           pairing_search(mean, replica_counts(mean, R, R * K), R)):
                paired = refine(pair_table(mean, counts, R), mean)
                paired_peak = rank_cost(paired, mean).max(axis=1)
                better = paired_peak < peak
                placed[better] = paired[better]
                peak = np.minimum(peak, paired_peak)
        counted = every_count_table(mean, R, K)
        if counted is not None:
            counted_peak = rank_cost(counted, mean).max(axis=1)
            better = counted_peak < peak
            placed[better] = counted[better]
            peak = np.minimum(peak, counted_peak)
        # Only layers the swaps left above the bound have anything to gain.
        good_enough = 1.001 * lower_bound(mean, R, R * K)
        gap = np.flatnonzero(peak > good_enough)
        if gap.size:
            placed[gap] = move_replicas(placed[gap], mean[gap], good_enough=good_enough[gap])
    return trade_back(old, align_ranks(old, placed, mean.shape[1]), mean, var, z)
