"""Edits between two expert tables: repair an engine's table, keep slots in place,
separate duplicates, bound moves.

All tables are ``int64 [L, R, K]`` (or ``[R, K]`` for one layer where a name says so);
``expert_load`` is ``float64 [L, E]`` (or ``[E]`` for one layer).
"""

from __future__ import annotations

import numpy as np

from .placement import InvalidExpertTable, changed_slots

__all__ = ["repair_table", "preserve_slots", "moved_within_rank", "separate_duplicates", "limit_moves"]


def broken_slots(table: np.ndarray, num_experts: int) -> np.ndarray:
    """``[L, R, K]`` bool: slots that break an invariant, an id outside ``[0, E)`` (-1
    padding) or a second copy of an expert on its rank (the first copy is kept)."""
    bad = (table < 0) | (table >= num_experts)
    same = (table[..., :, None] == table[..., None, :]) & np.tri(table.shape[-1], k=-1, dtype=bool)  # [L, R, K, K]
    return bad | same.any(axis=-1)


def repair_table(table: np.ndarray, num_experts: int) -> np.ndarray:
    """The valid table closest to an engine's ``table [L, R, K]``; ``table`` itself when
    it is valid.

    Engines hold tables the invariants refuse: an old map padded with -1 (vLLM's elastic
    EP), an expert twice on one rank (vLLM's and DeepSeek's reference policies on skewed
    load), a layer missing an expert. Per broken layer, every slot in
    :func:`broken_slots` is emptied; experts no slot holds are placed first (freeing a slot
    of the most-replicated expert while there are fewer empty slots than missing
    experts), then each remaining empty slot gets the expert with the fewest replicas that
    its rank lacks. Valid slots stay. Raises :class:`InvalidExpertTable` when no valid table
    of this shape exists (``K > E`` or ``R * K < E``).
    """
    L, R, K = table.shape
    E = int(num_experts)
    if K > E or R * K < E:
        raise InvalidExpertTable(
            f"no valid table has {R} ranks x {K} slots for {E} experts: every rank needs {K} distinct experts "
            f"and every expert a slot; such a table must hold an expert twice on a rank or drop one."
        )
    # Cheap screen first (a valid table is the common case): per layer, a repeat or an
    # id out of range in the per-rank sorted rows.
    srt = np.sort(table, axis=-1)
    suspect = ((srt[..., 1:] == srt[..., :-1]).any(axis=(1, 2)) | (srt[..., 0] < 0).any(axis=1)
               | (srt[..., -1] >= E).any(axis=1))  # [L]
    broken = np.zeros(table.shape, dtype=bool)
    broken[suspect] = broken_slots(table[suspect], E)
    valid = np.where(broken, E, table)  # E: an empty slot, counted in a spare bin
    key = valid.reshape(L, -1) + (np.arange(L) * (E + 1))[:, None]
    counts = np.bincount(key.ravel(), minlength=L * (E + 1)).reshape(L, E + 1)
    todo = np.flatnonzero(broken.reshape(L, -1).any(axis=1) | (counts[:, :E] == 0).any(axis=1))
    if not todo.size:
        return table
    out = valid.copy()
    for l in todo:
        _repair_layer(out[l], counts[l, :E])
    return out


def _repair_layer(t: np.ndarray, counts: np.ndarray) -> None:
    """Fill the empty slots (value ``E``) of one layer ``t [R, K]`` in place."""
    E = counts.shape[0]
    missing = list(np.flatnonzero(counts == 0))
    while (t == E).sum() < len(missing):  # free a replica of the most-replicated expert
        e = int(np.argmax(counts))
        r, k = np.argwhere(t == e)[-1]
        t[r, k] = E
        counts[e] -= 1
    for r, k in np.argwhere(t == E):
        if missing:  # an expert no slot holds fits any rank
            e = missing.pop(0)
        else:
            lacking = np.setdiff1d(np.arange(E), t[r])
            e = int(lacking[np.argmin(counts[lacking])])
        t[r, k] = e
        counts[e] += 1


def preserve_slots(old: np.ndarray, new: np.ndarray) -> np.ndarray:
    """Reorder each rank's slots in ``new`` so that an expert the rank already held keeps
    its old slot; the set of experts per rank is unchanged. ``[L, R, K]`` -> ``[L, R, K]``.

    A policy that only decides *which* experts a rank holds calls this so that the engine
    does not copy weights between slots of one rank for nothing.
    """
    # Most plans already keep slots (swaps and recounts write in place): only ranks where
    # a changed slot receives an expert the rank held elsewhere need matching.
    L, R, K = new.shape
    li, ri, ki = np.nonzero(old != new)
    arrived = (new[li, ri, ki][:, None] == old[li, ri]).any(axis=1)
    rows = np.unique(li[arrived] * R + ri[arrived])  # flat (layer, rank) ids
    out = new.copy()
    if rows.size:
        flat = out.reshape(L * R, K)
        flat[rows] = _match_slots(old.reshape(L * R, K)[rows], flat[rows])
    return out


def _match_slots(old: np.ndarray, new: np.ndarray) -> np.ndarray:
    """:func:`preserve_slots` on the rank contents ``old, new [m, K]`` (rows)."""
    if old.min(initial=0) < 0 or _duplicate_layers(old[:, None]).any() or _duplicate_layers(new[:, None]).any():
        return _preserve_slots_multiset(old[:, None], new[:, None])[:, 0]  # -1 padding or a repeat
    stays = (old[:, :, None] == new[:, None, :]).any(axis=2)  # [m, K]: old slots whose expert the rank keeps
    comes = ~(new[:, :, None] == old[:, None, :]).any(axis=2)  # [m, K]: new entries the rank did not hold
    out = np.where(stays, old, -1)
    _fill_free(out, new, ~stays, comes)
    return out


def _duplicate_layers(table: np.ndarray) -> np.ndarray:
    """``[L]`` bool: the layers of ``table [L, R, K]`` where a rank holds an expert twice."""
    srt = np.sort(table, axis=-1)
    return (srt[..., 1:] == srt[..., :-1]).any(axis=(1, 2))


def _fill_free(out: np.ndarray, new: np.ndarray, free: np.ndarray, comes: np.ndarray) -> None:
    """Write the newcomers of ``new`` (``comes``) into the ``free`` slots of ``out`` in
    order (all ``[m, K]``; as many of one as of the other per row)."""
    K = out.shape[-1]
    free_slots = np.argsort(~free, axis=-1, kind="stable")  # free slots first, in order
    newcomers = np.argsort(~comes, axis=-1, kind="stable")
    rows, j = np.nonzero(np.arange(K) < comes.sum(axis=-1, keepdims=True))
    out[rows, free_slots[rows, j]] = new[rows, newcomers[rows, j]]


def _preserve_slots_multiset(old: np.ndarray, new: np.ndarray) -> np.ndarray:
    """:func:`preserve_slots` for tables holding an expert twice on a rank or padded with
    -1 (rare: engines' tables, never a validated plan), rank by rank: an old slot keeps its expert while the
    new rank still holds an unplaced copy of it."""
    out = np.full_like(new, -1)
    for l, r in np.ndindex(*new.shape[:2]):
        left = list(new[l, r])
        for k, e in enumerate(old[l, r]):
            if e in left:
                out[l, r, k] = e
                left.remove(e)
        out[l, r, out[l, r] == -1] = left
    return out


def moved_within_rank(old: np.ndarray, new: np.ndarray) -> np.ndarray:
    """``[L, R]`` bool: rank ``r`` of layer ``l`` holds an expert in both tables but in a
    different slot (tables ``[L, R, K]``).

    Engines that move weights per slot (vLLM Ascend's ``check_expert_placement``) reject
    such a layer: the weights are already on the rank, so a plan must leave them where
    they are. :func:`preserve_slots` turns any plan into one without such moves.
    """
    held_before = (new[..., :, None] == old[..., None, :]).any(axis=-1)  # [L, R, K]
    return (held_before & (new != old)).any(axis=-1)


def separate_duplicates(table: np.ndarray, expert_load: np.ndarray) -> np.ndarray:
    """Swap replicas until no rank holds one expert twice, choosing the swap partner whose
    per-replica load is closest so that rank loads barely change. ``[L, R, K]`` in, new
    array out. Greedy packers produce duplicates only on ties (e.g. all-zero load).
    """
    out = table.copy()
    for l in np.flatnonzero(_duplicate_layers(out)):
        out[l] = _separate_layer(out[l], expert_load[l])
    return out


def _separate_layer(t: np.ndarray, w: np.ndarray) -> np.ndarray:
    R, K = t.shape
    cnt = np.bincount(t.ravel(), minlength=w.shape[0])
    per_replica = w / np.maximum(cnt, 1)
    for _ in range(t.size):
        dups = [(r, e) for r in range(R) for e, c in zip(*np.unique(t[r], return_counts=True), strict=True) if c > 1]
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


def limit_moves(old: np.ndarray, target: np.ndarray, expert_load: np.ndarray, max_move: int) -> np.ndarray:
    """Move at most ``max_move`` slots per layer from ``old`` towards ``target``.

    Layers within the bound take ``target`` as is. Elsewhere a greedy walk applies, one at
    a time, the slot change of ``target`` that most reduces the layer's max rank load per
    slot moved (then its sum of squared rank loads). A change that alone would lose an
    expert or put one twice on a rank is tried as a pair with its partner slot (costing
    2). It stops at the bound or when no change helps, so the result is always valid and
    never worse than ``old``.

    ``old, target [L, R, K]``, ``expert_load [L, E]`` -> ``[L, R, K]``.
    """
    out = target.copy()
    for l in np.flatnonzero(changed_slots(old, target) > max_move):
        out[l] = _walk_towards(old[l], target[l], expert_load[l], max_move)
    return out


def _single_change_peaks(cur: np.ndarray, goal: np.ndarray, w: np.ndarray, slots: np.ndarray):
    """Score every one-slot change ``cur[r, k] -> goal[r, k]`` for ``slots [n, 2]`` at once.

    Returns ``valid [n]`` (the change keeps the table valid), ``peak [n]`` and ``sq [n]``
    (max and sum of squared rank loads after the change). Only the experts given up (a)
    and received (b) change their per-replica load, on the ranks that hold them.
    """
    R = cur.shape[0]
    cnt = np.bincount(cur.ravel(), minlength=w.shape[0]).astype(np.float64)
    holds = np.zeros((R, w.shape[0]), dtype=bool)  # [R, E]
    holds[np.arange(R)[:, None], cur] = True
    loads = (w[cur] / cnt[cur]).sum(axis=1)  # [R]
    r, k = slots[:, 0], slots[:, 1]
    a, b = cur[r, k], goal[r, k]
    valid = (cnt[a] >= 2) & ~holds[r, b]
    a_after = w[a] / np.maximum(cnt[a] - 1, 1)  # per-replica load of a once it has one replica less
    b_after = w[b] / (cnt[b] + 1)
    new = (loads[None, :] + holds[:, a].T * (a_after - w[a] / cnt[a])[:, None]
           + holds[:, b].T * (b_after - w[b] / cnt[b])[:, None])  # [n, R]
    n = np.arange(len(slots))
    new[n, r] += b_after - a_after  # rank r gives up its replica of a and takes one of b
    return valid, new.max(axis=1), np.einsum("nr,nr->n", new, new)


def _pair_change_peaks(cur: np.ndarray, goal: np.ndarray, w: np.ndarray, pairs: np.ndarray):
    """Score two-slot changes ``pairs [P, 2, 2]`` (two (rank, slot) each) at once.

    Returns ``valid [P]``, ``peak [P]``, ``sq [P]`` as ``_single_change_peaks`` does.
    """
    P, E = len(pairs), w.shape[0]
    trial = np.broadcast_to(cur, (P, *cur.shape)).copy()  # [P, R, K]
    n = np.arange(P)
    for j in range(2):
        r, k = pairs[:, j, 0], pairs[:, j, 1]
        trial[n, r, k] = goal[r, k]
    flat = trial.reshape(P, -1)
    cnt = np.bincount((flat + (n * E)[:, None]).ravel(), minlength=P * E).reshape(P, E)
    srt = np.sort(trial, axis=-1)
    valid = (cnt.min(axis=1) > 0) & ~np.any(srt[..., 1:] == srt[..., :-1], axis=(1, 2))
    loads = (w[trial] / np.maximum(np.take_along_axis(cnt, flat, axis=1), 1).reshape(trial.shape)).sum(axis=-1)
    return valid, loads.max(axis=1), np.einsum("pr,pr->p", loads, loads)


def _walk_towards(cur: np.ndarray, goal: np.ndarray, w: np.ndarray, budget: int) -> np.ndarray:
    cur = cur.copy()
    peak, sq = _rank_peak(cur, w)
    while budget > 0:
        slots = np.argwhere(cur != goal)  # [n, 2]
        if not len(slots):
            break
        valid, peaks, sqs = _single_change_peaks(cur, goal, w, slots)
        ops = [slots[valid][:, None, :]]  # [n1, 1, 2]
        gains = [np.stack([peak - peaks[valid], sq - sqs[valid]], axis=1)]
        if budget >= 2 and not valid.all():
            # A change that alone would lose an expert or duplicate one pairs with the slot
            # that receives the expert it gives up, or the same-rank slot holding the expert
            # it receives.
            cur_at, goal_at = cur[slots[:, 0], slots[:, 1]], goal[slots[:, 0], slots[:, 1]]
            same_rank = slots[:, None, 0] == slots[None, :, 0]
            partner = (goal_at[None, :] == cur_at[:, None]) | (same_rank & (cur_at[None, :] == goal_at[:, None]))
            partner &= ~valid[:, None] & ~np.eye(len(slots), dtype=bool)
            i, j = np.nonzero(partner)
            if len(i):
                pairs = np.stack([slots[i], slots[j]], axis=1)  # [P, 2, 2]
                ok, p_peaks, p_sqs = _pair_change_peaks(cur, goal, w, pairs)
                ops.append(pairs[ok])
                gains.append(np.stack([peak - p_peaks[ok], sq - p_sqs[ok]], axis=1) / 2)  # per slot moved
        gain = np.concatenate(gains)
        better = (gain[:, 0] > 0) | ((gain[:, 0] == 0) & (gain[:, 1] > 0))
        if not better.any():
            break
        idx = np.flatnonzero(better)
        best = idx[np.lexsort((gain[idx, 1], gain[idx, 0]))[-1]]
        op = [o for group in ops for o in group][best]
        for r, k in op:
            cur[r, k] = goal[r, k]
        budget -= len(op)
        peak, sq = _rank_peak(cur, w)
    return cur
