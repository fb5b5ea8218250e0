"""DeepSeek's EPLB algorithm, vectorised over layers.

Replicate the experts with the highest load per replica into the redundant slots, then
pack the replicas onto ranks greedily (heaviest first, into the lightest rank that still
has a free slot). Hierarchical when ``num_groups % num_nodes == 0``: expert groups are
first packed onto nodes, and replication and packing happen inside each node; otherwise
global (one group, one node), as vLLM's ``DefaultEplbPolicy`` does.

Differences from the reference, all only where the reference would put one expert twice
on a rank (which our invariants forbid): an expert gets at most one replica per rank of
its node; packing sends a replica to the lightest open rank that does not hold its expert
yet; and if no such rank is open, a load-neutral swap separates the pair afterwards.
Within a rank, experts the rank already held keep their slots (the template does it).
"""

from __future__ import annotations

import logging

import numpy as np

from ..moves import separate_duplicates
from ..policy import PlacementPolicy

logger = logging.getLogger("vllm_eplb_plugin")

__all__ = ["DeepSeekPolicy", "replicate", "pack", "deepseek_phy2log"]


def replicate(weight: np.ndarray, num_phy: int, cap: int) -> tuple[np.ndarray, np.ndarray]:
    """Give ``num_phy - n`` extra replicas, one at a time, to the item with the largest
    load per replica (first on ties), at most ``cap`` replicas per item.

    ``weight [X, n]`` -> ``phy2log [X, num_phy]`` (items ``0..n-1`` first, then the extra
    replicas in the order given), ``count [X, n]``.
    """
    X, n = weight.shape
    rows = np.arange(X)
    phy2log = np.empty((X, num_phy), dtype=np.int64)
    phy2log[:, :n] = np.arange(n)
    count = np.ones((X, n), dtype=np.int64)
    per_replica = np.where(count < cap, weight.astype(np.float64), -np.inf)  # updated in place: one item per step
    for i in range(n, num_phy):
        pick = per_replica.argmax(axis=1)
        phy2log[:, i] = pick
        count[rows, pick] += 1
        c = count[rows, pick]
        per_replica[rows, pick] = np.where(c < cap, weight[rows, pick] / c, -np.inf)
    return phy2log, count


def pack(weight: np.ndarray, num_packs: int, labels: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Pack ``n`` items into ``num_packs`` packs of ``n / num_packs`` items: heaviest item
    first, into the lightest pack that is not full (lowest index on ties).

    ``labels [X, n]`` (optional, ids in ``[0, n)``): an item avoids packs that already hold
    an item with its label, unless every open pack does. This only changes the result where
    plain greedy would put two replicas of one expert on one rank.

    ``weight [X, n]`` -> ``pack_of [X, n]``, ``rank_in_pack [X, n]``.
    """
    X, n = weight.shape
    cap = n // num_packs
    if cap == 1:  # one item per pack: item i goes to pack i, as in the reference
        return np.broadcast_to(np.arange(n), (X, n)).copy(), np.zeros((X, n), dtype=np.int64)
    rows = np.arange(X)
    order = np.argsort(-weight, axis=1, kind="stable")
    pack_w = np.zeros((X, num_packs))
    pack_n = np.zeros((X, num_packs), dtype=np.int64)
    holds = np.zeros((X, num_packs, n if labels is not None else 0), dtype=bool)  # [X, packs, label]
    pack_of = np.empty((X, n), dtype=np.int64)
    rank_in_pack = np.empty((X, n), dtype=np.int64)
    for j in range(n):
        item = order[:, j]
        open_w = np.where(pack_n < cap, pack_w, np.inf)
        if labels is not None:
            label = labels[rows, item]
            avoid = np.where(holds[rows, :, label], np.inf, open_w)
            open_w = np.where(np.isfinite(avoid).any(axis=1, keepdims=True), avoid, open_w)
        p = open_w.argmin(axis=1)
        pack_of[rows, item] = p
        rank_in_pack[rows, item] = pack_n[rows, p]
        pack_w[rows, p] += weight[rows, item]
        pack_n[rows, p] += 1
        if labels is not None:
            holds[rows, p, label] = True
    return pack_of, rank_in_pack


def _inverse(perm: np.ndarray) -> np.ndarray:
    """Row-wise inverse of permutations ``[X, n]``."""
    inv = np.empty_like(perm)
    np.put_along_axis(inv, perm, np.arange(perm.shape[1]), axis=1)
    return inv


def deepseek_phy2log(weight: np.ndarray, num_ranks: int, slots_per_rank: int,
                     num_groups: int = 1, num_nodes: int = 1) -> np.ndarray:
    """DeepSeek placement. ``weight [L, E]`` -> ``phy2log [L, S]``, ``S = R * K``.

    Hierarchical when ``num_groups % num_nodes == 0``, else global.
    """
    if num_groups % num_nodes:
        num_groups = num_nodes = 1
    L, E = weight.shape
    R, K = num_ranks, slots_per_rank
    S = R * K
    if E % num_groups:
        raise ValueError(f"num_groups={num_groups} must divide the {E} experts; set num_groups to a divisor of {E}.")
    if R % num_nodes:
        raise ValueError(f"num_nodes={num_nodes} must divide the {R} ranks; set num_nodes to a divisor of {R}.")
    if K > E // num_nodes:
        # Each node hosts E/N experts with at most one replica per rank: K slots per rank
        # cannot be filled without putting one expert on a rank twice.
        raise ValueError(
            f"hierarchical placement puts {E // num_nodes} experts on each of {num_nodes} nodes, fewer than "
            f"the {K} slots per rank; lower num_nodes (or set num_groups so that num_groups % num_nodes != 0)."
        )
    G, N = num_groups, num_nodes
    group_size = E // G

    # 1. Pack expert groups onto nodes and renumber experts node-major ("mlog").
    group_node, group_rank = pack(weight.reshape(L, G, group_size).sum(axis=-1), N)  # [L, G]
    log2mlog = (((group_node * (G // N) + group_rank) * group_size)[:, :, None]
                + np.arange(group_size)).reshape(L, E)
    mlog2log = _inverse(log2mlog)

    # 2. Replicate inside each node; an expert has at most one replica per rank.
    node_weight = np.take_along_axis(weight, mlog2log, axis=1).reshape(L * N, E // N)
    p2m, count = replicate(node_weight, S // N, cap=R // N)  # [L*N, S/N], [L*N, E/N]

    # 3. Pack the node's replicas onto its ranks; scatter them into slot order.
    replica_load = np.take_along_axis(node_weight / count, p2m, axis=1)
    rank, slot = pack(replica_load, R // N, labels=p2m)
    node_slot2m = np.empty_like(p2m)
    np.put_along_axis(node_slot2m, rank * K + slot, p2m, axis=1)
    slot2mlog = (node_slot2m.reshape(L, N, S // N) + (np.arange(N) * (E // N))[None, :, None]).reshape(L, S)
    return np.take_along_axis(mlog2log, slot2mlog, axis=1)


class DeepSeekPolicy(PlacementPolicy):
    """DeepSeek's EPLB: replicate the hottest experts, pack replicas onto ranks greedily."""

    name = "deepseek"
    keep_unimproved = False  # every layer re-placed, as the reference does (same rank sets)
    hierarchical = False  # does its own groups -> nodes -> ranks (deepseek_phy2log)

    def place(self, table: np.ndarray, heat: np.ndarray, expert_load: np.ndarray) -> np.ndarray:
        L, R, K = table.shape
        groups, nodes = self.config.num_groups, self.config.num_nodes
        E = expert_load.shape[1]
        if groups % nodes == 0 and K > E // nodes:
            # Hierarchical placement keeps E / N experts per node: K slots per rank cannot be
            # filled without an expert twice on a rank. Global placement can.
            logger.warning("deepseek: %d slots per rank exceed the %d experts each of num_nodes=%d nodes holds; "
                           "placing globally (lower num_nodes to keep groups on nodes)", K, E // nodes, nodes)
            groups = nodes = 1
        target = deepseek_phy2log(expert_load, R, K, groups, nodes)
        return separate_duplicates(target.reshape(L, R, K), expert_load)
