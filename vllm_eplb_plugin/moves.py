"""Edits between two expert tables: keep slots in place, separate duplicates, bound moves.

All tables are ``int64 [L, R, K]`` (or ``[R, K]`` for one layer where a name says so);
``expert_load`` is ``float64 [L, E]`` (or ``[E]`` for one layer).
"""

from __future__ import annotations

import numpy as np

from .placement import changed_slots

__all__ = ["preserve_slots", "separate_duplicates", "limit_moves"]


def preserve_slots(old: np.ndarray, new: np.ndarray) -> np.ndarray:
    """Reorder each rank's slots in ``new`` so that an expert the rank already held keeps
    its old slot; the set of experts per rank is unchanged. ``[L, R, K]`` -> ``[L, R, K]``.

    A policy that only decides *which* experts a rank holds calls this so that the engine
    does not copy weights between slots of one rank for nothing.
    """
    L, R, K = new.shape
    match = new[..., :, None] == old[..., None, :]  # [L, R, K_new, K_old]
    kept = match.any(axis=-1)  # [L, R, K_new]
    out = np.full_like(new, -1)
    li, ri, ki = np.nonzero(kept)
    out[li, ri, match[li, ri, ki].argmax(axis=-1)] = new[li, ri, ki]
    # Newcomers fill the free slots in order: stable sorts put free slots / newcomers first.
    free_slots = np.argsort(out != -1, axis=-1, kind="stable")
    newcomers = np.argsort(kept, axis=-1, kind="stable")
    n_new = (~kept).sum(axis=-1, keepdims=True)
    use = np.arange(K) < n_new  # [L, R, K]
    li, ri, j = np.nonzero(use)
    out[li, ri, free_slots[li, ri, j]] = new[li, ri, newcomers[li, ri, j]]
    return out


def separate_duplicates(table: np.ndarray, expert_load: np.ndarray) -> np.ndarray:
    """Swap replicas until no rank holds one expert twice, choosing the swap partner whose
    per-replica load is closest so that rank loads barely change. ``[L, R, K]`` in, new
    array out. Greedy packers produce duplicates only on ties (e.g. all-zero load).
    """
    out = table.copy()
    srt = np.sort(out, axis=-1)
    for l in np.unique(np.nonzero(srt[..., 1:] == srt[..., :-1])[0]):
        out[l] = _separate_layer(out[l], expert_load[l])
    return out


def _separate_layer(t: np.ndarray, w: np.ndarray) -> np.ndarray:
    R, K = t.shape
    cnt = np.bincount(t.ravel(), minlength=w.shape[0])
    per_replica = w / np.maximum(cnt, 1)
    for _ in range(t.size):
        dups = [(r, e) for r in range(R) for e, c in zip(*np.unique(t[r], return_counts=True)) if c > 1]
        if not dups:
            return t
        r, e = dups[0]
        k = int(np.flatnonzero(t[r] == e)[-1])
        best = None
        for r2 in range(R):
            if e in t[r2]:
                continue
            for k2 in range(K):
                f = t[r2, k2]
                if f in t[r]:
                    continue
                cost = abs(per_replica[f] - per_replica[e])
                if best is None or cost < best[0]:
                    best = (cost, r2, k2)
        if best is None:
            raise RuntimeError(f"cannot separate duplicate expert {e} on rank {r}: no rank can swap with it")
        _, r2, k2 = best
        t[r, k], t[r2, k2] = t[r2, k2], t[r, k]
    raise RuntimeError("separating duplicate experts did not converge")


def _rank_peak(t: np.ndarray, w: np.ndarray) -> tuple[float, float]:
    """(max rank load, sum of squared rank loads) of one layer ``t [R, K]``, ``w [E]``."""
    cnt = np.bincount(t.ravel(), minlength=w.shape[0])
    loads = (w[t] / cnt[t]).sum(axis=1)
    return float(loads.max()), float(np.dot(loads, loads))


def _valid_layer(t: np.ndarray, num_experts: int) -> bool:
    if np.bincount(t.ravel(), minlength=num_experts).min() == 0:
        return False
    srt = np.sort(t, axis=-1)
    return not np.any(srt[:, 1:] == srt[:, :-1])


def limit_moves(old: np.ndarray, target: np.ndarray, expert_load: np.ndarray, max_move: int) -> np.ndarray:
    """Move at most ``max_move`` slots per layer from ``old`` towards ``target``.

    Layers within the bound take ``target`` as is. Elsewhere a greedy walk applies the
    slot changes of ``target`` (one slot, or two slots where one alone would lose an
    expert or duplicate one) that most reduce the layer's max rank load per slot moved,
    then its sum of squared rank loads; it stops at the bound or when no change helps.
    So the result is always valid and never worse than ``old``.

    ``old, target [L, R, K]``, ``expert_load [L, E]`` -> ``[L, R, K]``.
    """
    out = target.copy()
    for l in np.flatnonzero(changed_slots(old, target) > max_move):
        out[l] = _walk_towards(old[l], target[l], expert_load[l], max_move)
    return out


def _walk_towards(cur: np.ndarray, goal: np.ndarray, w: np.ndarray, budget: int) -> np.ndarray:
    cur = cur.copy()
    E = w.shape[0]
    score = _rank_peak(cur, w)
    while budget > 0:
        diff = [tuple(x) for x in np.argwhere(cur != goal)]
        best = None
        for s in diff:
            # Partners: a slot that receives the expert `s` gives up, or the slot on the
            # same rank that holds the expert `s` receives.
            partners = [p for p in diff if p != s and (goal[p] == cur[s] or (p[0] == s[0] and cur[p] == goal[s]))]
            for op in [(s,)] + [(s, p) for p in partners]:
                if len(op) > budget:
                    continue
                trial = cur.copy()
                for p in op:
                    trial[p] = goal[p]
                if not _valid_layer(trial, E):
                    continue
                new = _rank_peak(trial, w)
                gain = ((score[0] - new[0]) / len(op), (score[1] - new[1]) / len(op))
                if gain > (0.0, 0.0) and (best is None or gain > best[0]):
                    best = (gain, op, trial, new)
        if best is None:
            break
        _, op, cur, score = best
        budget -= len(op)
    return cur
