"""Run a policy in a child process, off the serving path.

The serving process submits ``(table, heat)`` and polls for the outcome without
blocking; the child (``python -m vllm_eplb_plugin.planner``) builds the configured policy
once and answers each request. A child is a subprocess, not a ``multiprocessing``
worker, because vLLM's worker processes are daemonic and may not fork workers of their
own. A policy that raises, hangs past the timeout, dies or returns an invalid table gives
a failed :class:`PlanOutcome` with the reason; the caller keeps its table. The child
exits when its stdin closes, so it never outlives the serving process.

Shapes: table ``[L, R, K]``; heat ``[L, E]`` or ``[T, L, E]`` per logical expert.
"""

from __future__ import annotations

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
from .placement import InvalidExpertTable, changed_slots, expert_to_slot_load, validate_table


@dataclass(frozen=True)
class PlanOutcome:
    """What one planning request produced.

    ``new_table [L, R, K]`` and ``changed_layers`` (layer ids whose table changed) are
    set when ``error`` is None. ``seconds`` is the policy's own time in the child.
    """

    seq: int
    new_table: np.ndarray | None
    changed_layers: tuple[int, ...]
    seconds: float
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


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


class Planner:
    """Owns the planning child process. One request in flight at a time.

    ``config`` names the policy and its options; ``timeout_s`` bounds one request (the
    child is killed and restarted past it).
    """

    def __init__(self, config: EplbConfig, timeout_s: float = 600.0) -> None:
        self.config = config
        self.timeout_s = timeout_s
        self._proc: subprocess.Popen | None = None
        self._results: SimpleQueue = SimpleQueue()
        self._pending: tuple[int, np.ndarray, int, float] | None = None  # seq, old table, E, sent at
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
        _write_frame(self._proc.stdin, self.config.to_dict())
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
        workload = expert_to_slot_load(table, np.asarray(heat, dtype=np.float64))
        self._pending = (self._seq, table, heat.shape[-1], time.monotonic())
        try:
            _write_frame(self._proc.stdin, (self._seq, table, workload))
        except OSError as exc:  # the child died between requests: poll() reports it
            self._results.put(("died", self._proc.pid, f"{self._proc.poll()} ({exc})"))
        return self._seq

    def poll(self) -> PlanOutcome | None:
        """The outcome of the request in flight if it is done (or failed), else None.
        Never raises: any failure is a failed outcome with its reason."""
        try:
            return self._poll()
        except Exception as exc:  # noqa: BLE001 - serving must go on; the reason is reported
            seq = self._pending[0] if self._pending else 0
            return self._fail(seq, f"planner error: {type(exc).__name__}: {exc}")

    def _poll(self) -> PlanOutcome | None:
        if self._pending is None:
            return None
        seq, old, num_experts, sent = self._pending
        try:
            msg = self._results.get_nowait()
        except Empty:
            if time.monotonic() - sent <= self.timeout_s:
                return None
            self._kill()
            return self._fail(seq, f"policy timed out after {self.timeout_s:.0f} s; the child was restarted")
        if msg[0] == "died":
            self._proc = None
            return self._fail(seq, f"planner process {msg[1]} exited with code {msg[2]}")
        kind, _seq, payload, seconds = msg
        if kind == "error":
            return self._fail(seq, f"policy raised: {payload}", seconds)
        try:
            _changed, _priority, new_table = payload
            new = check_plan(old, new_table, num_experts)
        except (InvalidExpertTable, TypeError, ValueError) as exc:
            return self._fail(seq, f"policy returned an invalid result: {exc}", seconds)
        self._pending = None
        layers = tuple(int(i) for i in np.nonzero(changed_slots(old, new))[0])
        return PlanOutcome(seq, new, layers, seconds)

    def _fail(self, seq: int, reason: str, seconds: float = 0.0) -> PlanOutcome:
        self._pending = None
        return PlanOutcome(seq, None, (), seconds, reason)

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
