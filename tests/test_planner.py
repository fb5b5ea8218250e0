"""The planning child process: real subprocess, real policies, misbehaving ones too."""

import re
import time
from pathlib import Path

import numpy as np
import pytest

from vllm_eplb_plugin.config import EplbConfig
from vllm_eplb_plugin.placement import default_table, validate_table
from vllm_eplb_plugin.metrics import balancedness
from vllm_eplb_plugin.planner import Planner, PlanStatus, review_plan
from vllm_eplb_plugin.policies.deepseek import DeepSeekPolicy
from vllm_eplb_plugin.placement import expert_to_slot_load

HELPERS = str(Path(__file__).parent / "helpers")


@pytest.fixture(autouse=True)
def _helpers_importable(monkeypatch):
    monkeypatch.syspath_prepend(HELPERS)  # the planner hands sys.path to its child


def _wait(planner: Planner, timeout: float = 30.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        outcome = planner.poll()
        if outcome is not None:
            return outcome
        time.sleep(0.01)
    raise AssertionError("planner gave no outcome")


def _case():
    table = default_table(3, 4, 3, 10)  # 3 layers, 4 ranks x 3 slots, 10 experts + 2 redundant
    heat = np.random.default_rng(1).zipf(1.5, size=(3, 10)).astype(float)
    return table, heat


def test_plan_equals_the_policy_run_in_process():
    table, heat = _case()
    planner = Planner(EplbConfig(policy="deepseek"))
    try:
        assert planner.poll() is None  # nothing in flight
        planner.submit(table, heat)
        outcome = _wait(planner)
    finally:
        planner.close()
    assert outcome.status is PlanStatus.ADOPT, outcome.message
    planned = DeepSeekPolicy().rebalance_experts(table, expert_to_slot_load(table, heat)).new_table
    better = balancedness(planned, heat) > balancedness(table, heat)  # the layers a plan may change
    assert better.any()
    np.testing.assert_array_equal(outcome.new_table, np.where(better[:, None, None], planned, table))
    validate_table(outcome.new_table, 10)
    changed = [l for l in range(3) if better[l] and (planned[l] != table[l]).any()]
    assert list(outcome.changed_layers) == changed


def test_child_keeps_serving_requests():
    table, heat = _case()
    planner = Planner(EplbConfig(policy="deepseek"))
    try:
        for _ in range(3):
            planner.submit(table, heat)
            assert _wait(planner).status is PlanStatus.ADOPT
        with pytest.raises(RuntimeError, match="already in flight"):
            planner.submit(table, heat)
            planner.submit(table, heat)
    finally:
        planner.close()


@pytest.mark.parametrize(
    "policy, reason",
    [
        ("flaky_policies:RaisingPolicy", "policy raised: Traceback.*boom from RaisingPolicy"),
        ("flaky_policies:InvalidTablePolicy", "invalid result: policy's new table.*layer 0"),
    ],
)
def test_failures_are_outcomes_with_reasons(policy, reason):
    table, heat = _case()
    planner = Planner(EplbConfig(policy=policy))
    try:
        planner.submit(table, heat)
        outcome = _wait(planner)
        assert outcome.status is PlanStatus.FAILED and outcome.new_table is table
        assert re.search(reason, outcome.message, re.S), outcome.message
    finally:
        planner.close()


def test_timeout_kills_the_child_and_the_next_request_gets_a_fresh_one():
    table, heat = _case()
    planner = Planner(EplbConfig(policy="flaky_policies:SleepyPolicy", plan_timeout_s=1.0))
    try:
        planner.submit(table, heat)
        outcome = planner.wait()
        assert outcome.status is PlanStatus.FAILED and "timed out after 1 s (plan_timeout_s)" in outcome.message
        assert planner._proc is None
    finally:
        planner.close()


def test_child_dying_mid_plan_is_reported_and_replaced():
    table, heat = _case()
    planner = Planner(EplbConfig(policy="flaky_policies:SleepyPolicy"))
    try:
        planner.submit(table, heat)
        planner._proc.kill()
        outcome = _wait(planner)
        assert outcome.status is PlanStatus.FAILED and "exited with code -9" in outcome.message
        assert planner._proc is None
    finally:
        planner.close()


def test_a_plan_that_improves_nothing_is_a_keep_with_the_current_table():
    table, heat = _case()
    planner = Planner(EplbConfig(policy="deepseek"))
    try:
        planner.submit(table, heat)
        first = planner.wait()
        planner.submit(first.new_table, heat)  # re-planning the planned table gains nothing
        second = planner.wait()
    finally:
        planner.close()
    assert first.status is PlanStatus.ADOPT
    assert second.status is PlanStatus.KEEP and second.changed_layers == ()
    assert second.message == "the plan improves no layer on its window"
    np.testing.assert_array_equal(second.new_table, first.new_table)


def test_review_refuses_layers_that_move_an_expert_within_a_rank():
    # 2 layers, 2 ranks x 2 slots, 3 experts, expert 0 hot; expert 1 has two replicas.
    old = np.array([[[0, 1], [1, 2]], [[0, 1], [1, 2]]])
    load = np.array([[90.0, 5.0, 5.0], [90.0, 5.0, 5.0]])
    # Rank loads before: 90 + 2.5 = 92.5 and 2.5 + 5 = 7.5. Both plans replicate expert 0
    # instead (45 + 5 = 50 on each rank), but layer 1's rank 1 keeps expert 1 and moves it
    # from slot 0 to slot 1, which vLLM Ascend refuses.
    new = np.array([[[0, 2], [1, 0]], [[0, 2], [0, 1]]])
    table, layers, note = review_plan(old, new, load)
    np.testing.assert_array_equal(table[0], new[0])  # rank 1 gains 0 in a free slot: fine
    np.testing.assert_array_equal(table[1], old[1])  # rank 1 keeps expert 1 but moves it to slot 1
    assert layers == (0,)
    assert note.startswith("layers [1] kept: the plan moves an expert between slots of a rank that keeps it")
