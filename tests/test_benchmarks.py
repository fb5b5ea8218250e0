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
