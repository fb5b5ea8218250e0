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
