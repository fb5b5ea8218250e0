"""The deepseek policy against DeepSeek's worked example and vLLM's DefaultEplbPolicy."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import require

from vllm_eplb_plugin import PolicyConfig, create_policy
from vllm_eplb_plugin.metrics import imbalance
from vllm_eplb_plugin.placement import default_table, expert_to_slot_load, logcnt, rank_load, validate_table
from vllm_eplb_plugin.policies.deepseek import deepseek_phy2log, pack, replicate

try:
    import torch
    from vllm.distributed.eplb.policy.default import DefaultEplbPolicy
except ImportError:  # a dev machine without vLLM; CI installs it (see conftest.require)
    DefaultEplbPolicy = None


def test_worked_example_from_deepseek_readme():
    weight = np.array([[90, 132, 40, 61, 104, 165, 39, 4, 73, 56, 183, 86],
                       [20, 107, 104, 64, 19, 197, 187, 157, 172, 86, 16, 27]], dtype=float)
    phy2log = deepseek_phy2log(weight, num_ranks=8, slots_per_rank=2, num_groups=4, num_nodes=2)
    assert phy2log.tolist() == [[5, 6, 5, 7, 8, 4, 3, 4, 10, 9, 10, 2, 0, 1, 11, 1],
                                [7, 10, 6, 8, 6, 11, 8, 9, 2, 4, 5, 1, 5, 0, 3, 1]]


def test_replicate_and_pack_hand_checked():
    phy2log, count = replicate(np.array([[9.0, 3.0, 4.0]]), 5, cap=3)
    # 9 -> 9/2=4.5 still the largest per replica -> 9/3=3 vs 4: expert 2 next? No: after
    # the first extra replica the loads are 4.5, 3, 4, so expert 0 gets the second one.
    assert phy2log.tolist() == [[0, 1, 2, 0, 0]] and count.tolist() == [[3, 1, 1]]
    pack_of, rank = pack(np.array([[5.0, 4.0, 3.0, 3.0]]), 2)
    # LPT: 5 -> pack 0, 4 -> pack 1, 3 -> pack 1 (4 < 5), 3 -> pack 0 (pack 1 full).
    assert pack_of.tolist() == [[0, 1, 1, 0]] and rank.tolist() == [[0, 0, 1, 1]]


def _random_case(rng):
    R = int(rng.choice([2, 4, 8]))
    N = int(rng.choice([1, 2])) if R % 2 == 0 else 1
    G = int(rng.choice([1, 2, 4, 8]))
    E = G * N * 2 * int(rng.integers(1, 5))
    K = -(-E // R) + int(rng.integers(0, 3))
    L = int(rng.integers(1, 4))
    return L, R, K, E, G, N


def test_same_rank_multisets_as_vllm_default_policy():
    require(DefaultEplbPolicy is not None, "vLLM (vllm.distributed.eplb)")
    rng = np.random.default_rng(2024)
    compared = 0
    while compared < 150:
        L, R, K, E, G, N = _random_case(rng)
        if K > E // N:
            continue
        weight = rng.gamma(0.5, 100.0, (L, E))
        ref = DefaultEplbPolicy.rebalance_experts(torch.tensor(weight), R * K, G, N, R).numpy().reshape(L, R, K)
        ref_sorted = np.sort(ref, axis=-1)
        if np.any(ref_sorted[..., 1:] == ref_sorted[..., :-1]):
            continue  # vLLM put one expert twice on a rank (we never do); not comparable
        table = default_table(L, R, K, E)
        policy = create_policy("deepseek", PolicyConfig(num_groups=G, num_nodes=N))
        ours = policy.rebalance_experts(table, expert_to_slot_load(table, weight)).new_table
        assert np.array_equal(np.sort(ours, axis=-1), ref_sorted), (L, R, K, E, G, N)
        compared += 1


def test_zero_load_never_duplicates_an_expert_on_a_rank():
    table = default_table(2, 4, 3, 8)
    result = create_policy("deepseek").rebalance_experts(table, np.zeros(table.shape))
    validate_table(result.new_table, 8)


def test_experts_that_stay_on_a_rank_keep_their_slot():
    rng = np.random.default_rng(5)
    table = default_table(3, 4, 5, 16)
    load = rng.gamma(0.5, 100.0, table.shape)
    new = create_policy("deepseek").rebalance_experts(table, load).new_table
    for l, r, k in np.ndindex(new.shape):
        if new[l, r, k] in table[l, r]:
            assert table[l, r, k] == new[l, r, k]


def test_hierarchical_shape_errors_name_the_fix():
    table = default_table(1, 4, 3, 6)
    load = np.ones(table.shape)
    with pytest.raises(ValueError, match="num_groups=4 must divide the 6 experts"):
        create_policy("deepseek", PolicyConfig(num_groups=4, num_nodes=2)).rebalance_experts(table, load)
    with pytest.raises(ValueError, match="fewer than the 3 slots per rank; lower num_nodes"):
        deepseek_phy2log(np.ones((1, 4)), 4, 3, 2, 2)


def test_hierarchical_with_more_slots_than_a_node_holds_places_globally(caplog):
    # R=2, E=8, K=6, 8 groups, 2 nodes: a node would hold 4 experts for 6 slots per rank.
    table, load = default_table(1, 2, 6, 8), np.random.default_rng(0).integers(1, 100, (1, 2, 6))
    with caplog.at_level("WARNING", logger="vllm_eplb_plugin"):
        new = (
            create_policy("deepseek", PolicyConfig(num_groups=8, num_nodes=2))
            .rebalance_experts(table, load)
            .new_table
        )
    np.testing.assert_array_equal(new, create_policy("deepseek").rebalance_experts(table, load).new_table)
    assert "6 slots per rank exceed the 4 experts each of num_nodes=2 nodes holds; placing globally" in caplog.text


def test_balances_a_skewed_layer_hand_checked():
    table = default_table(1, 4, 3, 8)
    weight = np.array([[800.0, 100, 100, 100, 50, 50, 50, 50]])
    new = create_policy("deepseek").rebalance_experts(table, expert_to_slot_load(table, weight)).new_table
    # Replicate: expert 0 reaches the cap of 4 replicas (200 each), the last slot goes to
    # expert 1 (first of the 100s) -> 50 + 50. LPT packs 200 on every rank, the two 100s on
    # ranks 0 and 1, then the six 50s fill ranks 2, 3, 2, 3, 0, 1 -> [350, 350, 300, 300].
    assert sorted(rank_load(new, weight)[0].tolist()) == [300.0, 300.0, 350.0, 350.0]
    assert logcnt(new, 8)[0].tolist() == [4, 2, 1, 1, 1, 1, 1, 1]
    assert imbalance(table, weight)[0] == pytest.approx(500 / 325)  # vLLM's initial placement
