"""Hierarchical placement (expert groups kept on nodes) for the search-based policies,
against hand-computed group packings, exhaustive search and DeepSeek's own hierarchy."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from benchmarks.exact import best_peak
from vllm_eplb_plugin import PolicyConfig, create_policy, hierarchy
from vllm_eplb_plugin.hierarchy import current_groups, join_nodes, node_experts, split_nodes
from vllm_eplb_plugin.placement import (
    InvalidExpertTable,
    changed_slots,
    default_table,
    expert_to_slot_load,
    logcnt,
    rank_load,
    validate_table,
)
from vllm_eplb_plugin.policies.deepseek import DeepSeekPolicy, deepseek_phy2log
from vllm_eplb_plugin.policies.optimal import OptimalPolicy
from vllm_eplb_plugin.policies.random import RandomPolicy

SEARCH_POLICIES = ["swift", "optimal", "flashlb"]


def nodes_of_groups(table: np.ndarray, num_groups: int, num_nodes: int, num_experts: int) -> list[list[set]]:
    """Per layer, per group: the set of nodes whose ranks hold one of its experts."""
    L, R, K = table.shape
    out = []
    for l in range(L):
        seen = [set() for _ in range(num_groups)]
        for r, k in itertools.product(range(R), range(K)):
            seen[table[l, r, k] // (num_experts // num_groups)].add(r // (R // num_nodes))
        out.append(seen)
    return out


def experts_of_node(table: np.ndarray, num_nodes: int) -> list[list[frozenset]]:
    """Per layer, per node: the set of experts its ranks hold."""
    L, R, _ = table.shape
    per = R // num_nodes
    return [[frozenset(table[l, n * per:(n + 1) * per].ravel().tolist()) for n in range(num_nodes)] for l in range(L)]


def node_of_expert(table: np.ndarray, num_nodes: int) -> np.ndarray:
    """``[L, E]``: the node holding each expert (the table must keep experts on one node)."""
    L, R, _ = table.shape
    out = np.full((L, table.max() + 1), -1)
    for l, r, k in np.ndindex(table.shape):
        n = r // (R // num_nodes)
        assert out[l, table[l, r, k]] in (-1, n), "expert on two nodes"
        out[l, table[l, r, k]] = n
    return out


@pytest.mark.parametrize("name", SEARCH_POLICIES)
def test_groups_stay_on_one_node_from_the_linear_start(name):
    # DeepSeek-like: 64 experts in 8 groups, 4 nodes of 2 ranks, 9 slots per rank (8 redundant).
    E, R, K, G, N, L = 64, 8, 9, 8, 4, 3
    rng = np.random.default_rng(7)
    heat = rng.gamma(0.5, 100.0, (4, L, E))  # [T, L, E]: per-step, so flashlb sees variance
    table = default_table(L, R, K, E)  # vLLM's linear start spreads group 0 over nodes 0 and 3
    assert any(len(s) > 1 for s in nodes_of_groups(table, G, N, E)[0])
    workload = expert_to_slot_load(table, heat)  # [T, L, R, K]
    new = create_policy(name, PolicyConfig(num_groups=G, num_nodes=N)).rebalance_experts(table, workload).new_table
    validate_table(new, E)
    for l, seen in enumerate(nodes_of_groups(new, G, N, E)):
        assert all(len(s) == 1 for s in seen), (l, seen)
    # Each node holds exactly the experts of G / N groups, and the partition of groups into
    # nodes is DeepSeek's (same greedy packing of group loads; node labels may differ).
    ref = deepseek_phy2log(heat.sum(axis=0), R, K, G, N).reshape(L, R, K)
    for l in range(L):
        ours, theirs = experts_of_node(new, N)[l], experts_of_node(ref, N)[l]
        for node in ours:
            groups = {e // (E // G) for e in node}
            assert len(groups) == G // N and node == {e for g in groups for e in range(g * 8, g * 8 + 8)}
        assert set(ours) == set(theirs)


@pytest.mark.parametrize("name", SEARCH_POLICIES)
def test_node_local_solve_matches_exhaustive_search(name):
    # 8 experts in 4 groups of 2, 2 nodes of 2 ranks x 3 slots. Group loads 9, 5, 4, 2;
    # greedy packing: 9 -> A, 5 -> B, 4 -> B (5 < 9), 2 -> A (B full): A = {0, 3} holds
    # experts {0, 1, 6, 7} (loads 5, 4, 1, 1 = 11), B = {1, 2} holds {2, 3, 4, 5} (3, 2,
    # 2, 2 = 9). By hand, A: replicas 2.5, 2.5, 2, 2, 1, 1 -> two ranks of 5.5; B: 1.5,
    # 1.5, 1, 1, 2, 2 -> two ranks of 4.5. Global optimum 5 (= 20 / 4) is out of reach.
    w = np.array([5.0, 4, 3, 2, 2, 2, 1, 1])
    E, R, K, G, N = 8, 4, 3, 4, 2
    table = default_table(1, R, K, E)
    policy = create_policy(name, PolicyConfig(num_groups=G, num_nodes=N))
    new = policy.rebalance_experts(table, expert_to_slot_load(table, w[None])).new_table
    assert set(experts_of_node(new, N)[0]) == {frozenset({0, 1, 6, 7}), frozenset({2, 3, 4, 5})}
    # Exhaustive over every split of the groups into two nodes and every table per node.
    best = min(max(best_peak(w[[2 * g + i for g in part for i in (0, 1)]], R // N, K)
                   for part in (a, tuple(sorted(set(range(G)) - set(a)))))
               for a in itertools.combinations(range(G), G // N))
    assert best == 5.5
    assert rank_load(new, w[None]).max() == pytest.approx(best)
    assert sorted(rank_load(new, w[None])[0].tolist()) == pytest.approx([4.5, 4.5, 5.5, 5.5])


def _split_table(node_groups: list[list[int]], E: int, R: int, K: int, G: int) -> np.ndarray:
    """A one-layer table ``[1, R, K]`` that keeps ``node_groups[n]`` on node ``n``, experts
    placed linearly over the node's slots (so the node itself is poorly balanced)."""
    N = len(node_groups)
    per = R // N
    rows = []
    for groups in node_groups:
        experts = [e for g in groups for e in range(g * (E // G), (g + 1) * (E // G))]
        slots = [experts[i % len(experts)] for i in range(per * K)]
        rows += [slots[r * K:(r + 1) * K] for r in range(per)]
    return validate_table(np.array([rows]), E)


@pytest.mark.parametrize("name", SEARCH_POLICIES)
@pytest.mark.parametrize("broken", [False, True])
def test_a_table_that_keeps_groups_on_nodes_keeps_its_node_assignment(name, broken):
    # Groups 1, 2 on node 0 and 0, 3 on node 1: the packing's partition (group loads 9, 5,
    # 4, 2 as above), labelled the other way round. Nodes are interchangeable, so every
    # expert must stay on its node; only the placement inside each node changes. With
    # ``broken``, one replica of group 1 sits on node 1: the split is no longer kept as
    # is, the packing is used and its labels are matched to the nodes.
    E, R, K, G, N = 16, 4, 5, 4, 2
    w = np.repeat([9.0, 5, 4, 2], 4) * np.tile([0.4, 0.3, 0.2, 0.1], 4)  # [E], skewed inside each group
    table = _split_table([[1, 2], [0, 3]], E, R, K, G)
    expected = node_of_expert(table, N)
    if broken:
        assert table[0, 3, 3] == 0 and logcnt(table, E)[0, 0] == 2
        table[0, 3, 3] = 5  # a second replica of expert 5 (group 1), on node 1
    policy = create_policy(name, PolicyConfig(num_groups=G, num_nodes=N))
    new = policy.rebalance_experts(table, expert_to_slot_load(table, w[None])).new_table
    np.testing.assert_array_equal(node_of_expert(new, N), expected)
    assert rank_load(new, w[None]).max() < rank_load(table, w[None]).max()
    # The other labelling would move all 20 slots; inside the nodes only a few change.
    assert changed_slots(table, new)[0] <= 8


def test_node_labels_follow_the_experts_they_hold():
    # 12 experts in 6 groups of 2, 2 nodes. Group loads 10, 9, 1, 1, 1, 8; greedy packing:
    # 10 -> A, 9 -> B, 8 -> B (9 < 10), then the 1s -> A, A (A full), B: A = {0, 2, 3}
    # (12), B = {1, 4, 5} (18). The current split {0, 1, 5} / {2, 3, 4} carries 27 / 3, so
    # the packing wins; node 0 holds groups 1 and 5 of B and only group 0 of A, so B goes
    # to node 0 (moving 2 groups' experts, not 4).
    E, R, K, G, N = 12, 4, 4, 6, 2
    w = np.repeat([10.0, 9, 1, 1, 1, 8], 2) / 2
    table = _split_table([[0, 1, 5], [2, 3, 4]], E, R, K, G)
    new = create_policy("optimal", PolicyConfig(num_groups=G, num_nodes=N)).rebalance_experts(
        table, expert_to_slot_load(table, w[None])).new_table
    assert experts_of_node(new, N)[0] == [frozenset({2, 3, 8, 9, 10, 11}), frozenset({0, 1, 4, 5, 6, 7})]


def test_current_group_split_is_kept_when_about_as_balanced_and_repacked_when_worse():
    E, R, K, G, N = 16, 4, 5, 4, 2
    policy = create_policy("optimal", PolicyConfig(num_groups=G, num_nodes=N))
    table = _split_table([[0, 1], [2, 3]], E, R, K, G)
    # Equal group loads: every split is as balanced as the packing's {0, 2} / {1, 3}, so the
    # current {0, 1} / {2, 3} stays (moving whole groups would gain nothing).
    w = np.tile([4.0, 3, 2, 1], 4)
    new = policy.rebalance_experts(table, expert_to_slot_load(table, w[None])).new_table
    np.testing.assert_array_equal(node_of_expert(new, N), node_of_expert(table, N))
    # Group loads 100, 99, 98, 88: the packing {0, 3} / {1, 2} carries 188 / 197; the current
    # {0, 2} / {1, 3} 198 / 187, 0.5 % heavier: within KEEP_SPLIT_SLACK (1 %), so it stays.
    table_02 = _split_table([[0, 2], [1, 3]], E, R, K, G)
    w = np.repeat([100.0, 99, 98, 88], 4) / 4
    new = policy.rebalance_experts(table_02, expert_to_slot_load(table_02, w[None])).new_table
    np.testing.assert_array_equal(node_of_expert(new, N), node_of_expert(table_02, N))
    # Group loads 10, 7, 5, 2: the current split carries 17 / 7, the packing 12 / 12.
    w = np.repeat([10.0, 7, 5, 2], 4) / 4
    new = policy.rebalance_experts(table, expert_to_slot_load(table, w[None])).new_table
    assert set(experts_of_node(new, N)[0]) == {frozenset([*range(0, 4), *range(12, 16)]), frozenset(range(4, 12))}
    # Node 0 keeps group 0 (relabelling keeps the 4 experts it can, not the 0 of the other label).
    assert node_of_expert(new, N)[0, 0] == 0


FALLBACKS = [
    # (E, R, K, G, N, message)
    (12, 4, 3, 3, 2, "num_groups=3 is not a multiple of num_nodes=2; set num_groups to the model's expert groups "
                     "(a multiple of num_nodes) to keep groups on nodes"),
    (12, 4, 3, 8, 2, "num_groups=8 does not divide the 12 experts; set num_groups to a divisor of 12"),
    (16, 6, 3, 4, 4, "num_nodes=4 does not divide the 6 ranks; set num_nodes to a divisor of 6"),
    (8, 4, 3, 4, 4, "3 slots per rank exceed the 2 experts each of num_nodes=4 nodes holds; "
                    "lower num_nodes to keep groups on nodes"),
]


@pytest.mark.parametrize("name", SEARCH_POLICIES)
@pytest.mark.parametrize("E,R,K,G,N,message", FALLBACKS)
def test_places_globally_with_a_warning_where_hierarchy_cannot_apply(caplog, monkeypatch, name, E, R, K, G, N,
                                                                    message):
    monkeypatch.setattr(hierarchy, "_warned", set())
    table = default_table(2, R, K, E)
    load = expert_to_slot_load(table, np.random.default_rng(E * R + K).gamma(0.7, 50.0, (2, E)))
    policy = create_policy(name, PolicyConfig(num_groups=G, num_nodes=N))
    with caplog.at_level("WARNING", logger="vllm_eplb_plugin"):
        new = policy.rebalance_experts(table, load).new_table
        policy.rebalance_experts(table, load)
    assert f"{name}: placing globally, not groups on nodes: {message}" in caplog.text
    assert len(caplog.records) == 1  # once per process and reason: vLLM plans every few hundred steps
    np.testing.assert_array_equal(new, create_policy(name).rebalance_experts(table, load).new_table)


@pytest.mark.parametrize("G,N", [(4, 1), (1, 2)])  # one node; no expert groups (vLLM's value for most models)
def test_one_node_or_no_groups_is_global_placement_without_a_warning(caplog, G, N):
    table = default_table(1, 4, 3, 8)
    load = expert_to_slot_load(table, np.arange(1.0, 9.0)[None])
    with caplog.at_level("WARNING", logger="vllm_eplb_plugin"):
        new = create_policy("swift", PolicyConfig(num_groups=G, num_nodes=N)).rebalance_experts(table, load).new_table
    assert not caplog.records
    np.testing.assert_array_equal(new, create_policy("swift").rebalance_experts(table, load).new_table)


def test_deepseek_and_random_keep_their_own_placement():
    assert DeepSeekPolicy.hierarchical is False and RandomPolicy.hierarchical is False
    assert OptimalPolicy.hierarchical is True
    E, R, K, G, N, L = 64, 8, 9, 8, 4, 2
    w = np.random.default_rng(3).gamma(0.5, 100.0, (L, E))
    table = default_table(L, R, K, E)
    new = create_policy("deepseek", PolicyConfig(num_groups=G, num_nodes=N)).rebalance_experts(
        table, expert_to_slot_load(table, w)).new_table
    # Same experts on every rank as DeepSeek's own hierarchical algorithm (slots kept aside).
    ref = deepseek_phy2log(w, R, K, G, N).reshape(L, R, K)
    np.testing.assert_array_equal(np.sort(new, axis=-1), np.sort(ref, axis=-1))


class _Spy(OptimalPolicy):
    """Records what ``place`` is given."""

    calls: list

    def place(self, table, heat, expert_load):
        self.calls.append((table.copy(), heat.copy(), expert_load.copy()))
        return super().place(table, heat, expert_load)


def test_all_nodes_of_all_layers_go_to_one_place_call():
    E, R, K, G, N, L, T = 64, 8, 9, 8, 4, 3, 5
    heat = np.random.default_rng(1).gamma(0.5, 100.0, (T, L, E))
    table = default_table(L, R, K, E)
    spy = _Spy(PolicyConfig(num_groups=G, num_nodes=N))
    spy.calls = []
    new = spy.plan(table, heat).new_table
    assert len(spy.calls) == 1
    sub_table, sub_heat, sub_load = spy.calls[0]
    assert sub_table.shape == (L * N, R // N, K) and sub_heat.shape == (T, L * N, E // N)
    validate_table(sub_table, E // N)  # the linear start's slots of other nodes were repaired
    np.testing.assert_allclose(sub_load, sub_heat.sum(axis=0))
    # Row l * N + n is node n of layer l: its local expert j is the j-th smallest global id
    # on that node, and its per-step heat is that expert's.
    for l, n in itertools.product(range(L), range(N)):
        experts = sorted(experts_of_node(new, N)[l][n])
        np.testing.assert_array_equal(sub_heat[:, l * N + n], heat[:, l, experts])


class _BadNodePolicy(OptimalPolicy):
    name = "bad-node"

    def place(self, table, heat, expert_load):
        return np.full_like(table, expert_load.shape[1])  # an id one past the node's experts


def test_an_invalid_node_local_result_is_named():
    table = default_table(1, 4, 3, 8)
    policy = _BadNodePolicy(PolicyConfig(num_groups=4, num_nodes=2))
    with pytest.raises(InvalidExpertTable, match=r"bad-node.place\(\) result \(node-local, one row per layer x node\)"):
        policy.plan(table, np.ones((1, 8)))


def test_split_and_join_are_inverse_on_a_table_that_keeps_the_split():
    table = _split_table([[1, 2], [0, 3]], 16, 4, 5, 4)  # [1, 4, 5]
    node = node_of_expert(table, 2)  # [1, E]
    experts = node_experts(node, 2)  # [1, 2, 8]
    np.testing.assert_array_equal(experts[0], [[4, 5, 6, 7, 8, 9, 10, 11], [0, 1, 2, 3, 12, 13, 14, 15]])
    heat = np.arange(32.0).reshape(2, 1, 16)
    sub_table, sub_heat = split_nodes(table, heat, experts)
    assert sub_table.shape == (2, 2, 5) and sub_table.max() == 7
    np.testing.assert_array_equal(sub_heat[:, 1], heat[:, 0, [0, 1, 2, 3, 12, 13, 14, 15]])
    np.testing.assert_array_equal(join_nodes(sub_table, experts), table)


def test_split_marks_other_nodes_experts_and_repairs_them():
    # Linear start, 8 experts, 2 nodes of 2 ranks x 3 slots: node 1's slots hold 6, 7, 0,
    # 1, 2, 3 but the new split puts experts 4..7 there: 0..3 are foreign, repaired to
    # node-local experts that the rank lacks.
    table = default_table(1, 4, 3, 8)
    experts = np.array([[[0, 1, 2, 3], [4, 5, 6, 7]]])
    sub_table, _ = split_nodes(table, np.ones((1, 1, 8)), experts)
    validate_table(sub_table, 4)
    # Valid slots stay: node 0 keeps 0..5 minus the two 4 / 5 slots; node 1 keeps 6, 7.
    assert sub_table[0, 0].tolist() == [0, 1, 2] and sub_table[1, 0, :2].tolist() == [2, 3]


@pytest.mark.parametrize("name", SEARCH_POLICIES)
def test_a_current_layer_that_spreads_groups_over_nodes_is_never_kept(name):
    # 16 experts in 4 groups on 2 nodes; rank r holds experts r, r + 4, r + 8, r + 12, so
    # every group sits on every rank. Under uniform load no table balances better, so the
    # template's "keep layers the target does not improve" would keep it.
    table = np.arange(16).reshape(1, 4, 4).transpose(0, 2, 1).copy()
    assert not current_groups(table, 4, 2, 16)[1][0]
    load = expert_to_slot_load(table, np.ones((1, 16)))
    new = create_policy(name, PolicyConfig(num_groups=4, num_nodes=2)).rebalance_experts(table, load).new_table
    assert current_groups(new, 4, 2, 16)[1][0]
    assert rank_load(new, np.ones((1, 16))).max() == 4.0
