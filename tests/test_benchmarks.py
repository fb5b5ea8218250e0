"""The policy benchmark the README quotes still runs end to end, and its full-shape timing
reports a contender that fails without losing the others."""

from __future__ import annotations

import json

import numpy as np
import pytest

from benchmarks.policies import Contender, _ours, main, time_full_shape
from benchmarks.traces import SKEWS, drifting_trace


def test_policy_benchmark_quick_run_writes_every_section(tmp_path):
    torch = pytest.importorskip("torch")
    threads = torch.get_num_threads()  # main() pins torch to one thread, as the README's run does
    out = tmp_path / "policies.json"
    try:
        assert main(["--quick", "--shapes", "mixtral-8e-ep4x3", "--only", "swift,deepseek", "--json", str(out)]) == 0
    finally:
        torch.set_num_threads(threads)
    result = json.loads(out.read_text())
    rows = [r for r in result["rows"] if r["kind"] == "ours"]
    assert {r["policy"] for r in rows} == {"swift", "deepseek"} and len(rows) == 2 * len(SKEWS)
    assert all(r["invalid_tables"] == 0 and 0.5 < r["fit_ratio"] <= 1 + 1e-9 for r in rows)
    for name in ("swift", "deepseek"):
        for skew in ("moderate", "extreme"):
            timing = result["full_shape_ms"][name][skew]
            assert timing["first"] > 0 and timing["steady"] > 0


def test_full_shape_timing_reports_a_failing_contender_and_times_the_rest():
    def broken(shape):
        def plan(table, series):
            raise RuntimeError("no plan for this shape")
        return plan

    trace = drifting_trace(256, 58, 2, 2, 256 * 32, 8, SKEWS["moderate"], seed=0)
    runs = [Contender("broken", "peer", broken), Contender("swift", "ours", _ours("swift"))]
    timed = time_full_shape(runs, trace, repeat=2)
    assert timed["broken"] == "RuntimeError: no plan for this shape"
    assert set(timed["swift"]) == {"first", "steady"} and np.isfinite(list(timed["swift"].values())).all()


def _fewest_changes_by_brute_force(old, weight, counts, peak):
    """Every ordered table of ``R`` rank contents (``K`` distinct experts each) with
    these replica counts and no rank above ``peak``: the fewest slots changed from ``old``."""
    import itertools

    R, K = old.shape
    E = len(weight)
    sets = list(itertools.combinations(range(E), K))
    size = weight / counts
    best = None
    for table in itertools.product(sets, repeat=R):
        if not np.array_equal(np.bincount(np.ravel(table), minlength=E), counts):
            continue
        if max(size[list(s)].sum() for s in table) > peak:
            continue
        moves = sum(len(set(s) - set(o)) for s, o in zip(table, old.tolist(), strict=True))
        best = moves if best is None else min(best, moves)
    return best


def test_min_moves_program_matches_brute_force_on_small_layers():
    from benchmarks.min_moves import min_moves

    rng = np.random.default_rng(5)
    checked = 0
    for _ in range(30):
        R, K, E = 3, 2, int(rng.integers(4, 6))
        old = np.stack([rng.choice(E, K, replace=False) for _ in range(R)])
        other = np.stack([rng.choice(E, K, replace=False) for _ in range(R)])  # its counts and peak are reachable
        counts = np.bincount(other.ravel(), minlength=E)
        if (counts == 0).any():
            continue
        weight = rng.gamma(0.5, 100, E)
        reach = ((weight / counts)[other]).sum(axis=1).max()
        found = min_moves(old, weight, counts, reach, seconds=30)
        expected = _fewest_changes_by_brute_force(old, weight, counts, reach)
        assert found.proven and found.moves == expected == found.bound
        table = found.table  # the table behind it: these counts, within reach, that many slots changed
        assert np.array_equal(np.bincount(table.ravel(), minlength=E), counts)
        assert ((weight / counts)[table]).sum(axis=1).max() <= reach * (1 + 1e-9)
        assert (table != old).sum() == expected and all(len(set(row)) == K for row in table.tolist())
        below = min_moves(old, weight, counts, 0.99 * weight.sum() / R, seconds=30)  # under the mean: impossible
        assert not below.proven and below.moves is None and below.bound == np.inf
        checked += 1
    assert checked >= 10


def test_moves_bound_hand_checked_path():
    from benchmarks.moves_bound import path_bound

    # 3 experts on 2 ranks x 2 slots. Window 0 [2, 1, 1]: only {0,1}{0,2} reaches peak 2 (a
    # doubled expert 1 or 2 leaves a rank at 2.5). Window 1 [1, 1, 2]: only {0,2}{1,2}. The
    # rank holding {0,2} keeps it; {0,1} -> {1,2} changes one slot.
    windows = np.array([[2.0, 1, 1], [1, 1, 2]])
    assert path_bound(windows, 2, 2, fit=1.0) == 1
    assert path_bound(windows, 2, 2, fit=0.8) == 0  # peak 2.5 allowed: {0,1}{0,2} fits both


def test_moves_bound_matches_brute_force_over_labelled_tables():
    import itertools

    from benchmarks.moves_bound import path_bound

    rng = np.random.default_rng(3)
    E, R, K = 4, 3, 2
    contents = list(itertools.combinations(range(E), K))
    tables = [t for t in itertools.product(contents, repeat=R) if len(set().union(*t)) == E]

    def peak(table, w):
        counts = np.bincount(np.ravel(table), minlength=E)
        return max(sum(w[e] / counts[e] for e in rank) for rank in table)

    for _ in range(10):
        windows = rng.gamma(0.7, 10, (3, E))
        fit = float(rng.choice([1.0, 0.97, 0.9]))
        fitting = []
        for w in windows:
            peaks = [peak(t, w) for t in tables]
            fitting.append([t for t, p in zip(tables, peaks, strict=True) if p <= min(peaks) / fit * (1 + 1e-12)])
        cost = {t: 0 for t in fitting[0]}
        for after in fitting[1:]:
            cost = {b: min(c + sum(len(set(nb) - set(na)) for na, nb in zip(a, b, strict=True))
                           for a, c in cost.items()) for b in after}
        assert path_bound(windows, R, K, fit) == min(cost.values())
