"""Run a policy in a child process, off the serving path, and review what it returns.

The serving process submits ``(table, heat)`` and polls (or waits) for the outcome; the
child (``python -m vllm_eplb_plugin.planner``) builds the configured policy once and
answers each request. A child is a subprocess, not a ``multiprocessing`` worker, because
vLLM's worker processes (and vLLM Ascend's EPLB process) are daemonic and may not fork
workers of their own. The child exits when its stdin closes, so it never outlives the
serving process.

Every outcome has an explicit :class:`PlanStatus`: ``ADOPT`` (some layers change),
``KEEP`` (the plan improves no layer) or ``FAILED`` (the policy raised, hung past
``plan_timeout_s``, died or returned an invalid table); its ``new_table`` is always the
table to serve with, the current one unless ``ADOPT``. :func:`review_plan` is the one
place that decides which layers of a plan are taken.

Shapes: table ``[L, R, K]``; heat ``[L, E]`` or ``[T, L, E]`` per logical expert.
"""

from __future__ import annotations

import enum
import os
import pickle
import struct
import subprocess
import sys
import threading
import time
import traceback
from dataclasses import dataclass
from queue import Empty, SimpleQueue
from typing import Any, BinaryIO

import numpy as np

from .config import EplbConfig
from .metrics import balancedness
from .moves import moved_within_rank
from .placement import InvalidExpertTable, changed_slots, expert_to_slot_load, validate_table


class PlanStatus(str, enum.Enum):
    ADOPT = "adopt"
    """``new_table`` differs from the current table on ``changed_layers``."""
    KEEP = "keep"
    """The plan improves no layer; ``new_table`` is the current table."""
    FAILED = "failed"
    """The policy raised, timed out, died or returned an invalid table; ``new_table`` is
    the current table."""


@dataclass(frozen=True)
class PlanOutcome:
    """What one planning request produced.

    ``new_table [L, R, K]`` is the table to serve with (the current one unless
    ``status`` is ``ADOPT``); ``changed_layers`` the layer ids it changes; ``message``
    says why a plan was kept or failed, and which layers were refused; ``seconds`` is the
    policy's own time in the child.
    """

    seq: int
    status: PlanStatus
    new_table: np.ndarray
    changed_layers: tuple[int, ...] = ()
    seconds: float = 0.0
    message: str = ""

    @property
    def summary(self) -> str:
        """``message`` on one line: a policy's traceback shortened to its last line."""
        lines = self.message.strip().splitlines()
        if len(lines) <= 1:
            return self.message
        return f"{lines[0].split(':')[0]}: {lines[-1].strip()}"


def review_plan(old: np.ndarray, new: np.ndarray, expert_load: np.ndarray) -> tuple[np.ndarray, tuple[int, ...], str]:
    """Take a valid plan ``new [L, R, K]`` only for the layers where it is predicted to
    balance ``expert_load [L, E]`` better than ``old [L, R, K]`` and does not move an
    expert between slots of a rank that keeps it (:func:`~.moves.moved_within_rank`).

    Returns ``(table [L, R, K], changed layer ids, note)``; the note names the layers
    refused for moving experts within a rank, empty when there are none.
    """
    in_place = ~moved_within_rank(old, new).any(axis=1)  # [L]
    better = balancedness(new, expert_load) > balancedness(old, expert_load) + 1e-9  # [L]
    take = better & in_place
    table = np.where(take[:, None, None], new, old)
    layers = tuple(int(l) for l in np.flatnonzero(take & (changed_slots(old, table) > 0)))
    refused = np.flatnonzero(better & ~in_place).tolist()
    note = (f"layers {refused} kept: the plan moves an expert between slots of a rank that keeps it "
            "(the policy should call vllm_eplb_plugin.moves.preserve_slots)") if refused else ""
    return table, layers, note


def _write_frame(stream: BinaryIO, obj: Any) -> None:
    data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    stream.write(struct.pack("<Q", len(data)) + data)
    stream.flush()


def _read_frame(stream: BinaryIO) -> Any:
    header = stream.read(8)
    if len(header) < 8:
        raise EOFError("planner pipe closed")
    (size,) = struct.unpack("<Q", header)
    return pickle.loads(stream.read(size))


def check_plan(old: np.ndarray, new: Any, num_experts: int) -> np.ndarray:
    """Validate a policy's table against the current one; data from another process."""
    new = validate_table(new, num_experts, name="policy's new table")
    if new.shape != old.shape:
        raise InvalidExpertTable(
            f"policy's new table has shape {list(new.shape)}, the current table {list(old.shape)}; "
            "a policy must keep [L, R, K]"
        )
    return new


_CHILD_KEYS = ("policy", "policy_options", "num_nodes", "num_groups", "max_move")


@dataclass(frozen=True)
class _Request:
    seq: int
    table: np.ndarray  # [L, R, K] current
    expert_load: np.ndarray  # [L, E] what the plan is judged on
    sent: float  # time.monotonic()


class Planner:
    """Owns the planning child process. One request in flight at a time.

    ``config`` names the policy and its options; ``config.plan_timeout_s`` bounds one
    request (the child is killed past it and a fresh one is started).
    """

    def __init__(self, config: EplbConfig) -> None:
        self.config = config
        self.timeout_s = float(config.plan_timeout_s)
        self._proc: subprocess.Popen | None = None
        self._results: SimpleQueue = SimpleQueue()
        self._pending: _Request | None = None
        self._seq = 0

    def warm(self) -> None:
        """Start the child now (imports and policy set-up take ~1 s), so the first plan
        does not pay for it."""
        if self._proc is None or self._proc.poll() is not None:
            self._start()

    def _start(self) -> None:
        # The child must import this package the way the parent did (editable installs,
        # PYTHONPATH set by tests): hand it the parent's sys.path.
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "vllm_eplb_plugin.planner"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=env,
        )
        # Only what builds the policy: the child runs no file checks (a record path that
        # changed since start-up is the serving process's business, not a reason to die).
        _write_frame(self._proc.stdin, {k: v for k, v in self.config.to_dict().items() if k in _CHILD_KEYS})
        # Each child gets its own queue, so a killed child's last words never reach its successor.
        self._results = SimpleQueue()
        threading.Thread(
            target=self._read_loop, args=(self._proc, self._results), daemon=True, name="eplb-planner-reader"
        ).start()

    @staticmethod
    def _read_loop(proc: subprocess.Popen, results: SimpleQueue) -> None:
        try:
            while True:
                results.put(_read_frame(proc.stdout))
        except (EOFError, OSError, pickle.UnpicklingError):
            results.put(("died", proc.pid, proc.wait()))

    def submit(self, table: np.ndarray, heat: np.ndarray) -> int:
        """Send ``table [L, R, K]`` and ``heat [L, E] | [T, L, E]``; returns the request id."""
        if self._pending is not None:
            raise RuntimeError("a plan is already in flight; poll() it first")
        self.warm()
        self._seq += 1
        heat = np.asarray(heat, dtype=np.float64)
        workload = expert_to_slot_load(table, heat)
        load = heat.sum(axis=0) if heat.ndim == 3 else heat
        self._pending = _Request(self._seq, table, load, time.monotonic())
        try:
            _write_frame(self._proc.stdin, (self._seq, table, workload))
        except OSError as exc:  # the child died between requests: poll() reports it
            self._results.put(("died", self._proc.pid, f"{self._proc.poll()} ({exc})"))
        return self._seq

    def poll(self) -> PlanOutcome | None:
        """The outcome of the request in flight if it is done (or failed), else None.
        Never raises: any failure is a ``FAILED`` outcome with its reason."""
        return self._guarded(block=False)

    def wait(self) -> PlanOutcome | None:
        """Block until the request in flight has an outcome (at most ``plan_timeout_s``);
        None when nothing is in flight. Never raises."""
        return self._guarded(block=True)

    def _guarded(self, block: bool) -> PlanOutcome | None:
        try:
            return self._poll(block)
        except Exception as exc:  # noqa: BLE001 - serving must go on; the reason is reported
            return self._fail(f"planner error: {type(exc).__name__}: {exc}")

    def _poll(self, block: bool) -> PlanOutcome | None:
        req = self._pending
        if req is None:
            return None
        left = req.sent + self.timeout_s - time.monotonic()
        try:
            msg = self._results.get(timeout=max(left, 0.0)) if block else self._results.get_nowait()
        except Empty:
            if time.monotonic() - req.sent <= self.timeout_s:
                return None
            self._kill()
            return self._fail(f"policy timed out after {self.timeout_s:g} s (plan_timeout_s); the child was restarted")
        if msg[0] == "died":
            self._proc = None
            return self._fail(f"planner process {msg[1]} exited with code {msg[2]}")
        kind, _seq, payload, seconds = msg
        if kind == "error":
            return self._fail(f"policy raised: {payload}", seconds)
        try:
            _changed, _priority, new_table = payload
            new = check_plan(req.table, new_table, req.expert_load.shape[-1])
        except (InvalidExpertTable, TypeError, ValueError) as exc:
            return self._fail(f"policy returned an invalid result: {exc}", seconds)
        table, layers, note = review_plan(req.table, new, req.expert_load)
        self._pending = None
        if not layers:
            return PlanOutcome(req.seq, PlanStatus.KEEP, req.table, (), seconds,
                               note or "the plan improves no layer on its window")
        return PlanOutcome(req.seq, PlanStatus.ADOPT, table, layers, seconds, note)

    def _fail(self, reason: str, seconds: float = 0.0) -> PlanOutcome:
        req, self._pending = self._pending, None
        assert req is not None
        return PlanOutcome(req.seq, PlanStatus.FAILED, req.table, (), seconds, reason)

    def _kill(self) -> None:
        if self._proc is not None:
            self._proc.kill()
            self._proc.wait()
            self._proc = None

    def close(self) -> None:
        self._pending = None
        self._kill()


def _child_main() -> None:
    # Our protocol owns the real stdout; anything the policy prints goes to stderr.
    out = os.fdopen(os.dup(sys.stdout.fileno()), "wb")
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    inp = sys.stdin.buffer
    config = EplbConfig(**_read_frame(inp))
    from .registry import create_policy

    policy = create_policy(config.policy, config.policy_config())
    while True:
        try:
            seq, table, workload = _read_frame(inp)
        except EOFError:
            return
        start = time.perf_counter()
        try:
            result = tuple(policy.rebalance_experts(table, workload))
            _write_frame(out, ("ok", seq, result, time.perf_counter() - start))
        except Exception:  # noqa: BLE001 - the parent logs it and keeps serving
            _write_frame(out, ("error", seq, traceback.format_exc(limit=8).strip(), time.perf_counter() - start))


if __name__ == "__main__":
    _child_main()
