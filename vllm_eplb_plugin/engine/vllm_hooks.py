"""Where the plugin hooks into vLLM 0.32 (installed by ``register()``).

- ``EngineArgs.create_engine_config``: validates the ``eplb`` section in the first
  process, so a bad config stops ``vllm serve`` at start-up with the validator's message.
- ``GPUModelRunner.load_model`` (and the CPU runner's): attaches the per-worker EPLB state
  after the model is loaded (collector on the routers, start-up consistency check,
  planner, and vLLM's own EPLB policy slot when ``--enable-eplb`` is on).
- ``GPUModelRunner._model_forward``: arms the heat counter for the real forward of a step
  and ticks the planning loop after it. Profile, dummy and warm-up runs call the model
  directly, so they count nothing.
- ``BaseRouter.set_capture_fn``: keeps our collector chained when another feature
  (``--enable-return-routed-experts``) sets its capture function after us.

Every patch checks for its own marker, so installing twice is a no-op.
"""

from __future__ import annotations

import functools
import sys
from typing import Any, Callable

_MARK = "_vllm_eplb_plugin_patched"


def _patch(cls: type, name: str, make: Callable[[Callable], Callable]) -> None:
    original = cls.__dict__.get(name)
    if original is None or getattr(original, _MARK, False):
        return
    wrapped = functools.wraps(original)(make(original))
    setattr(wrapped, _MARK, True)
    setattr(cls, name, wrapped)


def install() -> None:
    """Patch what this process has loaded; idempotent and inert without an eplb section."""
    if "vllm.engine.arg_utils" in sys.modules:
        _install_config_check()
    # Workers call load_general_plugins() from worker_base; other processes never load a model.
    if "vllm.v1.worker.worker_base" in sys.modules:
        _install_worker_hooks()


def _install_config_check() -> None:
    from vllm.engine.arg_utils import EngineArgs

    def make(original: Callable) -> Callable:
        def create_engine_config(self: Any, *args: Any, **kwargs: Any) -> Any:
            config = original(self, *args, **kwargs)
            from .vllm_worker import check_engine_config

            check_engine_config(config)
            return config

        return create_engine_config

    _patch(EngineArgs, "create_engine_config", make)


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

    for cls in runners:
        _patch(cls, "load_model", make_load)
    _patch(GPUModelRunner, "_model_forward", make_forward)
    _patch(BaseRouter, "set_capture_fn", make_set_capture)
