"""Expert heat: per-layer routing counts kept on the device, windowed for the planner.

Shapes: ``L`` MoE layers, ``E`` logical experts, ``N`` token rows of a forward step, ``K``
experts per token (top-k), ``T`` steps of the ring buffer.

The counting path (:meth:`HeatCounter.begin_step`, :meth:`HeatCounter.count`,
:meth:`HeatCounter.end_step`) works on preallocated buffers with no host sync. A traced
forward (torch.compile, graph replay) only replays tensor ops, so there a device weight
buffer arms the step (one op to arm, one per layer to count, one to disarm). An eager
forward runs the hook's Python every time, so there a Python flag arms the step and a
step whose rows all count costs one op per layer and nothing else. The host sees the
counts once per planning interval, in :meth:`HeatCounter.close_interval`.

Engine-agnostic: used by the vLLM integration and by the generic runtime.
"""

from __future__ import annotations

import threading

import numpy as np
import torch

WINDOWS = ("sum", "ema", "steps")


def _host(t: torch.Tensor) -> np.ndarray:
    # .cpu() of a CPU tensor is the tensor itself: copy, or the next in-place update
    # (zero_, index_add_) would change what the caller holds.
    return t.detach().to("cpu", copy=True).numpy()


class HeatCounter:
    """Counts ``topk_ids`` per layer and keeps the window the planner asks for.

    Device buffers:

    - ``weight`` ``[max_rows, K]`` int64: 1 for the (row, choice) pairs of the current step
      that count, 0 for padding, warm-up or filtered rows. Zero between steps, so a forward
      pass nobody announced (profile, dummy, warm-up run) counts nothing.
    - ``interval`` ``[L, E]`` int64: counts since the last :meth:`close_interval`.
    - ``ring`` ``[T, L, E]`` int64 and ``step`` ``[L, E]`` (window ``"steps"`` only): the
      last ``T`` steps, and the step being counted.

    - ``_flat_ones`` ``[max_rows * K]`` int64 (``traced=False`` only): the weights of a
      step whose rows all count.

    Host state: counts of closed intervals (for :meth:`total_counts`) and, for window
    ``"ema"``, the running average ``[L, E]`` float64.

    ``traced``: whether the forward that calls :meth:`count` may be traced or replayed
    (torch.compile, CUDA/NPU graphs). ``False`` is faster and only correct when every
    forward runs :meth:`count` as Python.
    """

    def __init__(
        self,
        num_layers: int,
        num_experts: int,
        max_rows: int,
        top_k: int,
        *,
        window: str = "sum",
        ema_decay: float = 0.5,
        window_steps: int = 64,
        traced: bool = True,
        device: torch.device | str = "cpu",
    ) -> None:
        if window not in WINDOWS:
            raise ValueError(f"heat window {window!r} is not one of {WINDOWS}")
        self.num_layers, self.num_experts, self.top_k = num_layers, num_experts, top_k
        self.window, self.ema_decay, self.window_steps = window, ema_decay, window_steps
        shape = (num_layers, num_experts)
        self.traced = traced
        self.weight = torch.zeros((max_rows, top_k), dtype=torch.int64, device=device)
        self.interval = torch.zeros(shape, dtype=torch.int64, device=device)
        self.ring = self.step = None
        if window == "steps":
            self.ring = torch.zeros((window_steps, *shape), dtype=torch.int64, device=device)
            self.step = torch.zeros(shape, dtype=torch.int64, device=device)
        # Counts go straight into the window's buffer, except for the ring, whose slot is a
        # host-side position that a traced graph would freeze.
        self._counts = self.step if self.step is not None else self.interval
        # Eager counting builds no views per call (each costs microseconds in a busy worker):
        # one row view per layer, and the step's flat weights, sliced once when it is armed.
        self._layer_counts = list(self._counts.unbind(0))
        self._flat_ones = None if traced else torch.ones(max_rows * top_k, dtype=torch.int64, device=device)
        self._step_weights = self.weight.view(-1)[:0]  # [n * K]: what count() adds this step (eager)
        self._ema: np.ndarray | None = None
        self._closed = np.zeros(shape, dtype=np.int64)
        self._lock = threading.Lock()  # total_counts() may run on a metrics thread
        self._armed = 0  # rows begin_step armed; end_step clears only those
        self._ring_pos = 0
        self._ring_filled = 0
        self.steps_in_interval = 0

    def reserve(self, num_rows: int) -> None:
        """Make room for steps of up to ``num_rows`` rows. For eager callers whose step
        size is not known up front; a graph traced before would keep the old buffer."""
        if num_rows > self.weight.shape[0]:
            self.weight = torch.zeros((num_rows, self.top_k), dtype=torch.int64, device=self.weight.device)
            if self._flat_ones is not None:
                self._flat_ones = torch.ones(num_rows * self.top_k, dtype=torch.int64, device=self.weight.device)

    # -- forward path ---------------------------------------------------------------------

    def begin_step(self, num_rows: int, real_rows: torch.Tensor | None = None) -> None:
        """Arm the counter for a step. ``real_rows`` ``[num_rows]`` bool on the device
        marks the rows that count; ``None``: all of them.

        Traced counting needs ``num_rows`` = every row of the step, padding included, and
        the mask to exclude padding. Eager counting takes ``num_rows`` = the leading rows
        that may count: rows after them (padding at the end) are sliced off, no mask needed.
        """
        self._armed = num_rows
        if real_rows is not None:
            self.weight[:num_rows].copy_(real_rows.unsqueeze(1))
        elif self.traced:
            self.weight[:num_rows].fill_(1)
        if not self.traced:
            flat = self._flat_ones if real_rows is None else self.weight.view(-1)
            assert flat is not None  # untraced counters keep _flat_ones
            self._step_weights = flat[: num_rows * self.top_k]

    def count(self, layer: int, topk_ids: torch.Tensor) -> None:
        """Add one layer's routing of the current step; ``topk_ids`` ``[N, K]`` (int32 or int64)."""
        if self.traced:
            self._counts[layer].index_add_(0, topk_ids.reshape(-1), self.weight[: topk_ids.shape[0]].view(-1))
        elif self._armed:
            ids, weights = topk_ids.reshape(-1), self._step_weights
            if ids.shape[0] != weights.shape[0]:  # padding rows after the armed ones
                n = min(ids.shape[0], weights.shape[0])
                ids, weights = ids[:n], weights[:n]
            self._layer_counts[layer].index_add_(0, ids, weights)

    def end_step(self) -> None:
        """Disarm the counter until the next step (and push the step into the ring)."""
        if self.traced:  # eager steps read weights only while armed: nothing to clear
            self.weight[: self._armed].zero_()
        self._armed = 0
        if self.ring is not None:
            assert self.step is not None
            self.ring[self._ring_pos].copy_(self.step)
            self.interval.add_(self.step)
            self.step.zero_()
            self._ring_pos = (self._ring_pos + 1) % self.window_steps
            self._ring_filled = min(self._ring_filled + 1, self.window_steps)
        self.steps_in_interval += 1

    # -- planner side (host) --------------------------------------------------------------

    def close_interval(self) -> np.ndarray:
        """The heat to plan on, and start a new interval. Syncs with the device once.

        Returns ``[L, E]`` (window ``"sum"``: counts of the interval; ``"ema"``: the
        average over intervals, the newest weighted ``1 - ema_decay``) or ``[T, L, E]``
        (window ``"steps"``: the last ``T`` steps, oldest first).
        """
        with self._lock:
            counts = _host(self.interval)
            self.interval.zero_()
            self._closed += counts
        self.steps_in_interval = 0
        if self.window == "steps":
            assert self.ring is not None
            order = [(self._ring_pos - self._ring_filled + i) % self.window_steps for i in range(self._ring_filled)]
            return _host(self.ring[order])
        if self.window == "ema":
            fresh = counts.astype(np.float64)
            self._ema = fresh if self._ema is None else self.ema_decay * self._ema + (1.0 - self.ema_decay) * fresh
            return self._ema.copy()
        return counts

    def total_counts(self) -> np.ndarray:
        """Counts since start, ``[L, E]`` (a host copy; safe to call from another thread,
        which may see a step half-added)."""
        with self._lock:
            return self._closed + _host(self.interval)
