"""Where the plugin hooks into vLLM Ascend (installed by ``register()`` in workers).

vLLM Ascend's ``NPUModelRunner`` (``worker/model_runner_v1.py``) overrides ``load_model``
and ``_model_forward`` without calling ``super()``, so the vLLM runner hooks never run
there. Its dynamic EPLB (``eplb_config.dynamic_eplb``) owns the heat (each fused MoE
layer's ``moe_load``), the cadence and the weight moves; the plugin plugs into that flow
and counts nothing itself:

- ``PolicyFactory.generate_policy``: returns :class:`~.ascend_policy.PluginPolicy`, the
  ``eplb`` section's policy, instead of the ``eplb_policy_type`` one. vLLM Ascend calls it
  in ``NPUModelRunner.__init__``, inside vLLM's config context, and hands the instance
  to its EPLB process.
- ``EplbWorker.__init__``: lets EP rank 0's policy report its plans to Prometheus.
- ``EplbUpdator.__init__``: remembers whether its EPLB process runs our policy.
- ``EplbUpdator.warm_up_eplb``: verifies the expert maps across the EP ranks at start-up,
  once the layers built them (from ``expert_map_path`` when set).
- ``EplbUpdator.forward_before``: when it takes a plan from the EPLB process, verifies the
  new maps across the EP ranks before any weight moves (each rank plans on its own).

vLLM Ascend's newer runner ("MRv2", ``VLLM_USE_V2_MODEL_RUNNER=1``) refuses dynamic EPLB
and drives vLLM's own ``EplbState`` under ``--enable-eplb``; :mod:`.vllm_hooks` covers
that path. Without an ``eplb`` section every hook calls straight through.
"""

from __future__ import annotations

import logging
from typing import Any, Callable

import numpy as np

from ..config import EplbConfig
from ..consistency import verify_consistency
from .patching import PatchTarget, check_targets, patch

logger = logging.getLogger("vllm.eplb_plugin")

SUPPORTED = "vLLM Ascend 0.23.0.post1"
_FACTORY = "vllm_ascend.eplb.core.policy.policy_factory"
_UPDATOR = "vllm_ascend.eplb.eplb_updator"
_WORKER = "vllm_ascend.eplb.core.eplb_worker"
TARGETS = (
    PatchTarget(_FACTORY, "PolicyFactory.generate_policy", ("policy_type",)),
    PatchTarget(_WORKER, "EplbWorker.__init__", ("self", "shared_dict", "policy_type")),
    PatchTarget(_UPDATOR, "EplbUpdator.__init__", ("self", "eplb_config", "loader", "eplb_process", "process")),
    PatchTarget(_UPDATOR, "EplbUpdator.warm_up_eplb", ("self",)),
    PatchTarget(_UPDATOR, "EplbUpdator.forward_before", ("self",)),
    PatchTarget(_UPDATOR, "EplbUpdator.get_update_info_flag", ("self",)),
    # Not patched, but what calls the policy and what its plans must pass.
    PatchTarget(_WORKER, "EplbWorker.calculate_rebalance_experts", ("self", "load_info", "old_placement")),
    PatchTarget(_WORKER, "EplbWorker.check_expert_placement", ("self", "old_placement", "new_placement")),
)
_STATE = "_vllm_eplb_plugin_config"


def check_ascend_targets() -> None:
    """Raise :class:`~.patching.EngineMismatch` when a hooked vLLM Ascend method drifted."""
    check_targets(TARGETS, "vLLM Ascend", SUPPORTED)


def active_config() -> EplbConfig | None:
    """The ``eplb`` section of the vLLM config being built, or None (plugin off)."""
    from vllm.config import get_current_vllm_config_or_none

    vllm_config = get_current_vllm_config_or_none()
    if vllm_config is None:
        logger.warning("EPLB plugin: vLLM Ascend built its EPLB outside vLLM's config context; "
                       "the plugin cannot see an eplb section and stays off")
        return None
    return EplbConfig.from_additional_config(vllm_config.additional_config or {}, ascend=True)


def install_ascend() -> None:
    """Patch vLLM Ascend's EPLB; idempotent. A vLLM Ascend without these classes is
    reported at start-up (:func:`check_ascend_targets`) when an eplb section is set."""
    try:
        from vllm_ascend.eplb.core.eplb_worker import EplbWorker
        from vllm_ascend.eplb.core.policy.policy_factory import PolicyFactory
        from vllm_ascend.eplb.eplb_updator import EplbUpdator
    except ImportError as exc:
        logger.debug("EPLB plugin: vLLM Ascend's EPLB does not import (%s); not hooked", exc)
        return
    patch(PolicyFactory, "generate_policy", _make_generate_policy)
    patch(EplbWorker, "__init__", _make_worker_init)
    patch(EplbUpdator, "__init__", _make_updator_init)
    patch(EplbUpdator, "warm_up_eplb", _make_warm_up)
    patch(EplbUpdator, "forward_before", _make_forward_before)


def _make_generate_policy(original: Callable) -> Callable:
    def generate_policy(policy_type: int) -> Any:
        config = active_config()
        if config is None:
            return original(policy_type)
        from .ascend_policy import PluginPolicy

        policy = PluginPolicy(config)
        logger.info(
            "EPLB plugin: vLLM Ascend's dynamic EPLB will run policy %s (from additional_config.eplb; "
            "eplb_config.eplb_policy_type=%s only sets the load series shape), each plan in a child "
            "process with plan_timeout_s=%g",
            policy.name, policy_type, config.plan_timeout_s,
        )
        return policy

    return generate_policy


def _make_worker_init(original: Callable) -> Callable:
    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        original(self, *args, **kwargs)
        from .ascend_policy import PluginPolicy

        if isinstance(self.policy, PluginPolicy):
            self.policy.reports = self.rank_id == 0

    return __init__


def _make_updator_init(original: Callable) -> Callable:
    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        original(self, *args, **kwargs)
        from .ascend_policy import PluginPolicy

        # The plugin is on exactly when the EPLB process runs our policy.
        policy = self.eplb_process.worker.policy
        setattr(self, _STATE, policy.config if isinstance(policy, PluginPolicy) else None)

    return __init__


def _verify(updator: Any, what: str) -> None:
    maps = np.asarray(updator.shared_dict["expert_maps"], dtype=np.int64)  # [L, R, E] local slot or -1
    verify_consistency(maps, updator.comm_group.cpu_group, what=what)


def _make_warm_up(original: Callable) -> Callable:
    def warm_up_eplb(self: Any) -> None:
        original(self)
        if getattr(self, _STATE, None) is not None:
            _verify(self, "vLLM Ascend's expert maps at start-up")

    return warm_up_eplb


def _make_forward_before(original: Callable) -> Callable:
    def forward_before(self: Any) -> None:
        takes_plan = getattr(self, _STATE, None) is not None and self.get_update_info_flag()
        original(self)
        if takes_plan:
            _verify(self, "vLLM Ascend's planned expert maps before the update")

    return forward_before
