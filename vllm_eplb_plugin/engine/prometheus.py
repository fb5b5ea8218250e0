"""EPLB metrics for vLLM's ``/metrics``.

Defined in the process that plans for global rank 0: the vLLM worker, or on vLLM Ascend
its EPLB process (the same names, so dashboards work on both). vLLM's API server shows metrics of
other processes when Prometheus multiprocess mode is on (``PROMETHEUS_MULTIPROC_DIR`` set
before ``vllm serve`` starts, or ``--api-server-count`` > 1); otherwise they stay in the
worker's registry and ``/metrics`` does not show them.
"""

from __future__ import annotations

import threading

import numpy as np
from prometheus_client import Counter, Gauge

from ..heat import HeatCounter

_MODE = "mostrecent"


class EplbMetrics:
    """Plan outcomes, balancedness, moves and routed-token counts. One per process
    (:meth:`shared`): Prometheus registers each metric name once."""

    _shared: EplbMetrics | None = None

    @classmethod
    def shared(cls) -> EplbMetrics:
        """This process's metrics, created on first use."""
        if cls._shared is None:
            cls._shared = cls()
        return cls._shared

    def __init__(self) -> None:
        self.plans = Counter("vllm:eplb_plans", "EPLB plans by outcome (applied, failed).", ["outcome"])
        self.balancedness = Gauge(
            "vllm:eplb_balancedness",
            "Mean rank load / max rank load of the current table on the last planning window "
            "(mean over MoE layers; 1 = perfectly balanced).",
            multiprocess_mode=_MODE,
        )
        self.predicted = Gauge(
            "vllm:eplb_predicted_balancedness",
            "Balancedness the last applied plan predicts on the same window.",
            multiprocess_mode=_MODE,
        )
        self.layers_changed = Gauge(
            "vllm:eplb_layers_changed", "MoE layers whose placement the last plan changed.", multiprocess_mode=_MODE
        )
        self.slots_moved = Counter("vllm:eplb_slots_moved", "Expert slots whose expert changed, over all plans.")
        self.policy_seconds = Gauge(
            "vllm:eplb_policy_seconds", "Time the policy took for the last plan.", multiprocess_mode=_MODE
        )
        self.routed = Counter(
            "vllm:eplb_routed_tokens", "Token-to-expert assignments counted per MoE layer (tokens x top-k).", ["layer"]
        )
        self._exported: np.ndarray | None = None
        self._lock = threading.Lock()

    def plan(self, before: float, after: float, layers: int, moved: int, seconds: float) -> None:
        self.plans.labels("applied").inc()
        self.balancedness.set(before)
        self.predicted.set(after)
        self.layers_changed.set(layers)
        self.slots_moved.inc(moved)
        self.policy_seconds.set(seconds)

    def failed(self) -> None:
        self.plans.labels("failed").inc()

    def export_heat(self, counter: HeatCounter) -> None:
        """Add what the counter saw since the last export (``[L]`` sums of ``total``)."""
        with self._lock:
            per_layer = counter.total_counts().sum(axis=1)
            last = self._exported if self._exported is not None else np.zeros_like(per_layer)
            for layer, delta in enumerate(per_layer - last):
                if delta > 0:
                    self.routed.labels(str(layer)).inc(int(delta))
            self._exported = per_layer

    def start_exporter(self, counter: HeatCounter, period_s: float = 1.0) -> threading.Event:
        """Export heat every ``period_s`` from a daemon thread (off the forward path);
        set the returned event to stop it."""
        stop = threading.Event()

        def loop() -> None:
            while not stop.wait(period_s):
                self.export_heat(counter)

        threading.Thread(target=loop, daemon=True, name="eplb-metrics").start()
        return stop
