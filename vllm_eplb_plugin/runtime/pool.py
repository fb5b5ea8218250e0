"""The rank side of the scheduler loop: ``construct_expert_info_transfer_pool``.

Every rank runs one worker thread (plus a reader for the scheduler's connection), so the
forward pass never waits for the algorithm or for weights in flight:

- the collectors hand each round's load ``[E]`` to the pool, which reports it;
- for each ``plan`` the scheduler sends (the same messages, in the same order, to every
  rank), the worker thread fetches the new weights into the block's spare buffers with the
  fewest transfers (:mod:`.transfer`) over a process group of its own, and stages them;
- the block's forward pass switches when every rank has staged
  (:meth:`DynamicDispatcher.check_consistency`).

If the scheduler goes away or a transfer fails, the pool stops and every rank keeps
serving on its current tables (a staged update only applies once all ranks staged it).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from ..consistency import group_ranks
from ..placement import validate_table
from .collector import ExpertLoadCollector
from .dispatcher import DynamicDispatcher
from .protocol import connect, recv, resolve_auth_key, send
from .transfer import execute_transfers, plan_transfers

logger = logging.getLogger("vllm_eplb_plugin.runtime")

_STOP = object()


def find_blocks(module: torch.nn.Module) -> list[torch.nn.Module]:
    """The MoE blocks of ``module`` in module order: those that carry both an
    ``expert_load_collector`` and a ``dispatcher``. Block ``i`` is layer ``i`` for the scheduler."""
    return [
        m for m in module.modules()
        if isinstance(getattr(m, "expert_load_collector", None), ExpertLoadCollector)
        and isinstance(getattr(m, "dispatcher", None), DynamicDispatcher)
    ]


class TransferPool:
    """Connection to the scheduler and the worker thread of one rank (see the module
    docstring). ``transfers`` lists what each applied plan moved: layer, round, remote
    fetches into this rank, seconds."""

    def __init__(
        self, blocks: list[torch.nn.Module], rank: int, conn: Any, group: dist.ProcessGroup, device: Any
    ) -> None:
        self.collectors = [b.expert_load_collector for b in blocks]
        self.dispatchers = [b.dispatcher for b in blocks]
        self.rank, self.conn, self.group, self.device = rank, conn, group, device
        self.transfers: list[dict] = []
        self.kept: list[dict] = []  # rounds the scheduler kept a layer's table, with the reason
        self.error: str | None = None
        self._events: queue.SimpleQueue = queue.SimpleQueue()
        self._stopping = threading.Event()
        self._send_lock = threading.Lock()
        self._threads: list[threading.Thread] = []

    # -- set-up ---------------------------------------------------------------------------

    def hello(self) -> dict:
        """Tell the scheduler this rank's tables; returns its ``init`` message."""
        first = self.dispatchers[0]
        send(self.conn, {
            "type": "hello", "rank": self.rank, "world_size": first.ep_size, "num_layers": len(self.dispatchers),
            "num_experts": first.expert_num, "table": [d.table[self.rank].tolist() for d in self.dispatchers],
        })
        reply = recv(self.conn)
        if reply["type"] == "error":
            raise RuntimeError(f"EPLB scheduler refused rank {self.rank}: {reply['message']}")
        if reply["type"] != "init":
            raise RuntimeError(f"EPLB scheduler sent {reply['type']!r} where 'init' was expected")
        return reply

    def start(self, init: dict) -> None:
        for layer, d in enumerate(self.dispatchers):
            d.mode, d.name = init["mode"], f"expert table of MoE block {layer}"
        # Start-up differences (e.g. redundant slots being added) go through the same path
        # as plans, so they too apply on every rank at the same step.
        for layer, table in enumerate(init["table"]):
            if not np.array_equal(table, self.dispatchers[layer].table):
                self._events.put({"type": "plan", "round": -1, "layer": layer, "table": table})
        for layer, collector in enumerate(self.collectors):
            collector.sink = lambda rnd, load, layer=layer: self._events.put(("load", layer, rnd, load))
        for target, name in ((self._read, "eplb-reader"), (self._work, "eplb-transfer")):
            thread = threading.Thread(target=target, name=f"{name}-{self.rank}", daemon=True)
            thread.start()
            self._threads.append(thread)

    def stop(self, timeout: float = 10.0) -> None:
        """Stop reporting and transferring; the blocks keep serving on their tables."""
        self._stopping.set()
        for c in self.collectors:
            c.sink = None
        self._events.put(_STOP)
        try:
            self.conn.close()
        except OSError:
            pass
        for t in self._threads:
            t.join(timeout)

    # -- threads --------------------------------------------------------------------------

    def _read(self) -> None:
        try:
            while not self._stopping.is_set():
                self._events.put(recv(self.conn))
        except (EOFError, OSError) as exc:
            if not self._stopping.is_set():
                logger.warning("rank %d: scheduler connection closed (%s); serving on the current tables",
                               self.rank, exc)
                self._events.put(_STOP)

    def _work(self) -> None:
        if isinstance(self.device, int) and torch.accelerator.is_available():
            torch.accelerator.set_device_index(self.device)  # the current device is per thread
        while True:
            event = self._events.get()
            if event is _STOP or self._stopping.is_set():
                return
            try:
                if isinstance(event, tuple):
                    _, layer, rnd, load = event
                    send(self.conn, {"type": "load", "round": rnd, "layer": layer, "load": load.tolist()})
                elif event["type"] == "plan":
                    self._apply_plan(event)
                elif event["type"] == "keep":
                    self.kept.append(event)
                elif event["type"] == "error":
                    logger.error("rank %d: EPLB scheduler reports: %s", self.rank, event["message"])
            except Exception as exc:  # a failed rank never stages, so no rank switches
                self.error = f"{type(exc).__name__}: {exc}"
                logger.exception("rank %d: EPLB transfer pool stops; serving on the current tables", self.rank)
                self._stopping.set()
                return

    def _apply_plan(self, msg: dict) -> None:
        layer = msg["layer"]
        d = self.dispatchers[layer]
        new = np.asarray(msg["table"], dtype=np.int64)
        new = validate_table(new[None], d.expert_num, name=f"scheduler's table for layer {layer}")[0]
        if new.shape[0] != d.ep_size:
            raise ValueError(
                f"scheduler's table for layer {layer} has {new.shape[0]} ranks; the EP group has {d.ep_size}"
            )
        while not d.wait_until_applied(timeout=0.5):  # the previous update must be swapped in first
            if self._stopping.is_set():
                return
        start = time.perf_counter()
        plan = plan_transfers(d.table, new)
        targets = d.staging_buffers(new.shape[1])
        execute_transfers(plan, self.rank, d.weights, targets, group=self.group)
        d.stage(new, targets)
        self.transfers.append({
            "layer": layer, "round": msg["round"], "remote_in": int((plan.remote[:, 1] == self.rank).sum()),
            "seconds": time.perf_counter() - start,
        })


def construct_expert_info_transfer_pool(
    module: torch.nn.Module,
    rank_in_group: int,
    device: Any,
    ip: str,
    port: int,
    auth_key: str | None = None,
    *,
    group: dist.ProcessGroup | None = None,
) -> TransferPool:
    """Connect this rank's MoE blocks to the scheduler and start the worker thread.

    Call it on every rank of the EP ``group`` (default: the world) at the same point: it
    creates the transfer process group (a collective) and waits until every rank has said
    hello to the scheduler. ``auth_key``: the scheduler's key, else ``EPLB_AUTH_KEY``.
    ``device``: this rank's device index (the worker thread makes it current), or None.
    """
    blocks = find_blocks(module)
    if not blocks:
        raise ValueError(
            "construct_expert_info_transfer_pool: the module has no MoE block with both "
            "`expert_load_collector` (ExpertLoadCollector) and `dispatcher` (DynamicDispatcher) set."
        )
    key = resolve_auth_key(auth_key)
    # Weights move on a group of their own: its collectives run on the worker thread,
    # concurrently with the forward pass's collectives on `group`.
    transfer_group = dist.new_group(ranks=group_ranks(group), backend=dist.get_backend(group))
    pool = TransferPool(blocks, rank_in_group, connect(ip, port, key), transfer_group, device)
    pool.start(pool.hello())
    return pool
