"""The planning child process: real subprocess, real policies, misbehaving ones too."""

import os
import re
import time
from pathlib import Path

import numpy as np
import pytest

from vllm_eplb_plugin.config import EplbConfig
from vllm_eplb_plugin.metrics import balancedness
from vllm_eplb_plugin.placement import default_table, expert_to_slot_load, validate_table
from vllm_eplb_plugin.planner import Planner, PlanStatus, PolicyChild, review_plan
from vllm_eplb_plugin.policies.deepseek import DeepSeekPolicy

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


def _gone(pid: int, timeout: float = 5.0) -> bool:
    """The process has exited (gone, or a zombie its new parent has not reaped yet)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                    return True
        except FileNotFoundError:
            return True
        time.sleep(0.05)
    return False


def _assert_next_plan_works(planner: Planner, table, heat):
    planner.submit(table, heat)
    outcome = planner.wait()
    assert outcome.status is PlanStatus.ADOPT, outcome.message


def test_timeout_kills_the_child_and_a_fresh_one_plans_the_next_request():
    table, heat = _case()
    planner = Planner(EplbConfig(policy="flaky_policies:SleepyPolicy", plan_timeout_s=1.0))
    try:
        planner.submit(table, heat)
        old = planner._child.pid
        outcome = planner.wait()
        assert outcome.status is PlanStatus.FAILED
        assert outcome.message == "policy timed out after 1 s (plan_timeout_s); the child was restarted"
        assert _gone(old) and planner._child.pid != old  # restarted at once, not at the next request
    finally:
        planner.close()


@pytest.mark.parametrize("signum, message", [(9, "planner child was killed by signal 9"),
                                             (15, "planner child was killed by signal 15")])
def test_child_dying_mid_plan_is_reported_and_replaced(signum, message):
    table, heat = _case()
    planner = Planner(EplbConfig(policy="flaky_policies:SleepyPolicy"))
    try:
        planner.submit(table, heat)
        old = planner._child.pid
        os.kill(old, signum)
        outcome = _wait(planner)
        assert outcome.status is PlanStatus.FAILED and outcome.message == message + "; the child was restarted"
        assert _gone(old) and planner._child.pid != old
    finally:
        planner.close()


def test_a_result_the_parent_cannot_unpickle_is_reported_as_such_and_the_child_serves_on():
    table, heat = _case()
    planner = Planner(EplbConfig(policy="flaky_policies:UnloadableResultPolicy", plan_timeout_s=5.0))
    try:
        planner.submit(table, heat)
        pid = planner._child.pid
        outcome = planner.wait()
        assert outcome.status is PlanStatus.FAILED, outcome.message
        assert outcome.message == ("policy result could not be unpickled: RuntimeError: "
                                   "this object cannot be rebuilt outside the planner child")
        planner.submit(table, heat)  # the reader thread lives on: the same child answers again
        assert "could not be unpickled" in planner.wait().message and planner._child.pid == pid
    finally:
        planner.close()


def test_a_result_the_child_cannot_pickle_is_reported_as_such():
    table, heat = _case()
    planner = Planner(EplbConfig(policy="flaky_policies:UnsendableResultPolicy", plan_timeout_s=5.0))
    try:
        planner.submit(table, heat)
        outcome = planner.wait()
        assert outcome.status is PlanStatus.FAILED
        assert outcome.message.startswith("policy result could not be pickled: "), outcome.message
        assert "lambda" in outcome.message
    finally:
        planner.close()


def test_a_policy_that_forks_and_exits_is_an_exit_and_its_grandchild_is_killed(tmp_path, monkeypatch):
    pid_file = tmp_path / "grandchild.pid"
    monkeypatch.setenv("EPLB_TEST_PID_FILE", str(pid_file))
    table, heat = _case()
    planner = Planner(EplbConfig(policy="flaky_policies:ForkingPolicy", plan_timeout_s=20.0))
    try:
        planner.submit(table, heat)
        child = planner._child.pid
        start = time.monotonic()
        outcome = planner.wait()
        assert time.monotonic() - start < 5.0  # seen as an exit, not waited out as a timeout
        assert outcome.status is PlanStatus.FAILED
        assert outcome.message == "planner child exited with code 0; the child was restarted"
        grandchild = int(pid_file.read_text())
        assert _gone(child) and _gone(grandchild), "the policy's grandchild outlived the planner child"
    finally:
        planner.close()


def test_a_child_that_closes_its_result_pipe_and_hangs_is_reported_and_killed():
    table, heat = _case()
    planner = Planner(EplbConfig(policy="flaky_policies:ClosesItsPipesPolicy", plan_timeout_s=30.0))
    try:
        planner.submit(table, heat)
        old = planner._child.pid
        outcome = planner.wait()
        assert outcome.message == "planner child closed its result pipe; the child was restarted"
        assert _gone(old)
    finally:
        planner.close()


def test_close_kills_what_the_policy_forked(tmp_path, monkeypatch):
    pid_file = tmp_path / "grandchild.pid"
    monkeypatch.setenv("EPLB_TEST_PID_FILE", str(pid_file))
    table, heat = _case()
    planner = Planner(EplbConfig(policy="flaky_policies:ForkingHangingPolicy"))
    planner.submit(table, heat)
    child = planner._child.pid
    deadline = time.monotonic() + 10
    while not (pid_file.exists() and pid_file.read_text()) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert planner.poll() is None  # the policy is still at it
    planner.close()
    assert _gone(child) and _gone(int(pid_file.read_text())) and planner._child is None


def test_a_policy_that_cannot_be_built_is_reported_and_the_next_plan_tries_again(monkeypatch):
    monkeypatch.setenv("EPLB_TEST_PARENT_PID", str(os.getpid()))
    table, heat = _case()
    planner = Planner(EplbConfig(policy="flaky_policies:ChildBrokenInitPolicy"))
    try:
        for _ in range(2):
            planner.submit(table, heat)
            outcome = planner.wait()
            assert outcome.status is PlanStatus.FAILED
            assert outcome.message.startswith("planner child could not build the policy: Traceback")
            assert outcome.summary.startswith("planner child could not build the policy: ")
            assert "RuntimeError: no GPU for this policy in the child" in outcome.summary.splitlines()[0]
    finally:
        planner.close()


def test_start_up_is_bounded_on_its_own_and_reported_as_such():
    table, heat = _case()
    planner = Planner(EplbConfig(policy="flaky_policies:SlowStartHangOncePolicy", plan_timeout_s=5.0))
    planner.startup_timeout_s = 0.3  # the policy takes 0.8 s to build
    try:
        planner.submit(table, heat)
        old = planner._child.pid
        outcome = planner.wait()
        assert outcome.status is PlanStatus.FAILED and _gone(old)
        assert outcome.message == ("planner child not ready within 0.3 s (imports and policy set-up); "
                                   "the child was restarted")
    finally:
        planner.close()


def test_after_a_kill_the_next_plan_works_even_when_start_up_exceeds_plan_timeout_s(tmp_path, monkeypatch):
    """The restart cost (imports + a policy that takes 0.8 s to build) is longer than
    plan_timeout_s. Charged to the next request, every later plan would time out and
    kill the child that was still starting: the planner never catches up."""
    monkeypatch.setenv("EPLB_TEST_MARKER", str(tmp_path / "hung-once"))
    table, heat = _case()
    planner = Planner(EplbConfig(policy="flaky_policies:SlowStartHangOncePolicy", plan_timeout_s=0.5))
    try:
        planner.submit(table, heat)  # the first call ever hangs: killed after 0.5 s
        assert "timed out after 0.5 s" in planner.wait().message
        assert not planner.ready  # the fresh child is still starting (0.8 s > 0.5 s)
        for _ in range(3):  # submitted at once: its deadline runs from when the child is ready
            _assert_next_plan_works(planner, table, heat)
        assert planner.ready
    finally:
        planner.close()


def test_replies_to_other_requests_are_not_taken_for_this_one():
    table, heat = _case()
    child = PolicyChild(_echo_handler, ())
    try:
        child.send(1, "stale")
        answer = child.call(2, "fresh", 10.0)
        assert answer.value == "fresh"
    finally:
        child.kill()
    assert _gone(child.pid)


def _echo_handler():
    return lambda payload: payload


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


def test_a_step_counting_caller_that_counts_while_ready_gets_the_next_plan_after_a_restart():
    """The loop's case: steps of a few ms, plans due within 8 steps. A restarted child
    needs ~0.3 s to import and build the policy; a caller that counts those steps against
    the plan kills the starting child every time and never gets a plan again. Counting only
    while ``planner.ready``, the first plan after the restart is taken."""
    table, heat = _case()
    planner = Planner(EplbConfig(policy="deepseek"))
    try:
        planner.warm()
        planner.close()  # the kill after a plan that missed its interval, and the loop's warm()
        planner.warm()
        planner.submit(table, heat)
        steps = 0
        while (outcome := planner.poll()) is None:
            time.sleep(0.003)
            steps = steps + 1 if planner.ready else 0
            assert steps < 100, "no plan within 100 steps of a ready child"  # ~10 ms of work; slack for load
        assert outcome.status is PlanStatus.ADOPT, outcome.message
    finally:
        planner.close()
