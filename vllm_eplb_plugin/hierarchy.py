"""Hierarchical placement for any :class:`~.policy.PlacementPolicy`: expert groups on nodes.

With group-limited routing (DeepSeek-V3: 8 groups, a token reaches at most 4 of them) a
token's experts sit in few groups; if every replica of a group stays inside one node, a
token also reaches few nodes, which is what keeps inter-node traffic bounded. DeepSeek's
EPLB does this itself (``policies/deepseek.py``); every other ``PlacementPolicy`` gets it
here, in three steps, all layers at once:

1. **Groups -> nodes.** ``G / N`` groups per node: group loads packed heaviest first into
   the lightest node with room (DeepSeek's ``pack``). Where the current table already
   keeps groups on nodes and its heaviest node is at most ``KEEP_SPLIT_SLACK`` (1 %)
   heavier than the packing's, its split is kept instead: re-packing moves whole groups,
   and greedy packing is not optimal either.
   Nodes are interchangeable, so the packing's node labels are then matched to the
   physical nodes that hold most of their experts now (``search.align_ranks`` on nodes):
   experts stay on their node wherever the balance allows.
2. **Per node.** Each node is a sub-problem with node-local expert ids ``[0, E / N)``,
   its ``R / N`` ranks and the current table's slots of its experts; slots holding an
   expert that now belongs to another node are -1 and repaired (``repair_table``). All
   ``L * N`` sub-problems go to ONE ``policy.place`` call (the batch dimension), so a
   policy vectorised over layers is vectorised over nodes too.
3. **Back.** Node-local ids are mapped back to global ids and the nodes' ranks laid side
   by side: node ``n`` owns ranks ``[n * R / N, (n + 1) * R / N)``, as in DeepSeek's.

Where it cannot apply, the policy places globally and a warning (once per process and
reason) says why and what to change: ``num_groups % num_nodes != 0``, ``E % num_groups !=
0``, ``R % num_nodes != 0``, or ``K > E / N`` (a node's ranks cannot be filled with
distinct experts). ``num_nodes == 1`` or ``num_groups == 1`` (no group-limited routing,
vLLM's value for most models) is global placement, silently.

Shapes: ``table [L, R, K]``, ``heat [T, L, E]``, ``expert_load [L, E]``; ``G`` groups,
``N`` nodes, ``RN = R / N`` ranks and ``EN = E / N`` experts per node.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import numpy as np

from .moves import repair_table
from .placement import validate_table

if TYPE_CHECKING:
    from .policy import PlacementPolicy

logger = logging.getLogger("vllm_eplb_plugin")

KEEP_SPLIT_SLACK = 0.01
"""The current table's groups -> nodes split is kept while its heaviest node is at most
this fraction heavier than the packing's. Loads drift between plans and greedy packing
answers with a different split, which moves whole groups; on 8 layers of DeepSeek-V3
EP32 x 9 over 4 nodes (``benchmarks.traces``, mild / heavy skew, 5 plans) 1 % cut
swift's steady moves from 0.36 / 0.24 to 0.26 / 0.18 of the slots with the next
window's peak unchanged (1.117 / 1.206 -> 1.117 / 1.203 of the bound); 3 % cost 0.3 %."""

__all__ = ["KEEP_SPLIT_SLACK", "applies", "respects_groups", "place_in_nodes", "why_global", "current_groups",
           "assign_groups", "node_experts", "split_nodes", "join_nodes"]


def why_global(num_experts: int, num_ranks: int, slots_per_rank: int, num_groups: int, num_nodes: int) -> str | None:
    """Why hierarchical placement cannot apply to this shape, with the fix; None if it can
    (or if ``num_nodes == 1`` or ``num_groups == 1``, where global placement is all there is)."""
    E, R, K, G, N = num_experts, num_ranks, slots_per_rank, num_groups, num_nodes
    if N == 1 or G == 1:
        return None
    if G % N:
        return (f"num_groups={G} is not a multiple of num_nodes={N}; set num_groups to the model's expert groups "
                f"(a multiple of num_nodes) to keep groups on nodes")
    if E % G:
        return f"num_groups={G} does not divide the {E} experts; set num_groups to a divisor of {E}"
    if R % N:
        return f"num_nodes={N} does not divide the {R} ranks; set num_nodes to a divisor of {R}"
    if K > E // N:
        return (f"{K} slots per rank exceed the {E // N} experts each of num_nodes={N} nodes holds; "
                f"lower num_nodes to keep groups on nodes")
    return None


def _node_peak(group_load: np.ndarray, group_node: np.ndarray, num_nodes: int) -> np.ndarray:
    """Heaviest node's load ``[L]`` for groups ``group_node [L, G]`` of ``group_load [L, G]``."""
    L = group_load.shape[0]
    node_load = np.zeros((L, num_nodes))
    np.add.at(node_load, (np.arange(L)[:, None], group_node), group_load)
    return node_load.max(axis=1)


def current_groups(table: np.ndarray, num_groups: int, num_nodes: int,
                   num_experts: int) -> tuple[np.ndarray, np.ndarray]:
    """The node each group sits on in ``table [L, R, K]``: ``group_node [L, G]`` and
    ``respects [L]``, whether every group's slots are on one node and every node holds
    ``G / N`` groups (elsewhere ``group_node`` is meaningless)."""
    L, R, K = table.shape
    G, N = num_groups, num_nodes
    group = table // (num_experts // G)  # [L, R, K]
    node = np.broadcast_to((np.arange(R) // (R // N))[None, :, None], table.shape)
    hits = np.zeros((L, G, N), dtype=np.int64)
    np.add.at(hits, (np.broadcast_to(np.arange(L)[:, None, None], table.shape), group, node), 1)
    group_node = hits.argmax(axis=2)
    one_node = ((hits > 0).sum(axis=2) == 1).all(axis=1)
    per_node = (group_node[:, :, None] == np.arange(N)).sum(axis=1)  # [L, N]: groups per node
    return group_node, one_node & (per_node == G // N).all(axis=1)


def assign_groups(table: np.ndarray, expert_load: np.ndarray, num_groups: int, num_nodes: int) -> np.ndarray:
    """The physical node of every group, ``[L, G]`` (step 1 of the module docstring).

    ``table [L, R, K]`` current (valid), ``expert_load [L, E]``.
    """
    from .policies.deepseek import pack  # imported here: the policies import policy.py, which imports us
    from .policies.search import align_ranks

    L, E = expert_load.shape
    G, N = num_groups, num_nodes
    group_load = expert_load.reshape(L, G, E // G).sum(axis=2)  # [L, G]
    packed, _ = pack(group_load, N)  # [L, G], node labels of the packing
    now, respects = current_groups(table, G, N, E)
    keep = respects & (_node_peak(group_load, now, N) <= (1 + KEEP_SPLIT_SLACK) * _node_peak(group_load, packed, N))
    group_node = np.where(keep[:, None], now, packed)
    # Relabel: physical node n takes the label whose experts it holds most of now. Node
    # "tables" are the experts on each node's slots ([L, N, RN * K]) and each label's
    # experts ([L, N, EN]); align_ranks matches rows by overlap, as it does for ranks.
    expert_label = np.repeat(group_node, E // G, axis=1)  # [L, E]
    placed = align_ranks(table.reshape(L, N, -1), node_experts(expert_label, N), E)  # [L, N, EN], row = node
    # Row n of ``placed`` is one label's experts; its first expert names the label.
    node_label = np.take_along_axis(expert_label, placed[:, :, 0], axis=1)  # [L, N]
    label_node = np.empty((L, N), dtype=np.int64)
    np.put_along_axis(label_node, node_label, np.broadcast_to(np.arange(N), (L, N)), axis=1)
    return np.take_along_axis(label_node, group_node, axis=1)


def node_experts(expert_node: np.ndarray, num_nodes: int) -> np.ndarray:
    """The global ids of each node's experts in ascending order, ``[L, N, EN]``, from
    ``expert_node [L, E]`` (every node holds ``EN`` experts). Entry ``[l, n, j]`` is the
    expert whose node-local id on node ``n`` is ``j``."""
    L, E = expert_node.shape
    return np.argsort(expert_node, axis=1, kind="stable").reshape(L, num_nodes, E // num_nodes)


def split_nodes(table: np.ndarray, heat: np.ndarray, experts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-node sub-problems, batched: ``table [L, R, K]``, ``heat [T, L, E]``, node
    experts ``experts [L, N, EN]`` -> valid ``sub_table [L * N, RN, K]`` (node-local ids)
    and ``sub_heat [T, L * N, EN]``. Slots holding another node's expert are repaired."""
    L, R, K = table.shape
    _, N, EN = experts.shape
    T, E = heat.shape[0], heat.shape[2]
    flat = experts.reshape(L, E)
    local = np.empty((L, E), dtype=np.int64)  # node-local id of every expert
    np.put_along_axis(local, flat, np.broadcast_to(np.arange(E) % EN, (L, E)), axis=1)
    node = np.empty((L, E), dtype=np.int64)
    np.put_along_axis(node, flat, np.broadcast_to(np.arange(E) // EN, (L, E)), axis=1)
    li = np.arange(L)[:, None, None]
    slot_node = (np.arange(R) // (R // N))[None, :, None]
    # -1 where the slot's expert moves to another node (e.g. vLLM's linear start).
    sub = np.where(node[li, table] == slot_node, local[li, table], -1).reshape(L * N, R // N, K)
    sub_heat = np.take_along_axis(heat, np.broadcast_to(flat[None], (T, L, E)), axis=2).reshape(T, L * N, EN)
    return repair_table(sub, EN), sub_heat


def join_nodes(sub_table: np.ndarray, experts: np.ndarray) -> np.ndarray:
    """Inverse of :func:`split_nodes` for tables: ``sub_table [L * N, RN, K]`` (node-local
    ids) and ``experts [L, N, EN]`` -> ``table [L, R, K]`` with global ids."""
    L, N, _ = experts.shape
    _, RN, K = sub_table.shape
    local = sub_table.reshape(L, N, RN * K)
    return np.take_along_axis(experts, local, axis=2).reshape(L, N * RN, K)


_warned: set[str] = set()  # reasons already logged: vLLM's EplbState plans every few hundred steps


def applies(policy: PlacementPolicy, table_shape: tuple[int, int, int], num_experts: int) -> bool:
    """Whether ``policy`` places groups on nodes for this shape (logs why not, once)."""
    _, R, K = table_shape
    G, N = policy.config.num_groups, policy.config.num_nodes
    if not policy.hierarchical or N == 1 or G == 1:
        return False
    reason = why_global(num_experts, R, K, G, N)
    if reason is not None and reason not in _warned:
        _warned.add(reason)
        logger.warning("%s: placing globally, not groups on nodes: %s", policy.name or type(policy).__name__, reason)
    return reason is None


def respects_groups(policy: PlacementPolicy, table: np.ndarray, num_experts: int) -> np.ndarray:
    """``[L]``: whether each layer of ``table [L, R, K]`` keeps every group on one node
    where ``policy`` places hierarchically (True everywhere where it does not), so that
    the template never keeps a current layer that spreads groups over nodes."""
    if not applies(policy, table.shape, num_experts):
        return np.ones(table.shape[0], dtype=bool)
    return current_groups(table, policy.config.num_groups, policy.config.num_nodes, num_experts)[1]


def place_in_nodes(policy: PlacementPolicy, table: np.ndarray, heat: np.ndarray, expert_load: np.ndarray) -> np.ndarray:
    """``policy.place`` with every group's replicas inside one node where the policy is
    ``hierarchical`` and ``policy.config`` asks for it; ``policy.place`` as is otherwise.

    ``table [L, R, K]`` (valid), ``heat [T, L, E]``, ``expert_load [L, E]`` -> ``[L, R, K]``.
    """
    L, R, K = table.shape
    E = expert_load.shape[1]
    G, N = policy.config.num_groups, policy.config.num_nodes
    if not applies(policy, table.shape, E):
        return policy.place(table, heat, expert_load)
    group_node = assign_groups(table, expert_load, G, N)  # [L, G]
    experts = node_experts(np.repeat(group_node, E // G, axis=1), N)  # [L, N, EN]
    sub_table, sub_heat = split_nodes(table, heat, experts)
    sub_load = np.take_along_axis(expert_load, experts.reshape(L, E), axis=1).reshape(L * N, E // N)
    label = f"{policy.name or type(policy).__name__}.place() result (node-local, one row per layer x node)"
    sub_target = validate_table(policy.place(sub_table, sub_heat, sub_load), E // N, name=label)
    return join_nodes(sub_target, experts)
