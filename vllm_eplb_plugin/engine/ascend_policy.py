"""Our policies behind vLLM Ascend's policy contract.

vLLM Ascend's EPLB worker builds a policy with no arguments and calls
``rebalance_experts(current_expert_table, expert_workload)`` with ``[L, R, K]`` arrays,
unpacking ``(changed, priority, new_table)``. Our ``EplbPolicy`` already has that call
shape; :func:`ascend_policy_class` adds the base class and the no-argument constructor, so
an instance is what vLLM Ascend's ``PolicyFactory`` would return.
"""

from __future__ import annotations

from ..config import EplbConfig
from ..registry import create_policy


def ascend_policy_class(config: EplbConfig, base: type | None = None) -> type:
    """A subclass of vLLM Ascend's ``EplbPolicy`` (``base``; default: imported from
    ``vllm_ascend.eplb.core.policy.policy_abstract``) running the configured policy."""
    if base is None:
        from vllm_ascend.eplb.core.policy.policy_abstract import EplbPolicy as base  # noqa: N813

    ours = create_policy(config.policy, config.policy_config())

    class PluginAscendPolicy(base):  # type: ignore[misc, valid-type]
        plugin_policy = ours

        def __init__(self) -> None:  # vLLM Ascend's factory calls policy_class()
            pass

        def rebalance_experts(self, current_expert_table, expert_workload):
            return tuple(self.plugin_policy.rebalance_experts(current_expert_table, expert_workload))

    PluginAscendPolicy.__name__ = PluginAscendPolicy.__qualname__ = f"PluginAscend{type(ours).__name__}"
    return PluginAscendPolicy
