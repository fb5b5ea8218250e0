"""The plugin inside a vLLM worker: the heat collector and the vLLM adapter of the
planning loop (record mode).

One :class:`WorkerEplb` per model runner. Shapes: ``L`` MoE layers, ``E`` logical
experts, ``R`` EP ranks, ``K`` slots per rank; table ``[L, R, K]``; heat ``[L, E]`` (or
``[T, L, E]`` for the ``steps`` window).

Every step the routers' capture hooks count ``topk_ids`` on the device; after the step
the engine-free :class:`~vllm_eplb_plugin.loop.PlanningLoop` runs on vLLM's world group
(its CPU/gloo side; all ranks run the same forward steps under TP/PP, and data
parallelism is refused at start-up). This module holds what is vLLM's: the runner's
hooks, its host-side batch state, the routers, the start-up config check.

Without engine EPLB (CPU, or ``--enable-eplb`` off) weights do not move: each plan is
recorded for the next start (``expert_map_path``). With ``--enable-eplb``, vLLM's
``EplbState`` plans and moves weights by calling our policy through
:mod:`.vllm_policy`; the loop then only collects heat.
"""

from __future__ import annotations

import functools
import logging
from typing import Any, Callable

import numpy as np
import torch

from ..config import EplbConfig, EplbConfigError
from ..consistency import table_summary
from ..heat import HeatCounter
from ..loop import PlanningLoop
from ..placement import default_table, load_expert_map, num_experts_of
from ..registry import resolve_policy_name

# A child of vLLM's logger, so our lines go where vLLM's go, with its format and level.
logger = logging.getLogger("vllm.eplb_plugin")

STATE_ATTR = "_vllm_eplb_state"
_OURS = "_vllm_eplb_counts"  # marks our capture function on a router

# Keys of Hugging Face configs that give the number of routed experts.
_EXPERT_KEYS = ("num_experts", "n_routed_experts", "num_local_experts", "moe_num_experts")


# -- first process: config check ------------------------------------------------------------


def on_ascend() -> bool:
    """Whether this vLLM runs on vLLM Ascend's NPU platform."""
    from vllm.platforms import current_platform

    return current_platform.device_type == "npu"


def eplb_config_of(vllm_config: Any) -> EplbConfig | None:
    return EplbConfig.from_additional_config(getattr(vllm_config, "additional_config", None) or {}, ascend=on_ascend())


def plan_path(vllm_config: Any, ascend: bool) -> str:
    """Which code runs the plugin's policy with this engine config (for the start-up log);
    raises :class:`EplbConfigError` when none would."""
    if vllm_config.parallel_config.enable_eplb:
        runner = " (vLLM Ascend's model runner v2)" if ascend else ""
        return f"vLLM's EplbState{runner} calls it through EPLB_POLICIES and moves the weights"
    if not ascend:
        return "the plugin's planning loop runs it in a child process and records each plan (weights stay)"
    if getattr(vllm_config, "use_v2_model_runner", False):
        raise EplbConfigError(
            "eplb: vLLM Ascend's model runner v2 (VLLM_USE_V2_MODEL_RUNNER=1) runs EPLB only through vLLM's "
            "EplbState; pass --enable-eplb, or use the default runner with "
            "additional_config.eplb_config.dynamic_eplb=true."
        )
    ascend_section = (vllm_config.additional_config or {}).get("eplb_config") or {}
    if not ascend_section.get("dynamic_eplb", False):
        raise EplbConfigError(
            "eplb: on vLLM Ascend the plugin's policy runs inside vLLM Ascend's dynamic EPLB, which is off; set "
            'additional_config.eplb_config = {"dynamic_eplb": true} (and the environment variable DYNAMIC_EPLB=true), '
            "or remove the eplb section."
        )
    return "vLLM Ascend's dynamic EPLB (EplbWorker) calls it in its EPLB process and moves the weights"


def _model_experts(vllm_config: Any) -> int | None:
    hf = getattr(vllm_config.model_config, "hf_text_config", None) or vllm_config.model_config.hf_config
    for key in _EXPERT_KEYS:
        value = getattr(hf, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _ep_ranks(parallel_config: Any) -> int:
    """Ranks of vLLM's EP group: the ranks the experts are (or would be) spread over."""
    return parallel_config.tensor_parallel_size * parallel_config.data_parallel_size


def check_engine_config(vllm_config: Any) -> EplbConfig | None:
    """Validate the eplb section against the engine; raises :class:`EplbConfigError`.

    Runs in the first process (``EngineArgs.create_engine_config``), so ``vllm serve``
    stops before any worker starts.
    """
    ascend = on_ascend()
    config = EplbConfig.from_additional_config(vllm_config.additional_config or {}, ascend=ascend)
    if config is None:
        return None
    from .vllm_hooks import check_vllm_targets

    check_vllm_targets()
    if ascend:
        from .ascend_hooks import check_ascend_targets

        check_ascend_targets()
    path = plan_path(vllm_config, ascend)
    pc = vllm_config.parallel_config
    if pc.data_parallel_size > 1:
        raise EplbConfigError(
            f"eplb: data_parallel_size={pc.data_parallel_size} is not supported by the plugin's "
            "planning loop yet; run with data_parallel_size=1 or remove the eplb section."
        )
    experts = _model_experts(vllm_config)
    if experts is None:
        raise EplbConfigError(
            f"eplb: model {vllm_config.model_config.model!r} does not look like a MoE model "
            f"(its config has none of {list(_EXPERT_KEYS)}); remove the eplb section."
        )
    ranks = _ep_ranks(pc)
    if config.expert_map_path is not None:
        table = load_expert_map(config.expert_map_path)
        if num_experts_of(table) != experts:
            raise EplbConfigError(
                f"eplb.expert_map_path={config.expert_map_path!r}: the map places "
                f"{num_experts_of(table)} experts but the model has {experts}; use a map made for this model."
            )
    elif (experts + config.num_redundant_experts) % ranks:
        raise EplbConfigError(
            f"eplb.num_redundant_experts={config.num_redundant_experts}: {experts} experts + "
            f"{config.num_redundant_experts} redundant slots do not divide over {ranks} EP ranks; "
            f"choose a value that makes the sum a multiple of {ranks}."
        )
    if pc.enable_eplb:
        theirs = pc.eplb_config.num_redundant_experts
        if config.num_redundant_experts and theirs != config.num_redundant_experts:
            raise EplbConfigError(
                f"eplb.num_redundant_experts={config.num_redundant_experts} differs from vLLM's "
                f"--eplb-config num_redundant_experts={theirs}; with --enable-eplb set it once, in --eplb-config."
            )
    logger.info(
        "EPLB plugin on: policy %s, %d experts over %d ranks + %d redundant, heat window %s every %d steps; %s",
        resolve_policy_name(config.policy), experts, ranks, config.num_redundant_experts,
        config.heat_window, config.expert_heat_collection_interval, path,
    )
    return config


# -- worker: hooks --------------------------------------------------------------------------


def before_load(runner: Any) -> None:
    """With vLLM's EPLB on, put our policy where ``EplbState`` looks, before it is built."""
    config = eplb_config_of(runner.vllm_config)
    if config is not None and runner.parallel_config.enable_eplb:
        from .vllm_policy import install_vllm_policy

        cls = install_vllm_policy(config, runner.parallel_config.eplb_config.policy)
        logger.info("EPLB plugin: vLLM's EplbState will call %s", cls.__name__)


def after_load(runner: Any) -> None:
    if getattr(runner, STATE_ATTR, None) is not None:
        return
    config = eplb_config_of(runner.vllm_config)
    if config is not None:
        setattr(runner, STATE_ATTR, WorkerEplb(runner, config))


def chain_capture(router: Any, new_fn: Callable | None) -> Callable | None:
    """Keep our counter on ``router`` when someone else sets its capture function."""
    ours = getattr(router, _OURS, None)
    if ours is None or new_fn is ours or getattr(new_fn, "_eplb_chain", False):
        return new_fn
    if new_fn is None:
        return ours
    return _chained(new_fn, ours)


def _chained(first: Callable, second: Callable) -> Callable:
    def capture(topk_ids: torch.Tensor) -> None:
        first(topk_ids)
        second(topk_ids)

    capture._eplb_chain = True  # type: ignore[attr-defined]
    return capture


def _runs_eagerly(vllm_config: Any) -> bool:
    """Whether every forward runs the capture hook's Python: no torch.compile and no
    CUDA/NPU graph replay (then the heat counter may arm steps with a Python flag)."""
    cc = vllm_config.compilation_config
    return int(cc.mode) == 0 and str(getattr(cc.cudagraph_mode, "name", cc.cudagraph_mode)) in ("NONE", "None")


def _moe_layers(model: torch.nn.Module) -> list[Any]:
    """The model's fused-MoE runners in layer order."""
    from vllm.model_executor.layers.fused_moe.router.base_router import BaseRouter
    from vllm.model_executor.layers.fused_moe.runner.moe_runner import MoERunner

    layers = [m for m in model.modules() if isinstance(m, MoERunner)]
    unsupported = [type(m.router).__name__ for m in layers if not isinstance(m.router, BaseRouter)]
    if unsupported:
        raise RuntimeError(f"eplb: routers {sorted(set(unsupported))} have no capture hook; remove the eplb section")
    return sorted(layers, key=lambda m: m.layer_id)


# -- worker: state --------------------------------------------------------------------------


class WorkerEplb:
    """Heat counter, table and planning loop of one worker (see the module docstring)."""

    def __init__(self, runner: Any, config: EplbConfig) -> None:
        from vllm.distributed.parallel_state import get_world_group

        self.config = config
        layers = _moe_layers(runner.get_model())
        if not layers:
            raise RuntimeError("eplb: the model has no fused MoE layers; remove the eplb section")
        routers = [m.router for m in layers]
        self.num_layers, self.num_experts = len(routers), routers[0].global_num_experts
        self.counter = HeatCounter(
            self.num_layers,
            self.num_experts,
            runner.max_num_tokens,
            routers[0].top_k,
            window=config.heat_window,
            ema_decay=config.heat_ema_decay,
            window_steps=config.heat_window_steps,
            traced=not _runs_eagerly(runner.vllm_config),
            device=runner.device,
        )
        for i, router in enumerate(routers):
            ours = functools.partial(self.counter.count, i)
            setattr(router, _OURS, ours)
            router.set_capture_fn(router.capture_fn)  # chains ours onto whatever is there

        world = get_world_group()
        self.rank = world.rank_in_group
        engine_eplb = bool(runner.parallel_config.enable_eplb)
        self.metrics = None
        if self.rank == 0:
            from .prometheus import EplbMetrics

            self.metrics = EplbMetrics.shared()
            self.metrics.start_exporter(self.counter)  # daemon thread, ends with the worker
        self.loop = PlanningLoop(config, self._initial_table(_ep_ranks(runner.parallel_config)), self.counter,
                                 world.cpu_group, planning=not engine_eplb, observer=self.metrics)
        if self.rank == 0:
            table = self.loop.table
            logger.info(
                "EPLB: collecting heat on %d MoE layers x %d experts (top-%d, %s forward); table %s from %s "
                "(digest %x); %s",
                self.num_layers, self.num_experts, routers[0].top_k,
                "traced" if self.counter.traced else "eager", list(table.shape),
                config.expert_map_path or "vLLM's default placement", int(table_summary(table)[3]),
                "planning every %d steps" % config.expert_heat_collection_interval if self.loop.planning
                else "vLLM's EplbState plans" if engine_eplb else "dynamic_eplb off: no planning",
            )

    def _initial_table(self, ranks: int) -> np.ndarray:
        if self.config.expert_map_path is not None:
            table = load_expert_map(self.config.expert_map_path)
            if table.shape[0] != self.num_layers or num_experts_of(table) != self.num_experts:
                raise EplbConfigError(
                    f"eplb.expert_map_path={self.config.expert_map_path!r}: the map has {table.shape[0]} "
                    f"layers x {num_experts_of(table)} experts; the model has {self.num_layers} MoE layers x "
                    f"{self.num_experts} experts. Use a map recorded for this model."
                )
            return table
        slots = (self.num_experts + self.config.num_redundant_experts) // ranks
        return default_table(self.num_layers, ranks, slots, self.num_experts)

    # -- forward path ------------------------------------------------------------------------

    def begin_step(self, runner: Any, positions: torch.Tensor) -> None:
        """Arm the counter for this step: real, non-padding rows of the configured stage.
        ``positions`` ``[N]`` (or ``[3, N]`` with M-RoPE) sizes the step."""
        stage = None
        if self.config.heat_collection_stage != "all":
            stage = self._stage_rows(runner, positions.shape[-1]).to(positions.device, non_blocking=True)
        if not self.counter.traced:
            # Padding rows come last; the runner's host state says where they start.
            real = int(runner.query_start_loc.np[runner.input_batch.num_reqs])
            self.counter.begin_step(real, None if stage is None else stage[:real])
            return
        from vllm.forward_context import get_forward_context

        padding = get_forward_context().is_padding  # [N] bool on device; None: no padding
        real_rows = None if padding is None else ~padding
        if stage is not None:
            real_rows = stage if real_rows is None else real_rows & stage
        self.counter.begin_step(positions.shape[-1], real_rows)

    def _stage_rows(self, runner: Any, num_rows: int) -> torch.Tensor:
        """``[N]`` bool: rows of prefill (or decode) requests, from the runner's host state."""
        batch = runner.input_batch
        n = batch.num_reqs
        starts = runner.query_start_loc.cpu[: n + 1].numpy()
        prefill = batch.num_computed_tokens_cpu[:n] < batch.num_prompt_tokens[:n]
        keep = prefill if self.config.heat_collection_stage == "prefill" else ~prefill
        rows = np.zeros(num_rows, dtype=bool)
        rows[: starts[-1]] = np.repeat(keep, np.diff(starts))
        return torch.from_numpy(rows)

    def end_step(self) -> None:
        self.counter.end_step()
        self.loop.step()
