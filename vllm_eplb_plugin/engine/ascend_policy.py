"""Our policy inside vLLM Ascend's dynamic EPLB.

vLLM Ascend's ``EplbWorker`` builds its policy with ``PolicyFactory.generate_policy`` when
the model runner starts, then calls ``rebalance_experts(current_expert_table,
expert_workload)`` in its EPLB process with ``[L, R, K]`` tables and per-slot loads
``[L, R, K]`` (``[T, L, R, K]`` when ``eplb_policy_type`` is 3), unpacking ``(changed,
priority, new_table)``. :class:`PluginPolicy` is what the patched factory returns.

It runs the configured policy through the :class:`~vllm_eplb_plugin.planner.Planner`
child, so a policy that raises, hangs past ``plan_timeout_s`` or dies costs one plan,
never vLLM Ascend's EPLB process (which stops for good on an exception), and the plan is
reviewed like on every engine: a layer is taken only where it balances better and keeps
every staying expert in its slot, so ``check_expert_placement`` never has to revert it.

The instance pickles as its config, so it reaches the EPLB process whatever the start
method (fork today; spawn and forkserver re-create it there); the planner child starts in
the process that plans, at its first call.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
from vllm_ascend.eplb.core.policy.policy_abstract import EplbPolicy as AscendEplbPolicy

from ..config import EplbConfig
from ..metrics import balancedness
from ..placement import InvalidExpertTable, _to_numpy, num_experts_of, slot_to_expert_load, validate_table
from ..planner import Planner, PlanOutcome, PlanStatus
from ..policy import as_workload, make_result
from ..registry import resolve_policy_name

logger = logging.getLogger("vllm.eplb_plugin")


class PluginPolicy(AscendEplbPolicy):
    """vLLM Ascend's policy contract around the plugin's configured policy."""

    def __init__(self, config: EplbConfig, reports: bool = False) -> None:
        self.config = config
        self.name = resolve_policy_name(config.policy)
        self.reports = reports
        """Whether this rank's plans go to Prometheus (EP rank 0 only, set by the hook)."""
        self.last_outcome: PlanOutcome | None = None
        self._planner: Planner | None = None

    def __reduce__(self) -> tuple:
        # The planner (a child process and a thread) stays behind; the receiving process
        # starts its own. The config is rebuilt, so it is validated there too.
        return (_rebuild, (self.config.to_dict(), self.reports))

    def rebalance_experts(self, current_expert_table: Any, expert_workload: Any) -> tuple[bool, np.ndarray, np.ndarray]:
        """``current_expert_table [L, R, K]``, ``expert_workload [L, R, K] | [T, L, R, K]``
        -> ``(changed, priority [L], new_table [L, R, K])``; never raises."""
        table = _to_numpy(current_expert_table).astype(np.int64)
        try:
            table = validate_table(table, name="vLLM Ascend's current expert table")
            series = as_workload(expert_workload, table.shape)  # [T, L, R, K]
            heat = slot_to_expert_load(table, series, num_experts_of(table))  # [T, L, E]
            if np.ndim(expert_workload) == 3:  # one window: plan on [L, E]
                heat = heat[0]
        except (InvalidExpertTable, ValueError) as exc:
            logger.error("EPLB plugin: cannot plan on what vLLM Ascend handed over (%s); keeping the current placement",
                         exc)
            return False, np.arange(len(table), dtype=np.int64), table
        outcome = self._plan(table, heat)
        self.last_outcome = outcome
        load = heat.sum(axis=0) if heat.ndim == 3 else heat  # [L, E]
        self._log(table, outcome, load)
        result = make_result(table, outcome.new_table, load)
        return result.changed, result.priority, result.new_table

    def _plan(self, table: np.ndarray, heat: np.ndarray) -> PlanOutcome:
        if self._planner is None:
            self._planner = Planner(self.config)
        self._planner.submit(table, heat)
        outcome = self._planner.wait()
        assert outcome is not None  # a request is in flight
        return outcome

    def _log(self, table: np.ndarray, outcome: PlanOutcome, load: np.ndarray) -> None:
        """One log line per plan, and on EP rank 0 the same Prometheus metrics as on vLLM."""
        metrics = None
        if self.reports:
            from .prometheus import EplbMetrics

            metrics = EplbMetrics.shared()  # in the EPLB process; multiprocess mode shows it
        if outcome.status is PlanStatus.FAILED:
            logger.warning("EPLB plugin: policy %s failed, keeping the current placement: %s", self.name,
                           outcome.summary)
            logger.debug("EPLB plugin: policy %s failed: %s", self.name, outcome.message)
            if metrics is not None:
                metrics.failed()
            return
        if outcome.status is PlanStatus.KEEP:
            logger.info("EPLB plugin: policy %s keeps the placement: %s", self.name, outcome.message)
            return
        if outcome.message:
            logger.warning("EPLB plugin: policy %s: %s", self.name, outcome.message)
        before, after = balancedness(table, load).mean(), balancedness(outcome.new_table, load).mean()
        moved = int((outcome.new_table != table).sum())
        logger.info(
            "EPLB plugin: policy %s plans %d/%d layers, balancedness %.3f -> %.3f (predicted), "
            "%d/%d slots moved, policy %.1f ms",
            self.name, len(outcome.changed_layers), len(table), before, after, moved, table.size, outcome.seconds * 1e3,
        )
        if metrics is not None:
            metrics.plan(float(before), float(after), len(outcome.changed_layers), moved, outcome.seconds)

    def close(self) -> None:
        if self._planner is not None:
            self._planner.close()


def _rebuild(config: dict, reports: bool) -> PluginPolicy:
    return PluginPolicy(EplbConfig(**config), reports)
