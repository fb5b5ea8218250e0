"""The planning loop every rank runs in lockstep, whatever the engine.

Shapes: table ``[L, R, K]``; heat ``[L, E]`` (or ``[T, L, E]`` for a per-step window).

One :class:`PlanningLoop` per rank; the engine adapter calls :meth:`PlanningLoop.step`
after every forward step, on every rank of the group (all ranks run the same steps):

1. every ``expert_heat_collection_interval`` steps the heat source's window is closed
   and all-gathered; ranks that counted different heat skip the plan (a bug elsewhere);
2. rank 0 hands ``(table, heat)`` to the :class:`~.planner.Planner` child, off the
   forward path;
3. each following step rank 0 broadcasts the plan's :class:`~.planner.PlanStatus`, or
   "wait"; once ``algorithm_execution_interval`` steps have passed without one, rank 0
   blocks on the plan (at most ``plan_timeout_s``, as vLLM Ascend's forward loop does), so
   a plan lands by that step whatever the machine's load, and a hung policy is killed;
4. ``ADOPT``: the new table is broadcast, the current one verified across ranks, and
   every rank adopts it; rank 0 records it to ``expert_map_record_path`` and reports it.
   ``KEEP`` and ``FAILED`` keep the table, with one log line.

The loop needs a CPU process group (gloo, or the CPU side of vLLM's groups); it imports
no engine. Engines that move weights themselves call a policy through their own loop and
use :class:`~.planner.Planner` / :func:`~.planner.review_plan` directly.
"""

from __future__ import annotations

import logging
import time
from typing import Protocol

import numpy as np
import torch
import torch.distributed as dist

from .config import EplbConfig
from .consistency import verify_consistency
from .metrics import balancedness
from .placement import changed_slots, save_expert_map
from .planner import Planner, PlanOutcome, PlanStatus
from .registry import resolve_policy_name

logger = logging.getLogger("vllm.eplb_plugin")

_WAIT = -1  # broadcast while the plan is in flight; otherwise the index of its status
_STATUSES = list(PlanStatus)


class HeatSource(Protocol):
    """Where the loop reads heat (the vLLM adapter's :class:`~.heat.HeatCounter`)."""

    steps_in_interval: int
    """Steps counted since the window was last closed."""

    def close_interval(self) -> np.ndarray:
        """Heat of the window ``[L, E]`` (or ``[T, L, E]``), starting the next one."""


class PlanObserver(Protocol):
    """Receives each plan's numbers on rank 0 (the vLLM adapter's Prometheus metrics)."""

    def plan(self, before: float, after: float, layers: int, moved: int, seconds: float) -> None: ...

    def failed(self) -> None: ...


class PlanningLoop:
    """Collect -> all-gather -> plan off the forward path -> verify -> adopt or keep -> record.

    ``table [L, R, K]``: the table every rank starts from (verified across ranks here);
    ``group``: a CPU process group of the ranks; ``planning``: False collects nothing
    into plans (an engine plans instead) but keeps the table verified.
    """

    def __init__(self, config: EplbConfig, table: np.ndarray, heat: HeatSource, group: dist.ProcessGroup | None,
                 *, planning: bool = True, observer: PlanObserver | None = None) -> None:
        self.config, self.table, self.heat, self.group = config, table, heat, group
        self.rank = dist.get_rank(group)
        self.planning = planning and config.dynamic_eplb
        self.observer = observer
        self.planner = Planner(config) if self.planning and self.rank == 0 else None
        if self.planner is not None:
            self.planner.warm()
        self.steps = self.plans = 0
        self.pending_steps: int | None = None  # steps waited for the plan in flight
        self.pending_load: np.ndarray | None = None  # [L, E] heat of the plan in flight
        self.last: PlanOutcome | None = None  # the last decided outcome, on rank 0
        verify_consistency(table, group, what="expert table at start-up")

    def step(self) -> None:
        """After every forward step, on every rank."""
        self.steps += 1
        if not self.planning:
            return
        if self.pending_steps is not None:
            self.pending_steps += 1
            self._wait_for_plan()
        elif self.heat.steps_in_interval >= self.config.expert_heat_collection_interval:
            self._start_plan()

    def close(self) -> None:
        if self.planner is not None:
            self.planner.close()

    # -- rank-local steps ------------------------------------------------------------------

    def _start_plan(self) -> None:
        heat = self._gather_heat(self.heat.close_interval())
        if heat is None or heat.sum() == 0:
            return
        self.pending_steps = 0
        self.pending_load = heat.sum(axis=0) if heat.ndim == 3 else heat
        if self.planner is not None:
            self.planner.submit(self.table, heat)

    def _gather_heat(self, heat: np.ndarray) -> np.ndarray | None:
        """Every rank routes the same tokens: check they saw the same heat. A difference
        is a bug somewhere; skip this plan."""
        local = torch.from_numpy(np.ascontiguousarray(heat, dtype=np.float64)).reshape(-1)
        out = [torch.empty_like(local) for _ in range(dist.get_world_size(self.group))]
        dist.all_gather(out, local, group=self.group)
        differ = [r for r, t in enumerate(out) if not torch.equal(t, out[0])]
        if differ:
            if self.rank == 0:
                logger.error("EPLB: ranks %s counted different heat than rank 0; skipping this plan", differ)
            return None
        return heat

    def _wait_for_plan(self) -> None:
        # Rank 0 decides, then every rank learns the decision from one broadcast.
        code = torch.tensor([_WAIT], dtype=torch.int64)
        outcome = self._poll_plan() if self.planner is not None else None
        if outcome is not None:
            code[0] = _STATUSES.index(outcome.status)
        src = dist.get_global_rank(self.group, 0) if self.group is not None else 0
        dist.broadcast(code, src=src, group=self.group)
        index = int(code.item())
        if index == _WAIT:
            return
        status = _STATUSES[index]
        load, self.pending_steps, self.pending_load = self.pending_load, None, None
        self.last = outcome
        if status is PlanStatus.ADOPT:
            assert load is not None  # set with the plan in flight
            new = (torch.from_numpy(outcome.new_table) if outcome is not None
                   else torch.empty(self.table.shape, dtype=torch.int64))
            dist.broadcast(new, src=src, group=self.group)
            self._adopt(new.numpy(), load, outcome)
        elif outcome is not None and status is PlanStatus.KEEP:
            logger.info("EPLB plan not applied: %s", outcome.summary)
        elif outcome is not None:
            logger.warning("EPLB plan failed, keeping the current table: %s", outcome.summary)
            logger.debug("EPLB plan failed: %s", outcome.message)
            if self.observer is not None:
                self.observer.failed()

    def _poll_plan(self) -> PlanOutcome | None:
        """Rank 0: the reviewed outcome if the planner has one; once
        ``algorithm_execution_interval`` steps have passed, the outcome after blocking for
        it (the planner bounds that by ``plan_timeout_s``); else None."""
        assert self.planner is not None and self.pending_steps is not None
        outcome = self.planner.poll()
        if outcome is not None or self.pending_steps < self.config.algorithm_execution_interval:
            return outcome
        # Dropping a late plan would lose it to load alone (a busy machine starves the
        # child), and the next one would be as late: wait for it, and say so.
        start = time.monotonic()
        outcome = self.planner.wait()
        assert outcome is not None  # a plan is in flight: wait() always ends it
        logger.warning("EPLB: the plan was not ready after algorithm_execution_interval=%d steps; "
                       "the forward loop waited %.0f ms for it", self.config.algorithm_execution_interval,
                       (time.monotonic() - start) * 1e3)
        return outcome

    def _adopt(self, new: np.ndarray, load: np.ndarray, outcome: PlanOutcome | None) -> None:
        """Adopt ``new [L, R, K]`` on every rank; rank 0 records and reports it against the
        plan's ``load [L, E]``."""
        verify_consistency(self.table, self.group, what="expert table before update")
        old, self.table = self.table, new
        self.plans += 1
        if self.rank != 0:
            return
        assert outcome is not None
        before, after = balancedness(old, load), balancedness(new, load)
        moved = int(changed_slots(old, new).sum())
        if outcome.message:
            logger.warning("EPLB plan %d: %s", self.plans, outcome.message)
        record = self.config.expert_map_record_path
        if record is not None:
            self._record(record, new, {
                "plan": self.plans,
                "step": self.steps,
                "policy": resolve_policy_name(self.config.policy),
                "heat_window": self.config.heat_window,
                "heat": load.tolist(),
                "balancedness_before": before.round(6).tolist(),
                "balancedness_after": after.round(6).tolist(),
                "layers_changed": list(outcome.changed_layers),
                "slots_moved": moved,
                "policy_seconds": round(outcome.seconds, 6),
            })
        logger.info(
            "EPLB plan %d (step %d): %d/%d layers changed, balancedness %.3f -> %.3f (predicted), "
            "%d/%d slots moved, policy %.1f ms%s",
            self.plans, self.steps, len(outcome.changed_layers), len(new), before.mean(), after.mean(),
            moved, new.size, outcome.seconds * 1e3, f"; recorded to {record}" if record else "",
        )
        if self.observer is not None:
            self.observer.plan(float(before.mean()), float(after.mean()), len(outcome.changed_layers), moved,
                               outcome.seconds)

    def _record(self, path: str, table: np.ndarray, extra: dict) -> None:
        try:
            save_expert_map(path, table, extra=extra)
        except Exception as exc:  # noqa: BLE001 - a record must never stop serving; the next plan retries
            logger.error("EPLB: could not write expert_map_record_path=%r: %s: %s", path, type(exc).__name__, exc)
