"""Property-based conformance checks for any ``EplbPolicy`` (needs ``hypothesis``).

``run_conformance(policy)`` runs every property over generated cases and returns a
``Report`` whose ``format()`` lists each failing property with hypothesis' minimal
(shrunk) example. The policy runs in one long-lived child process
(:class:`~vllm_eplb_plugin.planner.PolicyChild`, restarted only after it dies), with a
deadline per case: a policy that exits, is killed, raises ``SystemExit`` or hangs fails
the property that made it do so, and the run goes on with the next property. Cases
cover: one layer, one slot per rank, no redundant slots, one rank, all-zero load, ties,
one expert taking all load, huge loads, loads whose sum overflows float64, per-step
series ``[T, L, R, K]``, shuffled starting tables, tables as engines hand them over (an
expert twice on a rank, -1 padding) and ``max_move`` bounds.
"""

from __future__ import annotations

import copy
import pickle
import time
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ..moves import moved_within_rank, repair_table
from ..placement import InvalidExpertTable, changed_slots, default_table, num_experts_of, validate_table
from ..planner import ChildFailure, Fault, PolicyChild
from ..policy import EplbPolicy, PolicyConfig, PolicyResult
from ..registry import load_policy_class

__all__ = ["Case", "cases", "PROPERTIES", "Failure", "Report", "run_conformance", "run_property"]

LOAD_KINDS = ("random", "zipf", "zero", "ties", "one_hot", "huge", "overflow")
ENGINE_QUIRKS = ("none", "none", "duplicate", "padded")


@dataclass
class Case:
    """One generated input: ``table [L, R, K]`` and ``workload [L, R, K]`` or ``[T, L, R, K]``."""

    table: np.ndarray
    workload: np.ndarray
    load_kind: str
    max_move: int | None
    quirk: str = "none"
    """How the table departs from the invariants, as engines' tables do (``ENGINE_QUIRKS``)."""

    def __repr__(self) -> str:
        L, R, K = self.table.shape
        return (
            f"Case(L={L}, R={R}, K={K}, E={num_experts_of(self.table)}, load={self.load_kind!r}, quirk={self.quirk!r}, "
            f"workload_shape={list(self.workload.shape)}, max_move={self.max_move},\n"
            f"     table={self.table.tolist()},\n     workload={self.workload.tolist()})"
        )


def _workload(rng: np.random.Generator, kind: str, table: np.ndarray, steps: int | None) -> np.ndarray:
    shape = ((steps,) if steps else ()) + table.shape
    E = num_experts_of(table)
    if kind == "random":
        return rng.integers(0, 1000, shape).astype(np.float64)
    if kind == "zipf":
        popularity = 1000.0 / (1 + rng.permutation(E)) ** 1.2  # [E]
        return rng.poisson(popularity[table] * np.ones(shape)).astype(np.float64)
    if kind == "zero":
        return np.zeros(shape)
    if kind == "ties":
        return np.full(shape, 7.0)
    if kind == "one_hot":
        return np.where(table == rng.integers(E), 1000.0, 0.0) * np.ones(shape)
    if kind == "huge":
        return rng.uniform(1e12, 1e15, shape)
    return rng.uniform(1e306, 1.7e308, shape)  # overflow: finite loads whose sum is not


@st.composite
def cases(draw: st.DrawFn, max_layers: int = 3, max_ranks: int = 6, max_slots: int = 5,
          allow_max_move: bool = True) -> Case:
    """Strategy for ``Case``; ``K <= E <= R * K`` so every shape admits a valid table."""
    L = draw(st.integers(1, max_layers))
    R = draw(st.integers(1, max_ranks))
    K = draw(st.integers(1, max_slots))
    E = draw(st.integers(K, R * K))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    table = default_table(L, R, K, E)
    if draw(st.booleans()):  # a shuffled (still valid) start: relabel experts, reorder ranks
        relabel = rng.permuted(np.broadcast_to(np.arange(E), (L, E)), axis=1)
        table = np.take_along_axis(relabel, table.reshape(L, -1), axis=1).reshape(L, R, K)
        table = table[:, rng.permutation(R)]
    table, quirk = _engine_quirk(table, draw(st.sampled_from(ENGINE_QUIRKS)), rng)
    kind = draw(st.sampled_from(LOAD_KINDS))
    steps = draw(st.one_of(st.none(), st.integers(1, 4)))
    max_move = draw(st.one_of(st.none(), st.integers(0, R * K))) if allow_max_move else None
    return Case(table, _workload(rng, kind, table, steps), kind, max_move, quirk)


def _engine_quirk(table: np.ndarray, quirk: str, rng: np.random.Generator) -> tuple[np.ndarray, str]:
    """A table as an engine may hand it over: an expert twice on a rank (vLLM's policy on
    skewed load), or the last slots padded with -1 (vLLM's elastic EP)."""
    L, R, K = table.shape
    out = table.copy()
    if quirk == "duplicate" and K > 1:
        l, r = rng.integers(L), rng.integers(R)
        out[l, r, 1] = out[l, r, 0]
    elif quirk == "padded" and R * K > 1:
        out[:, -1, -1] = -1
    if quirk == "none" or np.array_equal(out, table) or int(out.max()) < int(table.max()):
        return table, "none"  # nothing changed, or the padding hid the highest id (and so E)
    return out, quirk


# --- properties: each takes (policy class, case, budget) and raises AssertionError ---------


def _call(cls: type[EplbPolicy], case: Case, budget: float, max_move: int | None = None) -> PolicyResult:
    policy = cls(PolicyConfig(max_move=max_move))
    start = time.perf_counter()
    result = policy.rebalance_experts(case.table, case.workload)
    elapsed = time.perf_counter() - start
    assert elapsed <= budget, f"one call took {elapsed:.3f} s, over the {budget} s budget"
    return result


def prop_result_contract(cls: type[EplbPolicy], case: Case, budget: float) -> None:
    """Returns a PolicyResult (bool changed, priority over layers, integer new_table).

    ``priority`` is a permutation of the layer ids; ``new_table`` has the input's shape."""
    result = _call(cls, case, budget)
    assert isinstance(result, PolicyResult), f"returned {type(result).__name__}, not PolicyResult"
    changed, priority, new_table = result  # unpacks as vLLM Ascend's 3-tuple
    assert isinstance(changed, (bool, np.bool_)), f"changed is {type(changed).__name__}, not bool"
    assert isinstance(new_table, np.ndarray), f"new_table is {type(new_table).__name__}, not numpy.ndarray"
    assert new_table.shape == case.table.shape, f"new_table shape {new_table.shape} != input {case.table.shape}"
    assert new_table.dtype.kind in "iu", f"new_table dtype {new_table.dtype} is not integer"
    L = case.table.shape[0]
    prio = np.asarray(priority)
    assert prio.dtype.kind in "iu" and sorted(prio.tolist()) == list(range(L)), (
        f"priority {prio.tolist()} is not a permutation of the {L} layer ids"
    )


def prop_valid_table(cls: type[EplbPolicy], case: Case, budget: float) -> None:
    """The new table is valid: ids in range, every expert placed, no rank duplicates."""
    result = _call(cls, case, budget)
    try:
        validate_table(result.new_table, num_experts_of(case.table), name="new_table")
    except InvalidExpertTable as exc:
        raise AssertionError(str(exc)) from None


def prop_changed_flag(cls: type[EplbPolicy], case: Case, budget: float) -> None:
    """changed is True exactly when the new table differs from the current one."""
    result = _call(cls, case, budget)
    differs = bool(np.any(np.asarray(result.new_table) != case.table))
    assert bool(result.changed) == differs, (
        f"changed={result.changed} but the table {'differs' if differs else 'is equal'}"
    )


def prop_deterministic(cls: type[EplbPolicy], case: Case, budget: float) -> None:
    """The same input gives the same table, from one instance and from a fresh one."""
    policy = cls(PolicyConfig())
    first = policy.rebalance_experts(case.table, case.workload).new_table
    again = policy.rebalance_experts(case.table, case.workload).new_table
    fresh = _call(cls, case, budget).new_table
    assert np.array_equal(first, again), "two calls on one instance returned different tables"
    assert np.array_equal(first, fresh), "two instances returned different tables"


def prop_inputs_unchanged(cls: type[EplbPolicy], case: Case, budget: float) -> None:
    """Inputs are not modified and the returned table is not a view of the input."""
    table, workload = case.table.copy(), case.workload.copy()
    result = _call(cls, case, budget)
    assert np.array_equal(table, case.table), "current_expert_table was modified"
    assert np.array_equal(workload, case.workload), "expert_workload was modified"
    assert not np.shares_memory(result.new_table, case.table), "new_table shares memory with the input table"


def prop_experts_keep_their_slots(cls: type[EplbPolicy], case: Case, budget: float) -> None:
    """An expert that stays on a rank keeps its slot (vLLM Ascend's check_expert_placement
    reverts a layer that moves one within a rank; call ``moves.preserve_slots``)."""
    new = np.asarray(_call(cls, case, budget).new_table)
    moved = np.argwhere(moved_within_rank(case.table, new))
    assert not moved.size, (
        f"layer {moved[0][0]}, rank {moved[0][1]} keeps an expert but moves it to another slot "
        f"({len(moved)} such (layer, rank) pairs); vLLM Ascend rejects such a layer: "
        "return vllm_eplb_plugin.moves.preserve_slots(current_table, new_table)"
    )


def prop_max_move(cls: type[EplbPolicy], case: Case, budget: float) -> None:
    """With max_move = m, at most m slots change per layer and the table stays valid."""
    if case.max_move is None:
        return
    result = _call(cls, case, budget, max_move=case.max_move)
    new = np.asarray(result.new_table)
    moved = changed_slots(case.table, new)
    forced = changed_slots(case.table, repair_table(case.table, num_experts_of(case.table)))  # [L] repairs
    assert np.all(moved <= case.max_move + forced), (
        f"max_move={case.max_move} but layers moved {moved.tolist()} slots ({forced.tolist()} of them repairs "
        "of slots that broke an invariant)"
    )
    try:
        validate_table(new, num_experts_of(case.table), name="new_table")
    except InvalidExpertTable as exc:
        raise AssertionError(f"with max_move={case.max_move}: {exc}") from None


def prop_accepts_torch(cls: type[EplbPolicy], case: Case, budget: float) -> None:
    """torch tensors in give the same table as numpy arrays in (skipped without torch)."""
    try:
        import torch
    except ImportError:
        return
    expected = _call(cls, case, budget).new_table
    got = cls(PolicyConfig()).rebalance_experts(torch.from_numpy(case.table), torch.from_numpy(case.workload))
    assert np.array_equal(np.asarray(got.new_table), expected), "torch input gave a different table than numpy input"


PROPERTIES: dict[str, Callable[[type[EplbPolicy], Case, float], None]] = {
    "result_contract": prop_result_contract,
    "valid_table": prop_valid_table,
    "changed_flag": prop_changed_flag,
    "deterministic": prop_deterministic,
    "inputs_unchanged": prop_inputs_unchanged,
    "experts_keep_their_slots": prop_experts_keep_their_slots,
    "max_move": prop_max_move,
    "accepts_torch": prop_accepts_torch,
}


# --- running and reporting ------------------------------------------------------------------


@dataclass
class Failure:
    prop: str
    error: str
    example: str


@dataclass
class Report:
    policy: str
    examples: int
    passed: list[str] = field(default_factory=list)
    failures: list[Failure] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failures

    def format(self) -> str:
        lines = [f"EPLB policy conformance: {self.policy} ({self.examples} cases per property)"]
        lines += [f"  PASS  {name}: {PROPERTIES[name].__doc__.split(chr(10))[0]}" for name in self.passed]
        for f in self.failures:
            lines.append(f"  FAIL  {f.prop}: {f.error}")
            lines += ["        " + line for line in f.example.splitlines()]
        lines.append(f"{len(self.passed)} passed, {len(self.failures)} failed")
        return "\n".join(lines)


def _policy_class(policy: Any) -> tuple[type[EplbPolicy], str]:
    if isinstance(policy, type):
        if not issubclass(policy, EplbPolicy):
            raise TypeError(f"{policy!r} is not a subclass of vllm_eplb_plugin.EplbPolicy")
        return policy, policy.name or policy.__qualname__
    return load_policy_class(policy), str(policy)


def check_case(cls: type[EplbPolicy], name: str, case: Case, budget: float) -> str | None:
    """Property ``name`` on one case: None if it holds, else what went wrong. A policy
    that raises (``SystemExit`` too) is a failure of the property, not of the run."""
    try:
        PROPERTIES[name](cls, case, budget)
    except AssertionError as exc:
        return str(exc)
    except (Exception, SystemExit) as exc:  # the policy's bug, reported
        frames = traceback.extract_tb(exc.__traceback__)
        what = f"raised SystemExit({exc.code!r})" if isinstance(exc, SystemExit) else f"{type(exc).__name__}: {exc}"
        return f"{what} (raised at {frames[-1].filename}:{frames[-1].lineno})"
    return None


_IMPORTS = {"accepts_torch": "torch"}
"""Modules a property imports on its first case; imported before it, off the case deadline
(torch takes seconds)."""


def _prepare(name: str) -> None:
    try:
        __import__(_IMPORTS[name])
    except (KeyError, ImportError):  # nothing to import, or the property skips without it
        pass


def _case_handler(policy: Any) -> Callable[[tuple], str | None]:
    """In the policy's child process: load the class once. A request is ``(property, case,
    budget)``, or ``(property,)`` to prepare for a property."""
    cls, _label = _policy_class(policy)
    return lambda request: check_case(cls, *request) if len(request) > 1 else _prepare(*request)


class _ProcessFailed(BaseException):
    """The policy's process died or hung on a case. A BaseException, so that hypothesis
    stops at once instead of shrinking (each try would cost a restart or a deadline)."""


class IsolatedPolicy:
    """Checks cases in one long-lived child process; starts a fresh one only after a case
    killed (or hung) the last one.

    ``policy``: a name, ``"module:Class"`` or a class importable by its module and name;
    ``case_timeout``: seconds one case (up to three policy calls) may take.
    """

    def __init__(self, policy: Any, case_timeout: float, startup_timeout: float = 60.0) -> None:
        if isinstance(policy, type):
            _importable(policy)
        self.policy, self.case_timeout, self.startup_timeout = policy, case_timeout, startup_timeout
        self._child: PolicyChild | None = None
        self._prepared: set[str] = set()  # properties the child has imported for
        self._seq = 0

    def check(self, name: str, case: Case, budget: float) -> str | None:
        """Like :func:`check_case`; raises ``_ProcessFailed`` when the process died or hung."""
        if self._child is None:
            self._child = PolicyChild(_case_handler, (self.policy,), self.startup_timeout)
            self._prepared = set()
        if name not in self._prepared:
            self._prepared.add(name)
            self._answer(self._call((name,), self.startup_timeout))
        return self._answer(self._call((name, case, budget), self.case_timeout))

    def _call(self, request: tuple, timeout: float) -> Any:
        self._seq += 1
        assert self._child is not None
        return self._child.call(self._seq, request, timeout)

    def _answer(self, answer: Any) -> str | None:
        if not isinstance(answer, ChildFailure):
            return answer.value
        if answer.fault in (Fault.RAISED, Fault.UNPICKLABLE, Fault.UNREADABLE):  # the child lives on
            return answer.message.strip().splitlines()[-1]
        self._child = None  # killed, with its process group
        raise _ProcessFailed(self._describe(answer))

    def _describe(self, failure: ChildFailure) -> str:
        if failure.fault is Fault.HUNG:
            return f"no result within {self.case_timeout:g} s (case timeout); the policy's process was killed"
        if failure.fault is Fault.SETUP:
            return f"the policy could not be loaded in its process: {failure.message.strip().splitlines()[-1]}"
        if failure.fault is Fault.NOT_READY:
            return f"the policy's process was {failure.message}"
        return f"the policy's process {failure.message}"  # exited with code N, was killed by signal N

    def close(self) -> None:
        if self._child is not None:
            self._child.kill()
            self._child = None


def _importable(cls: type) -> None:
    """A class the child can load: pickled by reference, it must be found by its name."""
    try:
        same = pickle.loads(pickle.dumps(cls)) is cls
    except Exception:  # noqa: BLE001 - a local class, or a module that cannot be found
        same = False
    if not same:
        raise TypeError(f"{cls.__module__}.{cls.__qualname__} cannot be loaded by name in a child process; "
                        "define the policy at module level, or pass isolate=False to run it in this process")


def run_property(cls: type[EplbPolicy], name: str, examples: int = 100, time_budget: float = 2.0,
                 strategy: st.SearchStrategy | None = None, isolated: IsolatedPolicy | None = None) -> Failure | None:
    """Run one property over ``examples`` cases; a ``Failure`` with the shrunk case, or None.

    In this process unless ``isolated`` is given (the pytest plugin's mode: a policy that
    calls ``os._exit`` ends the run)."""
    prop_check = isolated.check if isolated is not None else lambda n, c, b: check_case(cls, n, c, b)
    seen: list[Case] = []

    @settings(max_examples=examples, deadline=None, derandomize=True, database=None, print_blob=False,
              report_multiple_bugs=False, suppress_health_check=list(HealthCheck))
    @given(case=strategy if strategy is not None else cases())
    def check(case: Case) -> None:
        seen.append(copy.deepcopy(case))  # a policy under test may mutate `case`
        error = prop_check(name, case, time_budget)
        if error is not None:
            raise AssertionError(error)

    try:
        check()
    except _ProcessFailed as exc:  # on the case that did it; not shrunk
        return Failure(name, str(exc), f"example: {seen[-1]!r}" if seen else "no example")
    except Exception as exc:  # noqa: BLE001 - the property failed, or hypothesis itself: report, don't crash
        error = str(exc) if isinstance(exc, AssertionError) else f"{type(exc).__name__}: {exc}"
        return Failure(name, error, f"minimal example: {seen[-1]!r}" if seen else "no example")
    return None


def run_conformance(policy: Any, examples: int = 100, time_budget: float = 2.0,
                    properties: list[str] | None = None, isolate: bool = True,
                    case_timeout: float | None = None) -> Report:
    """Check ``policy`` (a name, ``"module:Class"`` or an ``EplbPolicy`` subclass).

    ``isolate`` runs it in a child process (see :class:`IsolatedPolicy`); a case gets
    ``case_timeout`` seconds there (default: three calls' ``time_budget`` plus 10 s for
    imports such as torch's)."""
    cls, label = _policy_class(policy)
    timeout = case_timeout if case_timeout is not None else 3 * time_budget + 10.0
    isolated = IsolatedPolicy(policy, timeout) if isolate else None
    report = Report(label, examples)
    try:
        for name in properties or list(PROPERTIES):
            failure = run_property(cls, name, examples, time_budget, isolated=isolated)
            if failure is None:
                report.passed.append(name)
            else:
                report.failures.append(failure)
    finally:
        if isolated is not None:
            isolated.close()
    return report
