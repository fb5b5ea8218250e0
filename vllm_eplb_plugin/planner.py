"""Run a policy in a child process, off the serving path, and review what it returns.

The serving process submits ``(table, heat)`` and polls (or waits) for the outcome; the
child (``python -m vllm_eplb_plugin.planner``) builds the configured policy once and
answers each request. A child is a subprocess, not a ``multiprocessing`` worker, because
vLLM's worker processes (and vLLM Ascend's EPLB process) are daemonic and may not fork
workers of their own. The child exits when its stdin closes, so it never outlives the
serving process. :class:`PolicyChild` is that child, with a deadline per request and a
typed :class:`ChildFailure` for each way a request can end without a result; the
conformance suite runs the policy under test in one too.

Every outcome has an explicit :class:`PlanStatus`: ``ADOPT`` (some layers change),
``KEEP`` (the plan improves no layer) or ``FAILED`` (the policy raised, hung past
``plan_timeout_s``, died, returned an invalid table or one that cannot be unpickled); its ``new_table`` is always the
table to serve with, the current one unless ``ADOPT``. :func:`review_plan` is the one
place that decides which layers of a plan are taken.

Shapes: table ``[L, R, K]``; heat ``[L, E]`` or ``[T, L, E]`` per logical expert.
"""

from __future__ import annotations

import enum
import os
import pickle
import signal
import struct
import subprocess
import sys
import threading
import time
import traceback
from dataclasses import dataclass
from queue import Empty, SimpleQueue
from typing import IO, Any, Callable

import numpy as np

from .config import EplbConfig
from .metrics import balancedness
from .moves import moved_within_rank
from .placement import InvalidExpertTable, changed_slots, validate_table

_HEADER = struct.Struct("<QQ")  # payload bytes, request id (0: a message about the child itself)


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


def _write_frame(stream: IO[bytes], seq: int, obj: Any) -> None:
    _write_raw(stream, seq, pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL))


def _write_raw(stream: IO[bytes], seq: int, data: bytes) -> None:
    stream.write(_HEADER.pack(len(data), seq) + data)
    stream.flush()


def _read_raw(stream: IO[bytes]) -> tuple[int, bytes]:
    """One frame's request id and its still pickled payload, so that a payload the reader
    cannot unpickle is reported for its request and leaves the stream in step."""
    header = stream.read(_HEADER.size)
    if len(header) < _HEADER.size:
        raise EOFError("planner pipe closed")
    size, seq = _HEADER.unpack(header)
    data = stream.read(size)
    if len(data) < size:
        raise EOFError("planner pipe closed mid-frame")
    return seq, data


def _read_frame(stream: IO[bytes]) -> tuple[int, Any]:
    seq, data = _read_raw(stream)
    return seq, pickle.loads(data)


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


class Fault(str, enum.Enum):
    """How a request to a :class:`PolicyChild` ended without a result."""

    RAISED = "raised"
    """The handler (the policy) raised; the message is its traceback. The child lives on."""
    UNPICKLABLE = "unpicklable"
    """The child could not pickle the result. The child lives on."""
    UNREADABLE = "unreadable"
    """The parent could not unpickle the result. The child lives on."""
    SETUP = "setup"
    """Building the handler (importing and building the policy) raised; the child is gone."""
    EXITED = "exited"
    """The child exited or was killed by a signal; its process group was killed."""
    HUNG = "hung"
    """No result within the deadline; the child was killed."""
    NOT_READY = "not_ready"
    """The child did not finish its start-up within the start-up deadline; it was killed."""


FATAL = frozenset({Fault.SETUP, Fault.EXITED, Fault.HUNG, Fault.NOT_READY})
"""Faults after which the child is gone (killed, with its process group)."""


@dataclass(frozen=True)
class ChildResult:
    """A request's answer: what the handler returned, and its time in the child."""

    value: Any
    seconds: float


@dataclass(frozen=True)
class ChildFailure:
    """Why a request has no result. ``message`` says what happened without naming the
    caller ("exited with code 7", "was killed by signal 9", "no result within 2 s", a
    traceback); callers put it in their own words."""

    fault: Fault
    message: str
    seconds: float = 0.0


def exit_description(code: int) -> str:
    """``Popen.returncode`` in words: negative codes are signals."""
    return f"was killed by signal {-code}" if code < 0 else f"exited with code {code}"


_POLL_S = 0.05  # how often a blocked receive() looks whether the child is still there


class PolicyChild:
    """One child process (``python -m vllm_eplb_plugin.planner``) that answers requests.

    The child calls ``factory(*args)`` once (both pickled by reference: module-level
    names) to build a handler, e.g. a policy, says it is ready, and then answers each
    request ``payload`` with ``handler(payload)``. Requests are written by a thread, so
    :meth:`send` never blocks on a child that is still starting; replies are read by a
    thread into a queue of this child's own, so a killed child's last words never reach
    its successor. The child leads a session of its own: :meth:`kill` ends whatever the
    policy forked too.

    Deadlines: a request's ``timeout_s`` runs from when it was sent or from when the
    child became ready, whichever is later (a child's start-up is not a slow policy);
    the start-up itself is bounded by ``startup_timeout_s``.
    """

    def __init__(self, factory: Callable[..., Callable[[Any], Any]], args: tuple = (),
                 startup_timeout_s: float = 60.0) -> None:
        self.startup_timeout_s = startup_timeout_s
        # The child must import this package the way the parent did (editable installs,
        # PYTHONPATH set by tests): hand it the parent's sys.path.
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
        # One BLAS / OpenMP thread: the child shares the cores with the serving engine, and
        # a thread pool that spins on busy cores turned a 10 ms plan into > 150 ms in a
        # TP=2 vLLM serve on 2 cores (the plans are small; threads only add contention).
        env.update({var: "1" for var in _THREAD_VARS})
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "vllm_eplb_plugin.planner"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=env,
            start_new_session=True,
        )
        self.started = time.monotonic()
        self.ready_at: float | None = None  # set by the reader thread
        self._replies: SimpleQueue = SimpleQueue()
        self._requests: SimpleQueue = SimpleQueue()
        self._gone: ChildFailure | None = None  # the fatal fault, once there was one
        self._killed = False
        threading.Thread(target=self._read_loop, daemon=True, name="eplb-child-reader").start()
        threading.Thread(target=self._write_loop, daemon=True, name="eplb-child-writer").start()
        self._requests.put((0, pickle.dumps((factory, args), protocol=pickle.HIGHEST_PROTOCOL)))

    @property
    def pid(self) -> int:
        return self._proc.pid

    @property
    def ready(self) -> bool:
        """The handler is built and the child waits for requests."""
        return self.ready_at is not None and self._gone is None

    @property
    def alive(self) -> bool:
        return self._gone is None and self._proc.poll() is None

    def send(self, seq: int, payload: Any) -> None:
        """Queue request ``seq`` (> 0); :meth:`receive` reports a child that cannot take it."""
        self._requests.put((seq, pickle.dumps(payload, protocol=pickle.HIGHEST_PROTOCOL)))

    def receive(self, seq: int, sent: float, timeout_s: float, block: bool) -> ChildResult | ChildFailure | None:
        """The answer to request ``seq`` sent at ``sent`` (``time.monotonic()``), or None
        if it is not there yet (only when not ``block``). Replies to other requests are
        dropped. A fatal fault kills the child (and its process group) before returning."""
        while True:
            if self._gone is not None:
                return self._gone
            try:
                item = self._replies.get(timeout=self._wait_s(sent, timeout_s)) if block else self._replies.get_nowait()
            except Empty:
                item = None
            answer = self._answer(seq, item) if item is not None else self._check(seq, sent, timeout_s)
            if answer is not None or (not block and item is None):
                return answer

    def call(self, seq: int, payload: Any, timeout_s: float) -> ChildResult | ChildFailure:
        """Send request ``seq`` and wait for its answer."""
        sent = time.monotonic()
        self.send(seq, payload)
        answer = self.receive(seq, sent, timeout_s, block=True)
        assert answer is not None  # a blocking receive always answers
        return answer

    def kill(self) -> None:
        """Kill the child's process group (the policy's own children too) and reap it."""
        if self._killed:
            return  # once: a reaped group's id may be reused
        self._killed = True
        try:
            os.killpg(self._proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):  # the group is gone already
            pass
        self._proc.wait()
        self._requests.put(None)  # ends the writer thread, which closes stdin

    # -- internals ----------------------------------------------------------------------

    def _deadline(self, sent: float, timeout_s: float) -> float:
        if self.ready_at is None:
            return self.started + self.startup_timeout_s
        return max(sent, self.ready_at) + timeout_s

    def _wait_s(self, sent: float, timeout_s: float) -> float:
        return min(max(self._deadline(sent, timeout_s) - time.monotonic(), 0.0), _POLL_S)

    def _answer(self, seq: int, item: tuple) -> ChildResult | ChildFailure | None:
        got, kind, payload, seconds = item
        if kind == "eof":
            return self._exited()
        if kind == "setup":
            return self._fatal(Fault.SETUP, payload)
        if got != seq:
            return None  # the answer to an earlier request: not this one's
        if kind == "ok":
            return ChildResult(payload, seconds)
        return ChildFailure(Fault(kind), payload, seconds)

    def _check(self, seq: int, sent: float, timeout_s: float) -> ChildResult | ChildFailure | None:
        """No reply yet: has the child exited (a policy that forks and exits leaves its
        pipes open in the grandchild, so no end of file comes), or is it past its deadline?"""
        if self._proc.poll() is not None:
            try:  # its last reply may still be on the way through the reader thread
                return self._answer(seq, self._replies.get(timeout=_POLL_S))
            except Empty:
                return self._exited()
        if time.monotonic() < self._deadline(sent, timeout_s):
            return None
        if self.ready_at is None:
            return self._fatal(Fault.NOT_READY, f"not ready within {self.startup_timeout_s:g} s")
        return self._fatal(Fault.HUNG, f"no result within {timeout_s:g} s")

    def _exited(self) -> ChildFailure:
        try:  # end of file: the child is exiting, or closed its end of the pipe
            code = self._proc.wait(timeout=1.0)
        except subprocess.TimeoutExpired:
            return self._fatal(Fault.EXITED, "closed its result pipe")
        return self._fatal(Fault.EXITED, exit_description(code))  # its group may live on: kill it

    def _fatal(self, fault: Fault, message: str) -> ChildFailure:
        self.kill()
        self._gone = ChildFailure(fault, message)
        return self._gone

    def _read_loop(self) -> None:
        stream = self._proc.stdout
        assert stream is not None  # Popen(stdout=PIPE)
        try:
            while True:
                seq, data = _read_raw(stream)
                try:
                    kind, payload, seconds = pickle.loads(data)
                except (Exception, SystemExit) as exc:  # whatever the policy's objects raise
                    kind, payload, seconds = "unreadable", f"{type(exc).__name__}: {exc}", 0.0
                if kind == "ready":
                    self.ready_at = time.monotonic()
                else:
                    self._replies.put((seq, kind, payload, seconds))
        except (EOFError, OSError, ValueError):
            self._replies.put((0, "eof", None, 0.0))
        finally:
            stream.close()

    def _write_loop(self) -> None:
        stream = self._proc.stdin
        assert stream is not None  # Popen(stdin=PIPE)
        try:
            while (item := self._requests.get()) is not None:
                _write_raw(stream, *item)
        except (OSError, ValueError):  # the child is gone; receive() reports it
            pass
        finally:
            try:
                stream.close()
            except OSError:
                pass


_THREAD_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


def _policy_handler(config: dict) -> Callable[[tuple[np.ndarray, np.ndarray]], tuple]:
    """In the planner child: build the policy once; each request is ``(table [L, R, K],
    heat [L, E] | [T, L, E])``, planned through ``EplbPolicy.plan``."""
    from .registry import create_policy

    settings = EplbConfig(**config)
    policy = create_policy(settings.policy, settings.policy_config())
    return lambda request: tuple(policy.plan(*request))


@dataclass(frozen=True)
class _Request:
    seq: int
    table: np.ndarray  # [L, R, K] current
    expert_load: np.ndarray  # [L, E] what the plan is judged on
    sent: float  # time.monotonic()


class Planner:
    """Owns the planning child process. One request in flight at a time.

    ``config`` names the policy and its options; ``config.plan_timeout_s`` bounds one
    request, counted from when the child is ready (a fresh child's start-up, about
    0.3 s, is bounded by ``startup_timeout_s`` instead). A child that hangs, dies or
    cannot start is killed with its process group and a fresh one started at once, so
    it is ready by the next request.
    """

    startup_timeout_s = 60.0

    def __init__(self, config: EplbConfig) -> None:
        self.config = config
        self.timeout_s = float(config.plan_timeout_s)
        self._child: PolicyChild | None = None
        self._pending: _Request | None = None
        self._seq = 0

    @property
    def ready(self) -> bool:
        """A child is running and has built its policy: a request sent now is answered in
        the policy's own time. False for a while after a start or restart."""
        return self._child is not None and self._child.ready

    def warm(self) -> None:
        """Start the child now (imports and policy set-up take ~0.3 s), so the first plan
        does not pay for it."""
        if self._child is None or not self._child.alive:
            self._start()

    def _start(self) -> None:
        # Only what builds the policy: the child runs no file checks (a record path that
        # changed since start-up is the serving process's business, not a reason to die).
        config = {k: v for k, v in self.config.to_dict().items() if k in _CHILD_KEYS}
        self._child = PolicyChild(_policy_handler, (config,), self.startup_timeout_s)

    def submit(self, table: np.ndarray, heat: np.ndarray) -> int:
        """Send ``table [L, R, K]`` and ``heat [L, E] | [T, L, E]``; returns the request id.
        Never blocks on the child (a thread writes the request)."""
        if self._pending is not None:
            raise RuntimeError("a plan is already in flight; poll() it first")
        self.warm()
        assert self._child is not None
        self._seq += 1
        heat = np.asarray(heat, dtype=np.float64)
        load = heat.sum(axis=0) if heat.ndim == 3 else heat
        self._pending = _Request(self._seq, table, load, time.monotonic())
        self._child.send(self._seq, (table, heat))
        return self._seq

    def poll(self) -> PlanOutcome | None:
        """The outcome of the request in flight if it is done (or failed), else None.
        Never raises: any failure is a ``FAILED`` outcome with its reason."""
        return self._guarded(block=False)

    def wait(self) -> PlanOutcome | None:
        """Block until the request in flight has an outcome (at most ``plan_timeout_s``
        once the child is ready); None when nothing is in flight. Never raises."""
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
        assert self._child is not None
        answer = self._child.receive(req.seq, req.sent, self.timeout_s, block)
        if answer is None:
            return None
        if isinstance(answer, ChildFailure):
            if answer.fault in FATAL:
                self._start()  # now, so that its start-up is over by the next request
            return self._fail(self._reason(answer), answer.seconds)
        try:
            _changed, _priority, new_table = answer.value
            new = check_plan(req.table, new_table, req.expert_load.shape[-1])
        except (InvalidExpertTable, TypeError, ValueError) as exc:
            return self._fail(f"policy returned an invalid result: {exc}", answer.seconds)
        table, layers, note = review_plan(req.table, new, req.expert_load)
        self._pending = None
        if not layers:
            return PlanOutcome(req.seq, PlanStatus.KEEP, req.table, (), answer.seconds,
                               note or "the plan improves no layer on its window")
        return PlanOutcome(req.seq, PlanStatus.ADOPT, table, layers, answer.seconds, note)

    def _reason(self, failure: ChildFailure) -> str:
        """A child failure in the planner's words (one place for every message)."""
        restarted = "; the child was restarted"
        return {
            Fault.RAISED: f"policy raised: {failure.message}",
            Fault.UNPICKLABLE: f"policy result could not be pickled: {failure.message}",
            Fault.UNREADABLE: f"policy result could not be unpickled: {failure.message}",
            Fault.SETUP: f"planner child could not build the policy: {failure.message}",
            Fault.EXITED: f"planner child {failure.message}{restarted}",
            Fault.HUNG: f"policy timed out after {self.timeout_s:g} s (plan_timeout_s){restarted}",
            Fault.NOT_READY: f"planner child {failure.message} (imports and policy set-up){restarted}",
        }[failure.fault]

    def _fail(self, reason: str, seconds: float = 0.0) -> PlanOutcome:
        req, self._pending = self._pending, None
        assert req is not None
        return PlanOutcome(req.seq, PlanStatus.FAILED, req.table, (), seconds, reason)

    def close(self) -> None:
        """Drop the request in flight and kill the child with its process group."""
        self._pending = None
        if self._child is not None:
            self._child.kill()
            self._child = None


def _unpin() -> None:
    """Let the child run on every CPU. It inherits the serving process's affinity, and
    vLLM's CPU workers pin themselves to their cores (TP rank 0 to core 0): pinned there,
    next to a worker that keeps its core busy, a 15 ms plan ran past 48 decode steps."""
    if hasattr(os, "sched_setaffinity"):
        try:
            os.sched_setaffinity(0, range(os.cpu_count() or 1))
        except OSError:  # a cpuset that forbids it: stay where the parent put us
            pass


def _child_main() -> None:
    _unpin()
    # Our protocol owns the real stdout; anything the policy prints goes to stderr.
    out = os.fdopen(os.dup(sys.stdout.fileno()), "wb")
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    inp = sys.stdin.buffer
    start = time.perf_counter()
    try:
        _seq, (factory, args) = _read_frame(inp)
        handler = factory(*args)
    except BaseException:  # noqa: BLE001 - SystemExit too: the parent reports it
        _reply(out, 0, "setup", traceback.format_exc(limit=8).strip(), time.perf_counter() - start)
        return
    _reply(out, 0, "ready", None, time.perf_counter() - start)
    while True:
        try:
            seq, payload = _read_frame(inp)
        except EOFError:
            return
        start = time.perf_counter()
        try:
            kind, result = "ok", handler(payload)
        except BaseException:  # noqa: BLE001 - SystemExit and KeyboardInterrupt too: report, serve on
            kind, result = "raised", traceback.format_exc(limit=8).strip()
        _reply(out, seq, kind, result, time.perf_counter() - start)


def _reply(out: IO[bytes], seq: int, kind: str, payload: Any, seconds: float) -> None:
    try:
        data = pickle.dumps((kind, payload, seconds), protocol=pickle.HIGHEST_PROTOCOL)
    except Exception as exc:  # noqa: BLE001 - e.g. a lambda in the result
        data = pickle.dumps((Fault.UNPICKLABLE.value, f"{type(exc).__name__}: {exc}", seconds))
    _write_raw(out, seq, data)


if __name__ == "__main__":
    # Run the module's importable copy, so that handlers pickled by reference
    # (vllm_eplb_plugin.planner._policy_handler) and this loop share one module.
    from vllm_eplb_plugin.planner import _child_main as main

    main()
