"""Policies that misbehave on purpose, loaded as "module:Class" by planner and engine tests."""

import time

import numpy as np

from vllm_eplb_plugin.policy import EplbPolicy, PolicyResult


class RaisingPolicy(EplbPolicy):
    name = "raising"

    def rebalance_experts(self, current_expert_table, expert_workload):
        raise RuntimeError("boom from RaisingPolicy")


class InvalidTablePolicy(EplbPolicy):
    """Puts expert 0 twice on rank 0 and drops another expert."""

    name = "invalid-table"

    def rebalance_experts(self, current_expert_table, expert_workload):
        table = np.array(current_expert_table, copy=True)
        table[:, 0, :] = 0
        return PolicyResult(1, np.arange(table.shape[0]), table)


class SleepyPolicy(EplbPolicy):
    name = "sleepy"

    def rebalance_experts(self, current_expert_table, expert_workload):
        time.sleep(60)
        return PolicyResult(0, np.arange(len(current_expert_table)), current_expert_table)


class LatePolicy(EplbPolicy):
    """Plans like DeepSeek after 0.4 s: far past a 3-step interval of 10 ms steps."""

    name = "late"

    def rebalance_experts(self, current_expert_table, expert_workload):
        from vllm_eplb_plugin.policies.deepseek import DeepSeekPolicy

        time.sleep(0.4)
        return DeepSeekPolicy(self.config).rebalance_experts(current_expert_table, expert_workload)


class FlakyPolicy(EplbPolicy):
    """Raises, then returns an invalid table, then plans like DeepSeek: a server using it
    must log both failures and keep serving."""

    name = "flaky"

    def __init__(self, config=None):
        super().__init__(config)
        self.calls = 0

    def rebalance_experts(self, current_expert_table, expert_workload):
        self.calls += 1
        if self.calls == 1:
            raise RuntimeError("boom from FlakyPolicy")
        if self.calls == 2:
            return InvalidTablePolicy(self.config).rebalance_experts(current_expert_table, expert_workload)
        from vllm_eplb_plugin.policies.deepseek import DeepSeekPolicy

        return DeepSeekPolicy(self.config).rebalance_experts(current_expert_table, expert_workload)


class SlotShufflePolicy(EplbPolicy):
    """Plans like DeepSeek, then reverses every rank's slot order: experts that stay on a
    rank change slot, which vLLM Ascend's check_expert_placement refuses."""

    name = "slot-shuffle"

    def rebalance_experts(self, current_expert_table, expert_workload):
        from vllm_eplb_plugin.policies.deepseek import DeepSeekPolicy

        result = DeepSeekPolicy(self.config).rebalance_experts(current_expert_table, expert_workload)
        return PolicyResult(True, result.priority, np.ascontiguousarray(result.new_table[..., ::-1]))


class KeepPolicy(EplbPolicy):
    """Returns the current table: a plan that improves nothing."""

    name = "keep"

    def rebalance_experts(self, current_expert_table, expert_workload):
        table = np.array(current_expert_table, copy=True)
        return PolicyResult(False, np.arange(table.shape[0]), table)


class BrokenInitPolicy(EplbPolicy):
    """Raises while being built (e.g. it needs hardware that is not there)."""

    name = "broken-init"

    def __init__(self, config=None):
        raise RuntimeError("no GPU for this policy")

    def rebalance_experts(self, current_expert_table, expert_workload):
        raise AssertionError("never built")


from vllm_eplb_plugin.policy import PlacementPolicy  # noqa: E402


class AbstractPolicy(PlacementPolicy):
    """Forgets to implement place()."""

    name = "abstract"


# --- policies that break the process they run in (planner child, conformance child) -------

import os  # noqa: E402
import signal  # noqa: E402


def _refuse_to_load():
    raise RuntimeError("this object cannot be rebuilt outside the planner child")


class _Unloadable:
    """Pickles fine; unpickling it raises (as a class only the child can import would)."""

    def __reduce__(self):
        return (_refuse_to_load, ())


class UnloadableResultPolicy(EplbPolicy):
    """Returns a table the parent cannot unpickle."""

    name = "unloadable-result"

    def rebalance_experts(self, current_expert_table, expert_workload):
        return PolicyResult(True, np.arange(len(current_expert_table)), _Unloadable())


class UnsendableResultPolicy(EplbPolicy):
    """Returns a table the child cannot pickle (a lambda)."""

    name = "unsendable-result"

    def rebalance_experts(self, current_expert_table, expert_workload):
        return PolicyResult(True, np.arange(len(current_expert_table)), lambda: current_expert_table)


class ForkingPolicy(EplbPolicy):
    """Forks a grandchild that sleeps (holding the child's pipes), and exits: the child is
    gone but no end of file comes. The grandchild's pid goes to $EPLB_TEST_PID_FILE."""

    name = "forking"

    def rebalance_experts(self, current_expert_table, expert_workload):
        if os.fork() == 0:
            with open(os.environ["EPLB_TEST_PID_FILE"], "w") as f:
                f.write(str(os.getpid()))
            time.sleep(60)
            os._exit(0)
        time.sleep(0.2)  # the grandchild has written its pid
        self.after_fork()

    def after_fork(self):
        os._exit(0)


class ForkingHangingPolicy(ForkingPolicy):
    """Forks a grandchild that sleeps, and hangs itself."""

    name = "forking-hanging"

    def after_fork(self):
        time.sleep(60)


class SlowStartHangOncePolicy(EplbPolicy):
    """Takes 0.8 s to build (a heavy import); its first call ever hangs (the marker file
    $EPLB_TEST_MARKER does not exist yet), later calls plan like DeepSeek."""

    name = "slow-start-hang-once"

    def __init__(self, config=None):
        super().__init__(config)
        time.sleep(0.8)

    def rebalance_experts(self, current_expert_table, expert_workload):
        marker = os.environ["EPLB_TEST_MARKER"]
        if not os.path.exists(marker):
            open(marker, "w").close()
            time.sleep(60)
        from vllm_eplb_plugin.policies.deepseek import DeepSeekPolicy

        return DeepSeekPolicy(self.config).rebalance_experts(current_expert_table, expert_workload)


class _Exits(EplbPolicy):
    """Ends its process on every call (``exit`` is overridden by each subclass)."""

    def rebalance_experts(self, current_expert_table, expert_workload):
        self.exit()

    def exit(self):
        raise NotImplementedError


class SystemExitZeroPolicy(_Exits):
    name = "system-exit-0"

    def exit(self):
        raise SystemExit(0)


class SystemExitThreePolicy(_Exits):
    name = "system-exit-3"

    def exit(self):
        raise SystemExit(3)


class OsExitZeroPolicy(_Exits):
    name = "os-exit-0"

    def exit(self):
        os._exit(0)


class OsExitSevenPolicy(_Exits):
    name = "os-exit-7"

    def exit(self):
        os._exit(7)


class SigkillPolicy(_Exits):
    name = "sigkill"

    def exit(self):
        os.kill(os.getpid(), signal.SIGKILL)


class ChildBrokenInitPolicy(EplbPolicy):
    """Builds in the process whose pid is $EPLB_TEST_PARENT_PID (so the config check
    passes there) and raises while being built anywhere else, as in the planner child."""

    name = "child-broken-init"

    def __init__(self, config=None):
        super().__init__(config)
        if os.getpid() != int(os.environ["EPLB_TEST_PARENT_PID"]):
            raise RuntimeError("no GPU for this policy in the child")

    def rebalance_experts(self, current_expert_table, expert_workload):
        raise AssertionError("never built")


class ClosesItsPipesPolicy(EplbPolicy):
    """Closes every file descriptor above stderr (the planner's result pipe among them)
    and hangs: the parent sees the end of the pipe from a child that does not exit."""

    name = "closes-its-pipes"

    def rebalance_experts(self, current_expert_table, expert_workload):
        os.closerange(3, 4096)
        time.sleep(60)


def __getattr__(name):
    """``ParentOnlyPolicy`` exists only in the process whose pid is $EPLB_TEST_PARENT_PID:
    a policy that a child process cannot load."""
    if name == "ParentOnlyPolicy" and os.getpid() == int(os.environ.get("EPLB_TEST_PARENT_PID", "-1")):
        return KeepPolicy
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
