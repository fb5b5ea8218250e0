"""The optimal, swift and flashlb policies and their search building blocks, against
brute-force optima, hand-checked placements and the benchmark's drifting traces."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from benchmarks.exact import best_peak
from vllm_eplb_plugin import PolicyConfig, create_policy
from vllm_eplb_plugin.placement import (
    changed_slots,
    default_table,
    expert_to_slot_load,
    logcnt,
    rank_load,
    validate_table,
)
from vllm_eplb_plugin.policies.search import (
    align_ranks,
    lower_bound,
    move_replicas,
    pair_table,
    pairing_counts,
    pairing_search,
    rank_cost,
    recount,
    refine,
    replica_counts,
    swap_pairs,
    trade_back,
)

TINY = [(3, 2, 4), (3, 2, 5), (2, 3, 4), (4, 2, 5), (3, 3, 6)]  # (R, K, E)


@pytest.mark.parametrize("pairing", [False, True])
def test_optimal_against_brute_force_and_the_bound_holds(pairing):
    policy = create_policy("optimal", PolicyConfig(options={"pairing": pairing}))
    gaps = []
    for R, K, E in TINY:
        rng = np.random.default_rng(R * 100 + K * 10 + E)
        for _ in range(6):
            w = rng.zipf(1.6, E).astype(float) * rng.integers(1, 50, E)
            exact = best_peak(w, R, K)
            table = default_table(1, R, K, E)
            new = policy.rebalance_experts(table, expert_to_slot_load(table, w[None])).new_table
            ours = rank_load(new, w[None]).max()
            assert lower_bound(w[None], R, R * K)[0] <= exact + 1e-9  # a true lower bound
            assert ours >= exact - 1e-9  # nothing beats exhaustive search: checks the scorer
            gaps.append(ours / exact)
    gaps = np.array(gaps)
    # Measured on these 30 cases, with and without pairing: 30 exact. Before the search
    # over every count vector (search.every_count_table, possible on problems this small):
    # 27 exact, mean 0.68 %, worst 7.8 % above the optimum; one-for-one swaps alone: 22
    # exact, mean 2.2 %, worst 20 %.
    assert np.all(gaps <= 1 + 1e-9), gaps.round(3)


def test_replica_counts_chosen_for_packing_reach_the_optimum_with_few_experts():
    # Mixtral-like: 8 experts, top-2, 4 ranks x 3 slots, the hottest expert taking up to
    # ~49 % of the assignments (the benchmark's heavy and extreme skews). The min-max
    # counts give the second hottest expert three replicas; the best tables often keep it
    # whole and split two small experts into fillers instead.
    from benchmarks.traces import SKEWS, drifting_trace

    optimal, swift = create_policy("optimal"), create_policy("swift")
    gaps = {"optimal": [], "swift": []}
    for skew in ("heavy", "extreme"):
        heat = drifting_trace(8, 6, 1, 8, 1024, 2, SKEWS[skew], seed=3)[0].sum(axis=0)  # [6, 8]
        table = default_table(6, 4, 3, 8)
        for name, policy in (("optimal", optimal), ("swift", swift)):
            peaks = rank_load(policy.plan(table, heat).new_table, heat).max(axis=1)
            gaps[name] += [p / best_peak(w, 4, 3) for p, w in zip(peaks, heat, strict=True)]
    opt, sw = np.array(gaps["optimal"]), np.array(gaps["swift"])
    assert opt.min() >= 1 - 1e-9 and sw.min() >= 1 - 1e-9  # nothing beats exhaustive search
    # Measured: optimal exact on 11 of 12 layers, worst 0.27 % above (min-max counts
    # alone: 2 exact, worst 2.4 %). swift takes the table that moves least among those
    # within its 0.8 % target of the best it found, and keeps a repair within its 1 % slack:
    # mean 0.25 %, worst 0.9 % above the optimum (min-max counts: none exact, worst 2.9 %).
    assert np.sum(opt <= 1 + 1e-9) >= 11 and opt.max() <= 1.003, opt.round(4)
    assert sw.max() <= 1.01 and sw.mean() <= 1.004, sw.round(4)


def test_lower_bound_hand_checked():
    # 2 ranks x 2 slots, experts 8, 2, 2: counts (2, 1, 1) -> per replica 4, 2, 2; total 12 / 2 = 6.
    assert lower_bound(np.array([[8.0, 2.0, 2.0]]), 2, 4).tolist() == [6.0]
    # 2 ranks x 2 slots, experts 30, 1, 1: counts (2, 1, 1) -> 15 per replica, but 32 / 2 = 16.
    assert lower_bound(np.array([[30.0, 1.0, 1.0]]), 2, 4).tolist() == [16.0]
    assert replica_counts(np.array([[30.0, 1.0, 1.0]]), 2, 4).tolist() == [[2, 1, 1]]
    # No redundant slot (4 ranks x 1 slot): the hot expert alone is the bound.
    assert lower_bound(np.array([[30.0, 1.0, 1.0, 1.0]]), 4, 4).tolist() == [30.0]


def test_refine_never_raises_the_peak_and_keeps_counts():
    rng = np.random.default_rng(1)
    for _ in range(20):
        L, R, K, E = 3, int(rng.integers(2, 7)), int(rng.integers(2, 6)), 0
        E = int(rng.integers(K, R * K + 1))
        table = np.stack([default_table(1, R, K, E)[0][rng.permutation(R)] for _ in range(L)])
        w = rng.gamma(0.5, 100, (L, E))
        out = refine(table, w)
        validate_table(out, E)
        assert np.array_equal(logcnt(out, E), logcnt(table, E))
        assert np.all(rank_cost(out, w).max(axis=1) <= rank_cost(table, w).max(axis=1) + 1e-9)


@pytest.mark.parametrize("coarse", [None, 0.0])
@pytest.mark.parametrize("hot_ranks", [1, 2, 4])
def test_refine_stops_where_no_swap_with_a_partner_lowers_the_peak(hot_ranks, coarse):
    """Local optimality checked by brute force: when refine stops (no target, no gain
    floor), no swap of the costliest rank with any of its ``partners`` least loaded
    ranks lowers the pair's larger load below the peak, whether it relieved one hot rank
    per step or several, and whether coarse steps ran first (``coarse = 0``: every layer
    takes them until they stop gaining)."""
    rng = np.random.default_rng(7)
    for _ in range(15):
        R, K, J = int(rng.integers(8, 17)), int(rng.integers(2, 6)), 3
        E = int(rng.integers(K, R * K + 1))
        table = np.stack([default_table(1, R, K, E)[0][rng.permutation(R)] for _ in range(2)])
        w = rng.gamma(0.5, 100, (2, E))
        out = refine(table, w, partners=J, hot_ranks=hot_ranks, coarse=coarse)
        validate_table(out, E)
        assert np.array_equal(logcnt(out, E), logcnt(table, E))
        for layer, wl in zip(out, w, strict=True):
            item = (wl / np.bincount(layer.ravel(), minlength=E))[layer]  # [R, K]
            load = item.sum(axis=1)
            i = int(load.argmax())
            for j in np.argsort(np.where(np.arange(R) == i, np.inf, load), kind="stable")[:J]:
                for k, kj in itertools.product(range(K), range(K)):
                    if layer[j, kj] in layer[i] or layer[i, k] in layer[j]:
                        continue  # a rank would hold an expert twice
                    d = item[i, k] - item[j, kj]
                    assert max(load[i] - d, load[j] + d) >= load[i] - 1e-9


def test_coarse_step_pairs_the_hottest_ranks_with_the_coolest_hand_checked():
    """8 ranks x 2 slots, one replica per expert, so a rank's load is its two weights:
    20.5, 16, 10, 10, 10, 10, 4, 2.5 (mean 10.375). Above ``coarse = 12``, one coarse
    step pairs the R // 4 = 2 hottest ranks with the 2 coolest, hottest with coolest:
    20.5 with 2.5 balances at 11.5 and 11.5 (10 or 10.5 for 1.5 or 1: d = 9 either way),
    16 with 4 at 10 and 10 (9 for 3 or 7 for 1: d = 6). The peak is then 11.5 <= 12, so
    no second step; ``good_enough = inf`` keeps the fine search out."""
    w = np.array([[10, 10.5, 9, 7, 5, 5, 5, 5, 5, 5, 5, 5, 1, 3, 1.5, 1]])
    table = default_table(1, 8, 2, 16)
    out = refine(table, w, coarse=12.0, good_enough=np.inf)
    assert rank_cost(out, w)[0].tolist() == [11.5, 10, 10, 10, 10, 10, 10, 11.5]
    assert np.array_equal(out[0, 2:6], table[0, 2:6])  # ranks at or below 12 that were not paired
    assert (out != table).sum() == 4  # two swaps
    # Below ``coarse`` nothing changes: the fine search alone decides.
    w = np.random.default_rng(3).gamma(0.5, 100, (4, 16))
    table = np.stack([default_table(1, 8, 2, 16)[0]] * 4)
    peak = rank_cost(table, w).max(axis=1)
    assert np.array_equal(refine(table, w, coarse=peak, partners=3), refine(table, w, partners=3))


def _one_swap(table: np.ndarray, out: np.ndarray) -> tuple[int, int, int, int] | None:
    """The swap that turned ``table [R, K]`` into ``out [R, K]``: (rank, slot, rank, slot)."""
    diff = np.argwhere(table != out)
    if not len(diff):
        return None
    assert len(diff) == 2 and diff[0, 0] != diff[1, 0]
    (i, k), (j, kj) = diff
    assert table[i, k] == out[j, kj] and table[j, kj] == out[i, k]
    return int(i), int(k), int(j), int(kj)


def test_refine_with_old_takes_the_swap_that_touches_fewest_old_slots_brute_force():
    """One step of the search with ``old`` (every rank a partner, one hot rank), against
    every swap of the hottest rank: of the swaps leaving both ranks at or under the
    target, the one touching fewest slots that still hold their ``old`` expert, then the
    lowest pair peak; with none, the lowest peak. ``table`` is ``old`` after a few
    earlier swaps, so some slots are already changed."""
    rng = np.random.default_rng(21)
    differs = 0
    for case in range(60):
        R, K = int(rng.integers(3, 7)), int(rng.integers(2, 5))
        E = int(rng.integers(K + 1, R * K + 1))
        old = default_table(1, R, K, E)[:, rng.permutation(R)]
        table = old.copy()
        for _ in range(3):  # earlier swaps of this update
            i, j = rng.choice(R, 2, replace=False)
            k, kj = rng.integers(K, size=2)
            if table[0, j, kj] not in table[0, i] and table[0, i, k] not in table[0, j]:
                table[0, i, k], table[0, j, kj] = table[0, j, kj], table[0, i, k]
        w = rng.gamma(0.7, 100, (1, E))
        item = (w[0] / logcnt(table, E)[0])[table[0]]  # [R, K]
        load = item.sum(axis=1)
        target = load.mean() + rng.uniform(0.1, 0.9) * (load.max() - load.mean())
        h = int(load.argmax())
        best, plain = None, None  # (class, peak, swap), lexicographic
        for j, k, kj in itertools.product(range(R), range(K), range(K)):
            if j == h or table[0, j, kj] in table[0, h] or table[0, h, k] in table[0, j]:
                continue
            d = item[h, k] - item[j, kj]
            peak = max(load[h] - d, load[j] + d)
            touched = int(table[0, h, k] == old[0, h, k]) + int(table[0, j, kj] == old[0, j, kj])
            cand = (touched if peak <= target + 1e-9 else 3, peak, (h, k, j, kj))
            best = cand if best is None or cand[:2] < best[:2] else best
            plain = cand if plain is None or cand[1] < plain[1] else plain
        out = refine(table, w, partners=None, hot_ranks=1, good_enough=target, max_steps=1, old=old)
        swap = _one_swap(table[0], out[0])
        if best is None or best[1] >= load[h] - 1e-9:
            assert swap is None, case  # no swap lowers the peak
            continue
        assert swap is not None, case
        i, k, j, kj = swap
        if i != h:
            i, k, j, kj = j, kj, i, k
        assert i == h
        d = item[h, k] - item[j, kj]
        peak = max(load[h] - d, load[j] + d)
        touched = int(table[0, h, k] == old[0, h, k]) + int(table[0, j, kj] == old[0, j, kj])
        assert ((touched if peak <= target + 1e-9 else 3), peak) == pytest.approx(best[:2]), case
        differs += plain[0] > best[0]
    assert differs >= 5  # cases where the lowest peak touches more old slots (measured: 8 of 60)


def test_swift_moves_fewer_slots_by_keeping_old_ones_at_the_same_fit():
    """On the benchmark's V3 EP32 traces (4 layers, 5 updates), the choice that keeps
    old slots (``NEAR`` lower bounds: on) against the same repair without it (``NEAR =
    0``: off): fewer steady moves, and every repaired layer still within ``target``."""
    from benchmarks.traces import SKEWS, drifting_trace

    trace = drifting_trace(256, 4, 6, 8, 256 * 32, 8, SKEWS["moderate"], seed=3)
    moves = {}
    for near in (0.0, 1.5):
        policy = create_policy("swift")
        policy.NEAR = near
        table, moved = default_table(4, 32, 9, 256), []
        for w in range(5):
            new = policy.rebalance_experts(table, expert_to_slot_load(table, trace[w])).new_table
            load = trace[w].sum(axis=0)
            fit = lower_bound(load, 32, 288) / rank_load(new, load).max(axis=1)
            assert np.all(fit >= 1 / 1.008 - 1e-9), fit
            moved.append(changed_slots(table, new).sum())
            table = new
        moves[near] = sum(moved[1:])
    assert moves[1.5] <= 0.85 * moves[0.0], moves  # measured: 491 vs 637 slots over 4 updates


def test_swift_repairs_a_stuck_layer_with_every_rank_as_partner_instead_of_replacing_it():
    """Kimi-K2 (EP64 x 7), extreme heat, the benchmark's trace with seed 1: on the fifth
    update the repair with the 8 coolest ranks as partners leaves layer 1 more than
    ``slack`` above the lower bound. With every rank as a partner the same repair reaches
    ``target``, so swift keeps it instead of a fresh placement, which changed 342 of the
    layer's 448 slots (the trade back included)."""
    from benchmarks.traces import SKEWS, drifting_trace
    from vllm_eplb_plugin.policies.swift import SwiftPolicy

    R, K, E = 64, 7, 384
    trace = drifting_trace(E, 8, 6, 32, 256 * R, 8, SKEWS["extreme"], seed=1)
    policy = create_policy("swift")
    table = default_table(8, R, K, E)
    for w in range(4):
        table = policy.rebalance_experts(table, expert_to_slot_load(table, trace[w])).new_table
    load = trace[4].sum(axis=0).astype(float)
    bound = lower_bound(load, R, R * K)
    fast = refine(recount(table, replica_counts(load, R, R * K), load), load, partners=SwiftPolicy.PARTNERS,
                  min_gain=0.001 * load.sum(axis=1) / R, good_enough=1.008 * bound, hot_ranks=SwiftPolicy.HOT_RANKS,
                  coarse=SwiftPolicy.COARSE * bound, old=table, near=SwiftPolicy.NEAR * bound)
    assert rank_load(fast, load)[1].max() > 1.01 * bound[1]  # stuck: the case this test is about
    new = policy.rebalance_experts(table, expert_to_slot_load(table, trace[4])).new_table
    assert rank_load(new, load)[1].max() <= 1.008 * bound[1]
    assert changed_slots(table, new)[1] <= 70  # measured: 60


def test_refine_with_no_gain_floor_stops_instead_of_swapping_back_and_forth():
    """The swap score ``(H + C) / 2 + |a - (b + (H - C) / 2)|`` can land an ulp below an
    unchanged peak. Without a rounding floor, 6 of these 58 layers (V3 EP32, extreme
    heat, DeepSeek's greedy start, as the optimal policy runs it) swapped one pair back
    and forth until ``max_steps``: one more step still changed the table."""
    from benchmarks.traces import SKEWS, drifting_trace
    from vllm_eplb_plugin.moves import separate_duplicates
    from vllm_eplb_plugin.policies.deepseek import deepseek_phy2log

    w = drifting_trace(256, 58, 1, 4, 256 * 32, 8, SKEWS["extreme"], seed=0)[0].sum(axis=0)
    start = separate_duplicates(deepseek_phy2log(w, 32, 9).reshape(58, 32, 9), w)
    steps = 32 * 9
    assert np.array_equal(refine(start, w, max_steps=steps), refine(start, w, max_steps=steps + 1))


def test_swap_pairs_against_every_packing_of_the_same_counts():
    """Two ranks (a partition problem): two-for-two swaps against the best table with the
    same replica counts, found by trying every split of the single-replica experts, and
    against the one-for-one swap search they extend."""
    rng = np.random.default_rng(11)
    exact_pairs = exact_single = 0
    for _ in range(40):
        K = int(rng.integers(4, 8))
        E = int(rng.integers(K + 2, 2 * K))
        table = default_table(1, 2, K, E)[:, rng.permutation(2)]
        counts = logcnt(table, E)[0]
        w = rng.gamma(1.0, 100, E)
        both, one = np.flatnonzero(counts == 2), np.flatnonzero(counts == 1)  # both: half on each rank
        best = min(max(r0, w.sum() - r0) for r0 in (w[both].sum() / 2 + w[list(sub)].sum()
                                                    for sub in itertools.combinations(one, K - len(both))))
        single, pairs = refine(table, w[None]), swap_pairs(table, w[None])
        validate_table(pairs, E)
        assert np.array_equal(logcnt(pairs, E)[0], counts)
        peak = rank_load(pairs, w[None]).max()
        assert best - 1e-9 <= peak <= rank_load(single, w[None]).max() + 1e-9
        exact_pairs += peak <= best + 1e-9
        exact_single += rank_load(single, w[None]).max() <= best + 1e-9
    assert exact_pairs >= 38 and exact_single <= 35  # measured: 39 and 33 of 40


def test_move_replicas_never_raises_the_peak_and_keeps_tables_valid():
    rng = np.random.default_rng(5)
    lowered = 0
    for _ in range(30):
        R, K = int(rng.integers(2, 7)), int(rng.integers(2, 5))
        E = int(rng.integers(K, R * K + 1))
        table = np.stack([default_table(1, R, K, E)[0][rng.permutation(R)] for _ in range(2)])
        w = rng.zipf(1.6, (2, E)) * rng.integers(1, 50, (2, E)).astype(float)
        swapped = refine(table, w)
        out = move_replicas(table, w)
        validate_table(out, E)
        assert logcnt(out, E).max() <= R  # at most one replica per rank
        before, after = rank_cost(swapped, w).max(axis=1), rank_cost(out, w).max(axis=1)
        assert np.all(after <= before + 1e-9)
        lowered += int(np.sum(after < before - 1e-9))
    assert lowered >= 30  # measured: 36 of the 60 layers end lower than the swap search alone


def _pairing_peak(w: np.ndarray, counts: np.ndarray) -> float:
    """Best max pair sum for these counts: largest replica with smallest."""
    a = np.sort(np.repeat(w / counts, counts))
    return float((a + a[::-1]).max())


def test_pairing_counts_against_every_count_vector():
    """Two slots per rank: the pairing counts against the best counts found by trying
    every count vector (also after the count search), and the table built from them against
    the pairing peak."""
    rng = np.random.default_rng(7)
    ours, searched, minmax, table_over = [], [], [], 0
    for _ in range(40):
        R = int(rng.integers(3, 7))
        E = int(rng.integers(R + 1, 2 * R))
        w = rng.zipf(1.6, E) * rng.integers(1, 50, E).astype(float)
        best = np.inf
        for extra in itertools.combinations_with_replacement(range(E), 2 * R - E):
            counts = 1 + np.bincount(np.array(extra, dtype=np.int64), minlength=E)
            if counts.max() <= R:
                best = min(best, _pairing_peak(w, counts))
        counts = pairing_counts(w[None], R)[0]
        table = pair_table(w[None], counts[None], R)
        validate_table(table, E)
        assert np.array_equal(logcnt(table, E)[0], counts) and counts.max() <= R
        ours.append(_pairing_peak(w, counts) / best)
        minmax.append(_pairing_peak(w, replica_counts(w[None], R, 2 * R)[0]) / best)
        peaks = []
        for start in (counts, replica_counts(w[None], R, 2 * R)[0]):
            found = pairing_search(w[None], start[None], R)[0]
            assert found.sum() == 2 * R and 1 <= found.min() and found.max() <= R
            peaks.append(_pairing_peak(w, found))
            assert peaks[-1] <= _pairing_peak(w, start) * (1 + 1e-12)  # the search never goes up
        searched.append(min(peaks) / best)
        table_over += rank_load(table, w[None]).max() > _pairing_peak(w, counts) * (1 + 1e-9)
    ours, searched, minmax = np.array(ours), np.array(searched), np.array(minmax)
    assert min(ours.min(), searched.min()) >= 1 - 1e-9  # nothing beats trying every count vector
    # Measured: 36 of 40 exact, mean 1.2 % above (min-max counts: 31 exact, mean 2.5 %); one
    # table pays for separating two replicas of one expert that the pairing put together.
    assert np.sum(ours <= 1 + 1e-9) >= 36 and ours.mean() <= 1.013 and ours.mean() < minmax.mean()
    # The count search on the exact pairing peak, best of both starts: measured 40 of 40 exact.
    assert np.sum(searched <= 1 + 1e-9) >= 39
    assert table_over <= 1


def test_recount_moves_one_slot_per_replica_gained():
    rng = np.random.default_rng(2)
    for _ in range(30):
        R, K = int(rng.integers(2, 8)), int(rng.integers(2, 6))
        E = int(rng.integers(K, R * K))
        table = default_table(2, R, K, E)
        w = rng.gamma(0.4, 100, (2, E))
        counts = replica_counts(w, R, R * K)
        out = recount(table, counts, w)
        validate_table(out, E)
        assert np.array_equal(logcnt(out, E), counts)
        gained = np.maximum(counts - logcnt(table, E), 0).sum(axis=1)
        moved = changed_slots(table, out)
        # one slot per replica gained, two where a freed slot had to be made room for
        assert np.all(moved >= gained) and np.all(moved <= 2 * gained)


def test_align_ranks_undoes_a_rank_permutation():
    rng = np.random.default_rng(3)
    table = np.stack([rng.permutation(64).reshape(8, 8) for _ in range(4)])
    shuffled = np.stack([t[rng.permutation(8)] for t in table])
    assert np.array_equal(align_ranks(table, shuffled, 64), table)


def test_trade_back_returns_an_expert_by_a_hand_checked_trade():
    # A fresh placement put expert 1 on rank 1 and expert 2 (0.2 heavier) on rank 0; the
    # old table had them the other way round. Loads: rank 0 20.2, rank 1 20, rank 2 40
    # (the peak), mean 26.73, so rank 1 may rise by 5 % of the mean (1.34) up to 38.
    old = np.array([[[0, 1], [2, 3], [4, 5]]])
    new = np.array([[[0, 2], [1, 3], [4, 5]]])
    w = np.array([[10, 10, 10.2, 10, 20, 20]])
    assert np.array_equal(trade_back(old, new, w), old)  # both slots back: gain 2
    # A rise of 2 (expert 2 at 12) is more than either step allows: no trade.
    heavy = np.array([[10, 10, 12, 10, 20, 20]])
    assert np.array_equal(trade_back(old, new, heavy), new)
    # Rank 1 near the peak (38.8 of 40): a rise of 0.2 is within 1 % of the mean (0.27)
    # and stays under the peak, so the small step allows it; a rise of 0.5 (expert 2 at
    # 10.5) leaves rank 1 above 95 % of the peak and is over 1 %: no trade.
    near = np.array([[10, 10, 10.2, 28.8, 20, 20]])
    assert np.array_equal(trade_back(old, new, near), old)
    nearer = np.array([[10, 10, 10.5, 28.8, 20, 20]])
    assert np.array_equal(trade_back(old, new, nearer), new)


@pytest.mark.parametrize("z", [0.0, 1.0])
def test_trade_back_keeps_slots_without_raising_the_peak_or_the_ranks_near_it(z):
    from vllm_eplb_plugin.policies.search import table_for_counts

    rng = np.random.default_rng(7)
    L, R, K, E = 6, 16, 2, 28
    fewer, total_new, total_out = 0, 0, 0
    for _ in range(4):
        w0 = rng.zipf(1.5, (L, E)).astype(float) * rng.integers(1, 20, (L, E))
        w1 = w0 * np.exp(rng.normal(0, 0.3, (L, E)))  # the load drifted
        var = w1 * rng.uniform(0.5, 5, (L, E)) if z else None  # per-step variance (flashlb's cost)
        old = table_for_counts(w0, replica_counts(w0, R, R * K), R)
        new = align_ranks(old, table_for_counts(w1, replica_counts(w1, R, R * K), R), E)  # placed afresh
        out = trade_back(old, new, w1, var, z)
        validate_table(out, E)
        assert np.array_equal(logcnt(out, E), logcnt(new, E))
        before, after = rank_cost(new, w1, var, z), rank_cost(out, w1, var, z)
        peak, mean_rank = before.max(axis=1, keepdims=True), w1.sum(axis=1, keepdims=True) / R
        rise = after - before
        assert np.all(after.max(axis=1) <= before.max(axis=1) + 1e-9)  # the peak stays
        small = rise <= 0.01 * mean_rank + 1e-9  # the first step: anywhere up to the peak
        large = (rise <= 0.05 * mean_rank + 1e-9) & (after <= 0.95 * peak + 1e-9)  # the second
        assert np.all(small | large)
        moved_new, moved_out = changed_slots(old, new), changed_slots(old, out)
        assert np.all(moved_out <= moved_new)
        fewer += int((moved_out < moved_new).sum())
        total_new, total_out = total_new + moved_new.sum(), total_out + moved_out.sum()
    # Measured: every one of the 24 layers keeps more slots; changed slots in all 299 ->
    # 153 on plain loads (z = 0), 285 -> 124 with the variance (z = 1).
    assert fewer >= 20 and total_out <= 0.7 * total_new, (fewer, total_new, total_out)


def _drifting_runs(policy: str, updates: int = 5, seed: int = 0):
    """Fit on window w, score on w + 1 (the benchmark's protocol), DeepSeek-V3 EP32 shape,
    4 layers. Returns per-update (realized imbalance, moved fraction)."""
    from benchmarks.policies import step_imbalance
    from benchmarks.traces import SKEWS, drifting_trace

    trace = drifting_trace(256, 4, updates + 1, 8, 256 * 32, 8, SKEWS["heavy"], seed=seed)  # hottest ~16x the mean
    pol = create_policy(policy)
    table = default_table(4, 32, 9, 256)
    out = []
    for w in range(updates):
        new = pol.rebalance_experts(table, expert_to_slot_load(table, trace[w])).new_table
        out.append((float(step_imbalance(new, trace[w + 1]).mean()), float(changed_slots(table, new).mean() / 288)))
        table = new
    return out


def test_swift_converges_from_a_linear_start_with_few_moves():
    swift, optimal = _drifting_runs("swift"), _drifting_runs("optimal")
    # From vLLM's linear table, swift gets about optimal's balance on the next window at
    # once and keeps it (Ascend's Swift does not: 1.4-2.0 on this shape, see
    # benchmarks/results); the drift between windows is noise of a few percent either way.
    assert swift[0][0] <= optimal[0][0] * 1.05
    assert np.mean([s for s, _ in swift]) <= np.mean([o for o, _ in optimal]) * 1.03
    # ...and afterwards repairs with a fraction of the moves of a fresh placement.
    steady_swift = np.mean([m for _, m in swift[1:]])
    steady_optimal = np.mean([m for _, m in optimal[1:]])
    assert steady_swift <= 0.25 and steady_swift <= steady_optimal / 2, (steady_swift, steady_optimal)


def test_swift_leaves_a_table_alone_when_it_is_already_near_the_bound():
    rng = np.random.default_rng(4)
    w = rng.gamma(0.5, 100, (3, 64))
    table = create_policy("optimal").rebalance_experts(default_table(3, 8, 9, 64),
                                                       expert_to_slot_load(default_table(3, 8, 9, 64), w)).new_table
    # A 0.1 % perturbation of the load: nothing worth moving for.
    w2 = w * (1 + 0.001 * rng.standard_normal(w.shape))
    result = create_policy("swift").rebalance_experts(table, expert_to_slot_load(table, w2))
    assert not result.changed


def test_flashlb_pairs_bursty_experts_with_steady_ones():
    # 2 ranks x 2 slots; means 6, 6, 4, 4 pair as {6, 4} twice whatever the variance, so a
    # mean-only policy cannot tell the options apart. Experts 0 and 2 are bursty (load
    # alternates), 1 and 3 steady: putting both bursty experts on one rank doubles its swing.
    steps = np.array([[10, 6, 8, 4], [2, 6, 0, 4]] * 8, dtype=float)  # [T, E], means 6, 6, 4, 4
    table = np.array([[[0, 2], [1, 3]]])  # bursty together: per-step peak 18
    series = expert_to_slot_load(table, steps[:, None, :])
    new = create_policy("flashlb").rebalance_experts(table, series).new_table[0]
    bursty_rank = [r for r in range(2) if 0 in new[r]][0]
    assert 2 not in new[bursty_rank], new.tolist()
    assert sorted(map(sorted, new.tolist())) in ([[0, 3], [1, 2]], [[1, 2], [0, 3]])
    # One window (T = 1) carries no variance: flashlb plans as optimal does.
    one = expert_to_slot_load(table, steps.sum(axis=0)[None])
    assert np.array_equal(create_policy("flashlb").rebalance_experts(table, one).new_table,
                          create_policy("optimal").rebalance_experts(table, one).new_table)


@pytest.mark.parametrize("name", ["optimal", "swift", "flashlb"])
@pytest.mark.parametrize("max_move", [1, 3, 8])
def test_max_move_bounds_every_new_policy_and_never_loses(name, max_move):
    rng = np.random.default_rng(max_move)
    table = default_table(4, 8, 5, 32)
    series = expert_to_slot_load(table, rng.gamma(0.4, 100, (4, 4, 32)))
    w = series.sum(axis=0)
    load = np.stack([np.bincount(table[l].ravel(), weights=w[l].ravel(), minlength=32) for l in range(4)])
    new = create_policy(name, PolicyConfig(max_move=max_move)).rebalance_experts(table, series).new_table
    validate_table(new, 32)
    assert np.all(changed_slots(table, new) <= max_move)
    assert np.all(rank_load(new, load).max(axis=1) <= rank_load(table, load).max(axis=1) + 1e-9)


@pytest.mark.parametrize("name", ["swift", "optimal", "flashlb", "deepseek"])
def test_loads_whose_sum_overflows_plan_like_their_scaled_down_copy(name):
    table = default_table(2, 4, 3, 10)
    load = np.random.default_rng(3).uniform(0.1, 1.0, table.shape)
    huge = load * 1.7e308  # finite, but any sum over slots overflows
    with np.errstate(over="ignore"):
        assert np.isfinite(huge).all() and not np.isfinite(huge.sum())
    got = create_policy(name).rebalance_experts(table, huge).new_table
    validate_table(got, 10)
    np.testing.assert_array_equal(got, create_policy(name).rebalance_experts(table, huge / huge.max()).new_table)
