"""Our policies behind vLLM's own EPLB policy contract.

vLLM's ``EplbState`` (``--enable-eplb``, CUDA/ROCm/XPU) calls
``EPLB_POLICIES[eplb_config.policy].rebalance_experts(weight, num_replicas, num_groups,
num_nodes, num_ranks, old_global_expert_indices)`` and expects ``phy2log``
``[L, num_replicas]``. :func:`vllm_policy_class` wraps one of ours in that contract;
:func:`install_vllm_policy` puts it where ``EplbState`` looks.

Shapes: ``weight [L, E]``; ``old_global_expert_indices`` and the result ``[L, S]`` with
``S = R * K`` physical slots, rank-major (slot ``s`` lives on rank ``s // K``).
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from ..config import EplbConfig
from ..moves import repair_table
from ..placement import default_table
from ..planner import check_plan
from ..policy import EplbPolicy, PolicyConfig
from ..registry import create_policy

logger = logging.getLogger("vllm.eplb_plugin")


def vllm_policy_class(policy: EplbPolicy) -> type:
    """A subclass of vLLM's ``AbstractEplbPolicy`` whose classmethod runs ``policy``.

    ``num_groups`` / ``num_nodes`` come from vLLM's call (they describe the deployment),
    overriding the policy's own; ``max_move`` and options stay as configured.
    """
    from vllm.distributed.eplb.policy.abstract import AbstractEplbPolicy

    class PluginEplbPolicy(AbstractEplbPolicy):
        plugin_policy = policy

        @classmethod
        def rebalance_experts(
            cls,
            weight: torch.Tensor,
            num_replicas: int,
            num_groups: int,
            num_nodes: int,
            num_ranks: int,
            old_global_expert_indices: torch.Tensor | None = None,
        ) -> torch.Tensor:
            load = weight.detach().cpu().double().numpy()  # [L, E]
            num_layers, num_experts = load.shape
            if num_replicas % num_ranks:
                raise ValueError(f"num_replicas={num_replicas} is not a multiple of num_ranks={num_ranks}")
            old = None
            if old_global_expert_indices is not None:
                old = old_global_expert_indices.detach().cpu().numpy().astype(np.int64)
                old = old.reshape(num_layers, num_ranks, num_replicas // num_ranks)
            base = cls.plugin_policy
            runner = type(base)(PolicyConfig(num_nodes=num_nodes, num_groups=num_groups,
                                             max_move=base.config.max_move, options=dict(base.config.options)))
            new = plan_or_keep(runner, old, load, num_ranks, num_replicas // num_ranks)
            return torch.from_numpy(new.reshape(num_layers, num_replicas)).to(weight.device)

    PluginEplbPolicy.__name__ = PluginEplbPolicy.__qualname__ = f"Plugin{type(policy).__name__}"
    return PluginEplbPolicy


def _start_table(old: np.ndarray | None, num_layers: int, num_ranks: int, slots: int, num_experts: int) -> np.ndarray:
    """The table to plan from: vLLM's old map, with the slots that break an invariant
    (-1 padding of elastic EP, an expert twice on a GPU) repaired; vLLM's default placement
    without one. Raises ``ValueError`` when no valid table exists (K > E)."""
    if old is None:
        return default_table(num_layers, num_ranks, slots, num_experts)
    start = repair_table(old, num_experts)
    if start is not old:
        logger.warning("EPLB plugin: vLLM's old map breaks the placement invariants in %d slots; planning from it "
                       "with those slots repaired", int((start != old).sum()))
    return start


def plan_or_keep(
    policy: EplbPolicy, old: np.ndarray | None, load: np.ndarray, num_ranks: int, slots: int
) -> np.ndarray:
    """Run ``policy`` on ``load [L, E]`` from ``old [L, R, K]`` (or vLLM's default
    placement); never raises inside vLLM's EplbState.

    A policy that raises or returns an invalid table keeps the table it started from;
    where no table without an expert twice on a rank exists (more slots per rank than
    experts), vLLM's map is kept as it is. Each case is one log line.
    """
    num_layers, num_experts = load.shape
    try:
        start = _start_table(old, num_layers, num_ranks, slots, num_experts)
    except ValueError as exc:  # K > E: every table repeats an expert on some rank
        logger.warning("EPLB plugin: keeping vLLM's map: %s", exc)
        if old is not None:
            return old
        return np.tile(np.arange(num_ranks * slots) % num_experts, (num_layers, 1)).reshape(
            num_layers, num_ranks, slots
        )
    try:
        result = policy.plan(start, load)
        return check_plan(start, result.new_table, num_experts)
    except Exception as exc:  # noqa: BLE001 - an exception here would stop vLLM's engine
        logger.error("EPLB plugin: policy %s failed inside vLLM's EplbState, keeping the placement: %s: %s",
                     policy.name or type(policy).__name__, type(exc).__name__, exc)
        return start


def install_vllm_policy(config: EplbConfig, key: str = "default") -> type:
    """Make ``EplbState`` use the configured policy (it reads ``EPLB_POLICIES[key]``)."""
    from vllm.distributed.eplb import policy as vllm_policies

    cls = vllm_policy_class(create_policy(config.policy, config.policy_config()))
    vllm_policies.EPLB_POLICIES[key] = cls
    return cls

