"""The policy contract: ``EplbPolicy.rebalance_experts(current_expert_table, expert_workload)``.

A policy reads the current ``table [L, R, K]`` and the measured load per slot, either one
window ``[L, R, K]`` or a per-step series ``[T, L, R, K]``, and returns a
``PolicyResult(changed, priority, new_table)``. ``PolicyResult`` is a NamedTuple, so it
unpacks like vLLM Ascend's ``(changed, priority, new_table)`` 3-tuple.

Most policies only need ``PlacementPolicy``: implement ``place`` and the template does
input validation, the ``max_move`` bound and the result bookkeeping. Inside, load is per
logical expert (``[L, E]``, or ``[T, L, E]`` per step); ``EplbPolicy.plan(table, heat)``
is the entry point for callers that hold it, and per-slot loads exist only at the
``rebalance_experts`` boundary.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar, Mapping, NamedTuple

import numpy as np

from .hierarchy import place_in_nodes, respects_groups
from .moves import limit_moves, preserve_slots, repair_table
from .placement import (
    _to_numpy,
    as_table,
    expert_to_slot_load,
    num_experts_of,
    rank_load,
    slot_to_expert_load,
    validate_table,
)

__all__ = [
    "EplbPolicy",
    "PlacementPolicy",
    "PolicyConfig",
    "PolicyResult",
    "Option",
    "as_heat",
    "as_workload",
    "make_result",
]

_MAX_TOPOLOGY = 1 << 16  # nodes / groups: far above any real deployment, catches typos


class PolicyResult(NamedTuple):
    """What ``rebalance_experts`` returns.

    - ``changed``: whether ``new_table`` differs from the current table.
    - ``priority``: ``int64 [L]``, every layer id once, the layer whose predicted max rank
      load improves most first (the order to apply updates in).
    - ``new_table``: ``int64 [L, R, K]``, a valid table of the same shape.
    """

    changed: bool
    priority: np.ndarray
    new_table: np.ndarray


def is_number(value: Any) -> bool:
    """A JSON number that is finite: an int of any size (``math.isfinite`` would overflow
    on ``10**400``) or a finite float; booleans are not numbers."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    return isinstance(value, int) or math.isfinite(value)


@dataclass(frozen=True)
class Option:
    """One policy-specific knob, passed through ``PolicyConfig.options``."""

    default: Any
    help: str
    minimum: float | None = None
    maximum: float | None = None

    def check(self, policy: str, key: str, value: Any) -> Any:
        kind = type(self.default)
        if kind is bool:
            ok = isinstance(value, bool)
        elif kind is int:
            ok = isinstance(value, int) and not isinstance(value, bool)
        elif kind is float:
            ok = is_number(value)
        else:
            ok = isinstance(value, kind)
        if not ok:
            raise TypeError(
                f"policy {policy!r} option {key!r} must be a {kind.__name__}; got {value!r} "
                f"({type(value).__name__}). {self.help}"
            )
        if (self.minimum is not None and value < self.minimum) or (self.maximum is not None and value > self.maximum):
            raise ValueError(
                f"policy {policy!r} option {key!r} must be in [{self.minimum}, {self.maximum}]; got {value!r}. "
                f"{self.help}"
            )
        return kind(value)


def _check_int(name: str, value: Any, lo: int, hi: int, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"PolicyConfig.{name} must be an integer in [{lo}, {hi}]; got {value!r}.")
    if not lo <= value <= hi:
        raise ValueError(f"PolicyConfig.{name} must be in [{lo}, {hi}]; got {value}.")


@dataclass(frozen=True)
class PolicyConfig:
    """Topology and limits a policy is built with."""

    num_nodes: int = 1
    """Server nodes; ranks are split evenly over them (hierarchical policies)."""
    num_groups: int = 1
    """Expert groups of group-limited routing (DeepSeek-V3 has 8); ``E % num_groups == 0``."""
    max_move: int | None = None
    """At most this many slots change per layer per update (EX mode); None: unbounded."""
    options: Mapping[str, Any] = field(default_factory=dict)
    """Policy-specific knobs; each policy lists its own in ``EplbPolicy.OPTIONS``."""

    def __post_init__(self) -> None:
        _check_int("num_nodes", self.num_nodes, 1, _MAX_TOPOLOGY)
        _check_int("num_groups", self.num_groups, 1, _MAX_TOPOLOGY)
        _check_int("max_move", self.max_move, 0, 1 << 20, allow_none=True)
        if not isinstance(self.options, Mapping) or not all(isinstance(k, str) for k in self.options):
            raise TypeError(f"PolicyConfig.options must be a dict with string keys; got {self.options!r}.")


def _checked_load(arr: np.ndarray, name: str) -> np.ndarray:
    """``arr`` as float64 after the checks every load takes: numeric, finite, non-negative.
    Loads whose sum would overflow float64 are divided by their maximum (a placement
    depends only on load ratios)."""
    if arr.dtype.kind not in "iuf":
        raise ValueError(f"{name} must be numeric; got dtype {arr.dtype}.")
    arr = arr.astype(np.float64)
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} holds NaN or infinite values.")
    if np.any(arr < 0):
        idx = tuple(int(i) for i in np.argwhere(arr < 0)[0])
        raise ValueError(f"{name} holds a negative load {arr[idx]} at index {idx}; loads are token counts.")
    with np.errstate(over="ignore"):
        overflows = not np.isfinite(arr.sum())
    if overflows:  # finite loads whose sum does not fit float64: placements are scale-free
        arr = arr / arr.max()
    return arr


def as_workload(workload: Any, table_shape: tuple[int, int, int], *, name: str = "expert_workload") -> np.ndarray:
    """Validate a per-slot workload and return it as ``float64 [T, L, R, K]``.

    Accepts ``[L, R, K]`` (returned with ``T = 1``) or ``[T, L, R, K]``; values must be
    finite and non-negative (see :func:`as_heat` for overflow).
    """
    arr = _to_numpy(workload)
    if arr.ndim == 3:
        arr = arr[None]
    if arr.ndim != 4 or arr.shape[1:] != tuple(table_shape) or arr.shape[0] == 0:
        raise ValueError(
            f"{name} must have shape [L, R, K] = {list(table_shape)} (one window) or [T, L, R, K] "
            f"(per-step series); got {list(np.shape(workload))}."
        )
    return _checked_load(arr, name)


def as_heat(heat: Any, num_layers: int, *, name: str = "expert_load") -> np.ndarray:
    """Validate a per-expert load and return it as ``float64 [T, L, E]``.

    Accepts ``[L, E]`` (returned with ``T = 1``) or ``[T, L, E]``; values must be finite
    and non-negative; loads whose sum overflows float64 are rescaled by their maximum.
    """
    arr = _to_numpy(heat)
    if arr.ndim == 2:
        arr = arr[None]
    if arr.ndim != 3 or arr.shape[1] != num_layers or 0 in arr.shape:
        raise ValueError(
            f"{name} must have shape [L, E] with L = {num_layers} (one window) or [T, L, E] (per-step series); "
            f"got {list(np.shape(heat))}."
        )
    return _checked_load(arr, name)


def make_result(old: np.ndarray, new: np.ndarray, expert_load: np.ndarray) -> PolicyResult:
    """Build a ``PolicyResult`` for ``old -> new`` (both ``[L, R, K]``) under
    ``expert_load [L, E]``: layers ordered by predicted max-load ratio, best first."""
    before = rank_load(old, expert_load).max(axis=1)
    after = rank_load(new, expert_load).max(axis=1)
    ratio = np.divide(after, before, out=np.ones_like(after), where=before > 0)
    priority = np.argsort(ratio, kind="stable").astype(np.int64)
    return PolicyResult(bool(np.any(old != new)), priority, new)


class EplbPolicy(ABC):
    """Base class of every placement policy.

    Subclasses set ``name`` and, if they take knobs, ``OPTIONS``; they must not mutate
    their inputs and must return a valid table of the input's shape.
    """

    name: ClassVar[str] = ""
    OPTIONS: ClassVar[Mapping[str, Option]] = {}

    def __init__(self, config: PolicyConfig | None = None) -> None:
        self.config = config if config is not None else PolicyConfig()
        self.options = self.resolve_options(self.config)

    @classmethod
    def resolve_options(cls, config: PolicyConfig) -> dict[str, Any]:
        """``config.options`` checked against ``OPTIONS``, defaults filled in."""
        given = dict(config.options)
        label = cls.name or cls.__name__
        unknown = sorted(set(given) - set(cls.OPTIONS))
        if unknown:
            known = ", ".join(sorted(cls.OPTIONS)) or "none"
            raise ValueError(f"policy {label!r} has no option {unknown[0]!r}; its options are: {known}.")
        return {key: opt.check(label, key, given[key]) if key in given else opt.default
                for key, opt in cls.OPTIONS.items()}

    @abstractmethod
    def rebalance_experts(self, current_expert_table: Any, expert_workload: Any) -> PolicyResult:
        """Plan a new placement.

        Args:
            current_expert_table: ``[L, R, K]`` logical expert per slot (numpy or torch).
            expert_workload: tokens routed to each slot, ``[L, R, K]`` or ``[T, L, R, K]``.

        Returns:
            ``PolicyResult(changed, priority [L], new_table [L, R, K])``.
        """

    def plan(self, table: Any, heat: Any) -> PolicyResult:
        """Plan from per-expert load: the entry point the engines and the CLI call.

        Args:
            table: valid ``[L, R, K]`` table.
            heat: tokens routed to each logical expert, ``[L, E]`` or ``[T, L, E]``.

        The base class spreads ``heat`` evenly over each expert's slots and calls
        ``rebalance_experts``; :class:`PlacementPolicy` plans on it directly.
        """
        table = as_table(table, name="current_expert_table")
        per_step = as_heat(heat, table.shape[0])  # [T, L, E]
        slot_load = expert_to_slot_load(table, per_step)  # [T, L, R, K]
        return self.rebalance_experts(table, slot_load if np.ndim(heat) == 3 else slot_load[0])


class PlacementPolicy(EplbPolicy):
    """Template for policies that compute a target table. Its steps, in order:

    1. accept any table an engine holds (:func:`~.moves.repair_table` fixes -1 padding, an
       expert twice on a rank or a missing expert; ``max_move`` does not count repairs);
    2. ``place`` computes the target, which is validated;
    3. layers the target does not improve (``layer_cost``) keep the current table, so no
       weight moves for nothing (``keep_unimproved = False`` turns this off);
    4. every expert that stays on a rank keeps its slot (engines reject a plan that moves
       weights within a rank);
    5. ``max_move`` keeps the moves that gain most;
    6. ``PolicyResult`` is filled in, ``changed`` against the engine's table.
    """

    keep_unimproved: ClassVar[bool] = True
    """Put back layers whose target is not better than the current table (step 3)."""
    hierarchical: ClassVar[bool] = True
    """With ``num_nodes > 1``, ``place`` runs per node with each expert group's replicas
    inside one node (:mod:`~.hierarchy`); ``False``: ``place`` sees the whole layer."""

    def rebalance_experts(self, current_expert_table: Any, expert_workload: Any) -> PolicyResult:
        held = as_table(current_expert_table, name="current_expert_table")  # what the engine holds
        series = as_workload(expert_workload, held.shape)  # [T, L, R, K]
        num_experts = num_experts_of(held)
        ok = (held >= 0) & (held < num_experts)  # -1 padding carries no load
        slots, loads = (held, series) if ok.all() else (np.where(ok, held, 0), series * ok)
        return self.plan(held, slot_to_expert_load(slots, loads, num_experts))

    def plan(self, table: Any, heat: Any) -> PolicyResult:
        held = as_table(table, name="current_expert_table")
        heat = as_heat(heat, held.shape[0])  # [T, L, E]
        num_experts = heat.shape[2]
        table = repair_table(held, num_experts)
        expert_load = heat.sum(axis=0)  # [L, E]
        # An invalid target is the policy's bug: name it here, before slots are matched.
        target = validate_table(place_in_nodes(self, table, heat, expert_load), num_experts,
                                name=f"{self.name or type(self).__name__}.place() result")
        if self.keep_unimproved:
            worse = self.layer_cost(target, heat, expert_load) >= self.layer_cost(table, heat, expert_load)
            worse &= respects_groups(self, table, num_experts)  # never keep groups spread over nodes
            target = np.where(worse[:, None, None], table, target)
        # Slots first, so that max_move spends no move on reordering a rank; every table
        # on the way from ``table`` to a slot-kept target keeps slots too.
        new = preserve_slots(table, target)
        if self.config.max_move is not None:
            new = limit_moves(table, new, expert_load, self.config.max_move)
        return make_result(table, new, expert_load)._replace(changed=bool(np.any(new != held)))

    def layer_cost(self, table: np.ndarray, heat: np.ndarray, expert_load: np.ndarray) -> np.ndarray:
        """What the policy minimises per layer, ``[L]``: the largest rank load by default."""
        return rank_load(table, expert_load).max(axis=1)

    @abstractmethod
    def place(self, table: np.ndarray, heat: np.ndarray, expert_load: np.ndarray) -> np.ndarray:
        """Return the target ``table [L, R, K]``.

        Args:
            table: current ``int64 [L, R, K]`` (valid; do not modify).
            heat: ``float64 [T, L, E]`` tokens routed to each logical expert per step
                (``T = 1`` for a window).
            expert_load: ``float64 [L, E]``, ``heat`` summed over steps.
        """
