"""Repairing engine tables, bounded moves (max_move), slot preservation and duplicate separation."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from vllm_eplb_plugin import PolicyConfig, create_policy
from vllm_eplb_plugin.moves import broken_slots, limit_moves, preserve_slots, repair_table, separate_duplicates
from vllm_eplb_plugin.placement import (
    InvalidExpertTable,
    changed_slots,
    default_table,
    expert_to_slot_load,
    rank_load,
    validate_table,
)


def _peak(table, load):
    return rank_load(table, load).max(axis=1)


@pytest.mark.parametrize("max_move", [0, 1, 2, 3, 5])
def test_limit_moves_bound_and_never_worse(max_move):
    rng = np.random.default_rng(max_move)
    for _ in range(30):
        table = default_table(2, 4, 3, 9)
        load = rng.gamma(0.4, 100.0, (2, 9))
        target = create_policy("deepseek").rebalance_experts(table, expert_to_slot_load(table, load)).new_table
        out = limit_moves(table, target, load, max_move)
        validate_table(out, 9)
        assert np.all(changed_slots(table, out) <= max_move)
        assert np.all(_peak(out, load) <= _peak(table, load) + 1e-9)


def test_single_move_is_the_best_single_move_brute_force():
    """With max_move=1 the greedy takes the slot change of the target that lowers the peak
    most: compare with every valid one-slot change towards the target."""
    rng = np.random.default_rng(11)
    checked = 0
    for _ in range(40):
        table = default_table(1, 3, 3, 7)
        load = rng.gamma(0.4, 100.0, (1, 7))
        target = create_policy("deepseek").rebalance_experts(table, expert_to_slot_load(table, load)).new_table
        best = _peak(table, load)[0]
        for r, k in zip(*np.nonzero(table[0] != target[0]), strict=True):
            trial = table.copy()
            trial[0, r, k] = target[0, r, k]
            try:
                validate_table(trial, 7)
            except ValueError:
                continue
            best = min(best, _peak(trial, load)[0])
        out = limit_moves(table, target, load, 1)
        assert _peak(out, load)[0] == pytest.approx(best)
        checked += 1
    assert checked == 40


def test_swap_pairs_make_progress_where_single_changes_cannot():
    # Two experts, each on one rank, swap ranks: every one-slot change loses an expert.
    old = np.array([[[0, 2], [1, 3]]])
    target = np.array([[[1, 2], [0, 3]]])
    load = np.array([[10.0, 1.0, 10.0, 1.0]])  # old ranks [20, 2]; target ranks [11, 11]
    assert limit_moves(old, target, load, 1).tolist() == old.tolist()  # a swap costs 2
    assert limit_moves(old, target, load, 2).tolist() == target.tolist()


def test_max_move_through_the_policy_config():
    table = default_table(3, 4, 4, 12)
    load = np.random.default_rng(3).gamma(0.3, 100.0, table.shape)
    free = create_policy("deepseek").rebalance_experts(table, load).new_table
    bounded = create_policy("deepseek", PolicyConfig(max_move=2)).rebalance_experts(table, load).new_table
    assert np.all(changed_slots(table, free) > 2)
    assert np.all(changed_slots(table, bounded) <= 2)
    assert np.any(bounded != table)


def test_preserve_slots_keeps_experts_in_place():
    old = np.array([[[0, 1, 2], [3, 4, 5]]])
    new = np.array([[[6, 2, 0], [5, 7, 3]]])
    out = preserve_slots(old, new)
    assert out.tolist() == [[[0, 6, 2], [3, 7, 5]]]
    for l, r in itertools.product(range(1), range(2)):
        assert sorted(out[l, r]) == sorted(new[l, r])


@pytest.mark.parametrize("duplicates, padded", [(False, False), (True, False), (False, True)],
                         ids=["distinct", "an-expert-twice-on-a-rank", "old-padded-with-minus-1"])
def test_preserve_slots_on_random_tables_keeps_every_rank_and_every_staying_slot(duplicates, padded):
    rng = np.random.default_rng(7)
    for _ in range(300):
        L, R, K = (int(x) for x in rng.integers(1, 5, size=3))
        E = K + int(rng.integers(0, 5))
        old, new = (rng.integers(0, E, size=(L, R, K)) if duplicates else
                    np.stack([[rng.choice(E, K, replace=False) for _ in range(R)] for _ in range(L)])
                    for _ in range(2))
        if padded:  # vLLM's elastic EP pads an old table with -1
            old = np.where(rng.random(old.shape) < 0.3, -1, old)
        out = preserve_slots(old, new)
        for l, r in itertools.product(range(L), range(R)):
            assert sorted(out[l, r]) == sorted(new[l, r])  # the rank holds what the plan says
            if not duplicates:  # each expert the rank keeps stays in its old slot
                for k in np.flatnonzero(np.isin(old[l, r], new[l, r])):
                    assert out[l, r, k] == old[l, r, k]


def test_separate_duplicates_swaps_with_an_equal_load_replica():
    table = np.array([[[0, 0, 1], [2, 3, 4]]])
    load = np.array([[10.0, 5.0, 3.0, 5.0, 1.0]])
    out = separate_duplicates(table, load)
    validate_table(out, 5)
    # The duplicate 0 (10/2 = 5 per replica) swaps with expert 3 (5 per replica): loads kept.
    assert out.tolist() == [[[0, 3, 1], [2, 0, 4]]]


def test_repair_returns_a_valid_table_itself():
    table = default_table(2, 4, 3, 10)
    assert repair_table(table, 10) is table


def test_repair_hand_checked():
    # Elastic EP pads the last rank with -1: the two empty slots get the experts with the
    # fewest replicas that rank lacks (all have one; lowest ids first).
    padded = np.array([[[0, 1, 2], [3, 4, 5], [6, 7, 8], [9, -1, -1]]])
    assert repair_table(padded, 10).tolist() == [[[0, 1, 2], [3, 4, 5], [6, 7, 8], [9, 0, 1]]]
    # Expert 0 twice on rank 0: the second copy gets the expert with the fewest replicas
    # that rank lacks (all have one but 0; lowest id first).
    twice = np.array([[[0, 0, 2], [3, 4, 5], [6, 7, 8], [9, 0, 1]]])
    assert repair_table(twice, 10).tolist() == [[[0, 1, 2], [3, 4, 5], [6, 7, 8], [9, 0, 1]]]
    # More missing experts than broken slots: a replica of the most-replicated expert goes.
    crowded = np.array([[[0, 1], [0, 2], [0, 1]]])  # 4 experts, 3 is missing
    assert repair_table(crowded, 4).tolist() == [[[0, 1], [0, 2], [3, 1]]]


def test_repair_keeps_every_valid_slot_when_it_can():
    rng = np.random.default_rng(0)
    for _ in range(300):
        R, K = int(rng.integers(1, 6)), int(rng.integers(1, 5))
        E = int(rng.integers(K, R * K + 1))
        table = default_table(2, R, K, E)
        broken = rng.random(table.shape) < 0.3
        table = np.where(broken, rng.integers(-1, E, table.shape), table)  # -1, duplicates, lost experts
        out = repair_table(table, E)
        validate_table(out, E)
        bad = broken_slots(table, E)
        held = np.array([np.isin(np.arange(E), table[l][~bad[l]]) for l in range(2)])  # [L, E]
        for l in range(2):
            if (~held[l]).sum() <= bad[l].sum():  # room for every missing expert: valid slots stay
                np.testing.assert_array_equal(out[l][~bad[l]], table[l][~bad[l]])


def test_repair_names_a_shape_no_valid_table_has():
    with pytest.raises(InvalidExpertTable, match=r"no valid table has 1 ranks x 10 slots for 8 experts"):
        repair_table((np.arange(10) % 8).reshape(1, 1, 10), 8)
