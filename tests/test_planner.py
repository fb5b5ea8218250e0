"""The planning child process: real subprocess, real policies, misbehaving ones too."""

import re
import time
from pathlib import Path

import numpy as np
import pytest

from vllm_eplb_plugin.config import EplbConfig
from vllm_eplb_plugin.placement import default_table, validate_table
from vllm_eplb_plugin.planner import Planner
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
    assert outcome.ok, outcome.error
    expected = DeepSeekPolicy().rebalance_experts(table, expert_to_slot_load(table, heat)).new_table
    np.testing.assert_array_equal(outcome.new_table, expected)
    validate_table(outcome.new_table, 10)
    changed = [l for l in range(3) if (expected[l] != table[l]).any()]
    assert list(outcome.changed_layers) == changed


def test_child_keeps_serving_requests():
    table, heat = _case()
    planner = Planner(EplbConfig(policy="deepseek"))
    try:
        for _ in range(3):
            planner.submit(table, heat)
            assert _wait(planner).ok
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
        assert not outcome.ok and outcome.new_table is None
        assert re.search(reason, outcome.error, re.S), outcome.error
    finally:
        planner.close()


def test_timeout_kills_the_child_and_the_next_request_gets_a_fresh_one():
    table, heat = _case()
    planner = Planner(EplbConfig(policy="flaky_policies:SleepyPolicy"), timeout_s=1.0)
    try:
        planner.submit(table, heat)
        outcome = _wait(planner)
        assert not outcome.ok and "timed out after 1 s" in outcome.error
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
        assert not outcome.ok and "exited with code -9" in outcome.error
        assert planner._proc is None
    finally:
        planner.close()
