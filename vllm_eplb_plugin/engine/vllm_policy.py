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

import numpy as np
import torch

from ..config import EplbConfig
from ..placement import default_table, expert_to_slot_load
from ..policy import EplbPolicy, PolicyConfig
from ..registry import create_policy


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
            slots = num_replicas // num_ranks
            if old_global_expert_indices is None:
                table = default_table(num_layers, num_ranks, slots, num_experts)
            else:
                table = old_global_expert_indices.detach().cpu().numpy().astype(np.int64)
                table = table.reshape(num_layers, num_ranks, slots)
            base = cls.plugin_policy
            runner = type(base)(
                PolicyConfig(
                    num_nodes=num_nodes,
                    num_groups=num_groups,
                    max_move=base.config.max_move,
                    options=dict(base.config.options),
                )
            )
            result = runner.rebalance_experts(table, expert_to_slot_load(table, load))
            new = np.asarray(result.new_table, dtype=np.int64).reshape(num_layers, num_replicas)
            return torch.from_numpy(new).to(weight.device)

    PluginEplbPolicy.__name__ = PluginEplbPolicy.__qualname__ = f"Plugin{type(policy).__name__}"
    return PluginEplbPolicy


def install_vllm_policy(config: EplbConfig, key: str = "default") -> type:
    """Make ``EplbState`` use the configured policy (it reads ``EPLB_POLICIES[key]``)."""
    from vllm.distributed.eplb import policy as vllm_policies

    cls = vllm_policy_class(create_policy(config.policy, config.policy_config()))
    vllm_policies.EPLB_POLICIES[key] = cls
    return cls

