"""Expert heat: per-layer routing counts kept on the device, windowed for the planner.

Shapes: ``L`` MoE layers, ``E`` logical experts, ``N`` token rows of a forward step, ``K``
experts per token (top-k), ``T`` steps of the ring buffer.

The counting path (:meth:`HeatCounter.count`, :meth:`HeatCounter.end_step`) uses tensor
ops on preallocated buffers only: no host sync, no Python state that would be frozen
when Dynamo traces the routing hook. The host sees the counts once per planning
interval, in :meth:`HeatCounter.close_interval`.

Engine-agnostic: used by the vLLM integration and by the generic runtime.
"""

from __future__ import annotations

import numpy as np
import torch

WINDOWS = ("sum", "ema", "steps")


def _host(t: torch.Tensor) -> np.ndarray:
    # .cpu() of a CPU tensor is the tensor itself: copy, or the next in-place update
    # (zero_, add_) would change what the caller holds.
    return t.detach().to("cpu", copy=True).numpy()


class HeatCounter:
    """Counts ``topk_ids`` per layer and keeps the window the planner asks for.

    Buffers (all on ``device``):

    - ``row_weight`` ``[max_rows]`` int64: 1 for rows of the current step that count,
      0 for padding, warm-up or filtered rows. Zero between steps, so a forward pass
      nobody announced (profile, dummy, warm-up run) counts nothing.
    - ``step`` ``[L, E]`` int64: counts of the current step.
    - ``interval`` ``[L, E]`` int64: counts since the last :meth:`close_interval`.
    - ``total`` ``[L, E]`` int64: counts since start (for metrics; never reset).
    - ``ema`` ``[L, E]`` float64 (window ``"ema"``): average over intervals.
    - ``ring`` ``[T, L, E]`` int64 (window ``"steps"``): the last ``T`` steps.
    """

    def __init__(
        self,
        num_layers: int,
        num_experts: int,
        max_rows: int,
        *,
        window: str = "sum",
        ema_decay: float = 0.5,
        window_steps: int = 64,
        device: torch.device | str = "cpu",
    ) -> None:
        if window not in WINDOWS:
            raise ValueError(f"heat window {window!r} is not one of {WINDOWS}")
        self.num_layers, self.num_experts = num_layers, num_experts
        self.window, self.ema_decay, self.window_steps = window, ema_decay, window_steps
        shape = (num_layers, num_experts)
        self.row_weight = torch.zeros(max_rows, dtype=torch.int64, device=device)
        self.step = torch.zeros(shape, dtype=torch.int64, device=device)
        self.interval = torch.zeros(shape, dtype=torch.int64, device=device)
        self.total = torch.zeros(shape, dtype=torch.int64, device=device)
        self.ema = torch.zeros(shape, dtype=torch.float64, device=device) if window == "ema" else None
        self.ring = (
            torch.zeros((window_steps, *shape), dtype=torch.int64, device=device)
            if window == "steps"
            else None
        )
        self._armed = 0  # rows begin_step armed; end_step clears only those
        self._ring_pos = 0  # host-side: advanced by end_step, which runs outside the model
        self._ring_filled = 0
        self._intervals = 0
        self.steps_in_interval = 0

    # -- forward path ---------------------------------------------------------------------

    def begin_step(self, row_weight: torch.Tensor) -> None:
        """Arm the counter for one step; ``row_weight`` ``[N]`` (bool or int, on device)."""
        self._armed = row_weight.shape[0]
        self.row_weight[: self._armed].copy_(row_weight)

    def count(self, layer: int, topk_ids: torch.Tensor) -> None:
        """Add one layer's routing of the current step; ``topk_ids`` ``[N, K]``."""
        n, k = topk_ids.shape
        weight = self.row_weight[:n].unsqueeze(1).expand(n, k)
        self.step[layer].scatter_add_(0, topk_ids.reshape(-1).long(), weight.reshape(-1))

    def end_step(self) -> None:
        """Fold the step into the window and disarm the counter until the next step."""
        self.interval.add_(self.step)
        self.total.add_(self.step)
        if self.ring is not None:
            self.ring[self._ring_pos].copy_(self.step)
            self._ring_pos = (self._ring_pos + 1) % self.window_steps
            self._ring_filled = min(self._ring_filled + 1, self.window_steps)
        self.step.zero_()
        self.row_weight[: self._armed].zero_()
        self.steps_in_interval += 1

    # -- planner side (host) --------------------------------------------------------------

    def close_interval(self) -> np.ndarray:
        """The heat to plan on, and start a new interval. Syncs with the device once.

        Returns ``[L, E]`` (window ``"sum"``: counts of the interval; ``"ema"``: the
        average over intervals, the newest weighted ``1 - ema_decay``) or ``[T, L, E]``
        (window ``"steps"``: the last ``T`` steps, oldest first).
        """
        if self.window == "steps":
            assert self.ring is not None
            order = [(self._ring_pos - self._ring_filled + i) % self.window_steps for i in range(self._ring_filled)]
            heat = _host(self.ring[order])
        elif self.window == "ema":
            assert self.ema is not None
            decay = self.ema_decay if self._intervals else 0.0
            self.ema.mul_(decay).add_(self.interval.double(), alpha=1.0 - decay)
            heat = _host(self.ema)
        else:
            heat = _host(self.interval)
        self.interval.zero_()
        self.steps_in_interval = 0
        self._intervals += 1
        return heat

    def total_counts(self) -> np.ndarray:
        """Counts since start, ``[L, E]`` (a host copy; safe to call from another thread,
        which may see a step half-added)."""
        return _host(self.total)
