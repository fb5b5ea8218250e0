"""The engine-free planning loop on real gloo ranks (3 processes), with the real heat
counter and the real planner child: adopt, keep, failed plan, timeout, skip."""

from __future__ import annotations

import json
import os
import stat
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.helpers.gloo import run_gloo
from vllm_eplb_plugin.config import EplbConfig
from vllm_eplb_plugin.heat import HeatCounter
from vllm_eplb_plugin.loop import PlanningLoop
from vllm_eplb_plugin.metrics import balancedness
from vllm_eplb_plugin.placement import default_table, expert_to_slot_load, load_expert_map
from vllm_eplb_plugin.planner import review_plan
from vllm_eplb_plugin.registry import create_policy

sys.path.insert(0, str(Path(__file__).parent / "helpers"))  # flaky_policies, in ranks and the planner child

L, R, K, E, TOP_K, ROWS = 2, 3, 3, 8, 2, 16
INTERVAL = 4


def _routing(step: int, rank: int, skew_rank: int | None) -> torch.Tensor:
    """[ROWS, TOP_K] expert ids of one step: experts 0 and 1 take most tokens."""
    g = torch.Generator().manual_seed(step)
    ids = torch.multinomial(torch.tensor([8.0, 6, 1, 1, 1, 1, 1, 1]), TOP_K * ROWS, replacement=True, generator=g)
    ids = ids.reshape(ROWS, TOP_K)
    if rank == skew_rank:
        ids = (ids + 1) % E  # this rank counts other experts than its peers
    return ids


class _Observer:
    def __init__(self) -> None:
        self.plans: list[tuple] = []
        self.failures = 0

    def plan(self, *args) -> None:
        self.plans.append(args)

    def failed(self) -> None:
        self.failures += 1


def _run_loop(rank: int, world: int, eplb: dict, skew_rank: int | None, record: str | None, max_steps: int,
              fifo_after_start: bool = False) -> dict:
    config = EplbConfig(expert_heat_collection_interval=INTERVAL, expert_map_record_path=record, **eplb)
    counter = HeatCounter(L, E, ROWS, TOP_K, traced=False)
    observer = _Observer()
    loop = PlanningLoop(config, default_table(L, world, K, E), counter, None, observer=observer)
    if fifo_after_start and rank == 0:  # every rank's config passed the start-up check (the loop synced them)
        os.mkfifo(record)  # now the path is no regular file
    start = loop.table.copy()
    heat = np.zeros((L, E))
    try:
        # Every rank steps until the loop decided one plan (a broadcast decision, so all
        # ranks stop on the same step), or max_steps.
        while loop.steps < max_steps and (loop.pending_steps is not None or loop.steps < INTERVAL):
            ids = _routing(loop.steps, rank, skew_rank)
            counter.begin_step(ROWS)
            for layer in range(L):
                counter.count(layer, ids)
            if loop.steps < INTERVAL:
                heat += np.bincount(ids.reshape(-1).numpy(), minlength=E)[None, :]
            counter.end_step()
            loop.step()
            time.sleep(0.01)  # steps take time; the planner child plans meanwhile
    finally:
        loop.close()
    last = loop.last
    return {"start": start, "table": loop.table, "plans": loop.plans, "steps": loop.steps, "heat": heat,
            "status": None if last is None else last.status.value, "message": None if last is None else last.message,
            "observed": observer.plans, "failures": observer.failures, "pending": loop.pending_steps}


def test_adopt_every_rank_takes_the_same_reviewed_plan_and_rank_0_records_it(tmp_path):
    record = str(tmp_path / "plan.json")
    out = run_gloo(_run_loop, 3, args=({"policy": "deepseek"}, None, record, 2000))
    table, heat = out[0]["start"], out[0]["heat"]
    planned = create_policy("deepseek").rebalance_experts(table, expert_to_slot_load(table, heat)).new_table
    expected, layers, _ = review_plan(table, planned, heat)
    assert layers, "the case must change a layer"
    for rank in out:
        assert rank["plans"] == 1 and rank["steps"] == out[0]["steps"]  # in lockstep
        np.testing.assert_array_equal(rank["table"], expected)
    assert out[0]["status"] == "adopt" and len(out[0]["observed"]) == 1 and out[1]["observed"] == []
    before, after, n_layers, moved, _seconds = out[0]["observed"][0]
    assert after > before and n_layers == len(layers) and moved == int((expected != table).sum())
    np.testing.assert_array_equal(load_expert_map(record), expected)
    doc = json.loads(Path(record).read_text())
    assert doc["eplb"]["plan"] == 1 and doc["eplb"]["layers_changed"] == list(layers)
    np.testing.assert_allclose(doc["eplb"]["balancedness_after"], balancedness(expected, heat).round(6))


def test_keep_a_plan_that_improves_nothing_leaves_every_table():
    out = run_gloo(_run_loop, 3, args=({"policy": "flaky_policies:KeepPolicy"}, None, None, 2000))
    for rank in out:
        assert rank["plans"] == 0 and rank["pending"] is None
        np.testing.assert_array_equal(rank["table"], rank["start"])
    assert out[0]["status"] == "keep" and out[0]["message"] == "the plan improves no layer on its window"


@pytest.mark.parametrize(
    "eplb, message",
    [
        ({"policy": "flaky_policies:RaisingPolicy"}, "policy raised: Traceback"),
        ({"policy": "flaky_policies:SleepyPolicy", "algorithm_execution_interval": 3, "plan_timeout_s": 0.5},
         "policy timed out after 0.5 s (plan_timeout_s); the child was restarted"),
    ],
    ids=["raises", "too-slow"],
)
def test_a_failed_plan_keeps_every_table_and_is_counted(eplb, message):
    out = run_gloo(_run_loop, 3, args=(eplb, None, None, 2000))
    for rank in out:
        assert rank["plans"] == 0 and rank["pending"] is None
        np.testing.assert_array_equal(rank["table"], rank["start"])
    assert out[0]["status"] == "failed" and message in out[0]["message"]
    assert out[0]["failures"] == 1 and out[1]["failures"] == 0


def test_a_late_plan_is_waited_for_at_the_interval_not_dropped():
    # The policy needs 0.4 s; 3 steps of the loop take ~30 ms. The loop blocks on the plan
    # at step 3 after the window, so it lands then, on every rank, with nothing lost.
    eplb = {"policy": "flaky_policies:LatePolicy", "algorithm_execution_interval": 3}
    out = run_gloo(_run_loop, 3, args=(eplb, None, None, 2000))
    table, heat = out[0]["start"], out[0]["heat"]
    planned = create_policy("deepseek").rebalance_experts(table, expert_to_slot_load(table, heat)).new_table
    expected, layers, _ = review_plan(table, planned, heat)
    assert layers, "the case must change a layer"
    for rank in out:
        assert rank["plans"] == 1 and rank["steps"] == INTERVAL + 3  # decided at the interval, in lockstep
        np.testing.assert_array_equal(rank["table"], expected)
    assert out[0]["status"] == "adopt" and out[0]["failures"] == 0


def test_ranks_that_counted_different_heat_skip_the_plan():
    out = run_gloo(_run_loop, 3, args=({"policy": "deepseek"}, 2, None, INTERVAL + 1))
    for rank in out:
        assert rank["pending"] is None and rank["plans"] == 0 and rank["status"] is None
        np.testing.assert_array_equal(rank["table"], rank["start"])


def test_a_record_that_cannot_be_written_never_stops_the_loop(tmp_path):
    fifo = tmp_path / "record.json"
    out = run_gloo(_run_loop, 3, args=({"policy": "deepseek"}, None, str(fifo), 2000, True))
    assert [rank["plans"] for rank in out] == [1, 1, 1] and out[0]["status"] == "adopt", out[0]["message"]
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)


def _run_until_adopted(rank: int, world: int, eplb: dict, marker: str, max_steps: int) -> dict:
    os.environ["EPLB_TEST_MARKER"] = marker  # read by the policy in the planner child
    config = EplbConfig(expert_heat_collection_interval=INTERVAL, **eplb)
    counter = HeatCounter(L, E, ROWS, TOP_K, traced=False)
    observer = _Observer()
    loop = PlanningLoop(config, default_table(L, world, K, E), counter, None, observer=observer)
    try:
        while loop.steps < max_steps and loop.plans == 0:  # plans is broadcast: ranks stop together
            ids = _routing(loop.steps, rank, None)
            counter.begin_step(ROWS)
            for layer in range(L):
                counter.count(layer, ids)
            counter.end_step()
            loop.step()
            time.sleep(0.01)
    finally:
        loop.close()
    return {"plans": loop.plans, "steps": loop.steps, "failures": observer.failures}


def test_a_restarted_planner_child_catches_up_with_short_intervals(tmp_path):
    # The policy takes 0.8 s to build and hangs on its first call: after 3 steps the loop
    # blocks on that plan, which fails at plan_timeout_s, and the child is killed. Its
    # replacement needs 0.8 s before it can plan; the next plan waits for it and lands.
    eplb = {"policy": "flaky_policies:SlowStartHangOncePolicy", "algorithm_execution_interval": 3,
            "plan_timeout_s": 0.5}
    out = run_gloo(_run_until_adopted, 3, args=(eplb, str(tmp_path / "marker"), 1500))
    assert [rank["plans"] for rank in out] == [1, 1, 1]
    assert out[0]["failures"] == 1 and out[0]["steps"] < 1500
