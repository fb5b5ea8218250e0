"""The EPLB scheduler: one process that plans for every rank of an EP group.

    python -m vllm_eplb_plugin.runtime.scheduler --world_size 4 --port 50001 --mode A2A \\
        --expert_num 16 --block_num 2 [--redundant 4] [--max_move 2] [--policy swift] [--auth_key K]

Ranks connect with :func:`~vllm_eplb_plugin.runtime.pool.construct_expert_info_transfer_pool`
(messages in :mod:`.protocol`). Once all ``world_size`` ranks said hello, each gets the
starting table ``[L, R, K]`` (``K = (expert_num + redundant) / world_size``). Then, per
layer, as soon as every rank reported a round's load ``[E]``, the policy runs once on the
summed load and every rank receives the same ``plan`` (or ``keep``), in the same order.
The policy runs here, off the ranks' forward path. A failing policy, an invalid table or a
rank that goes away never stops the scheduler: it logs why and the ranks keep serving on
their current tables.
"""

from __future__ import annotations

import argparse
import logging
import queue
import signal
import sys
import threading
import time
from dataclasses import dataclass
from multiprocessing import AuthenticationError
from multiprocessing.connection import Connection, Listener
from typing import Any

import numpy as np

from ..metrics import balancedness
from ..placement import changed_slots, expert_to_slot_load, logcnt, validate_table
from ..planner import check_plan, review_plan
from ..policy import PolicyConfig
from ..registry import create_policy, resolve_policy_name
from .protocol import ProtocolError, recv, resolve_auth_key, send

logger = logging.getLogger("vllm_eplb_plugin.runtime")

MODES = ("A2A", "AG", "EX")


@dataclass(frozen=True)
class SchedulerConfig:
    world_size: int
    """EP ranks that report to this scheduler."""
    port: int
    mode: str
    """A2A, AG or EX (EX: ``max_move`` bounds the slots a plan changes per layer)."""
    expert_num: int
    block_num: int
    """MoE layers (blocks) of the model."""
    auth_key: bytes
    host: str = "127.0.0.1"
    max_move: int | None = None
    redundant: int = 0
    """Redundant slots in all; ``(expert_num + redundant) % world_size == 0``."""
    policy: str | None = None
    """Policy name or ``module:Class``; None: the project's default."""

    def __post_init__(self) -> None:
        for name in ("world_size", "expert_num", "block_num"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name}={getattr(self, name)} must be >= 1.")
        if self.mode not in MODES:
            raise ValueError(f"--mode={self.mode!r} must be one of {', '.join(MODES)}.")
        if self.mode == "EX" and self.max_move is None:
            raise ValueError("--mode EX needs --max_move M (slots a plan may change per layer).")
        if self.mode != "EX" and self.max_move is not None:
            raise ValueError(f"--max_move applies to --mode EX only; drop it or use --mode EX (got --mode {self.mode}).")
        if self.max_move is not None and self.max_move < 0:
            raise ValueError(f"--max_move={self.max_move} must be >= 0.")
        if self.redundant < 0 or (self.expert_num + self.redundant) % self.world_size:
            fits = max(self.redundant, 0) + (-(self.expert_num + max(self.redundant, 0))) % self.world_size
            raise ValueError(
                f"--redundant={self.redundant}: {self.expert_num} experts + {self.redundant} redundant slots must "
                f"divide over --world_size={self.world_size} ranks; use e.g. --redundant {fits}."
            )
        if (self.expert_num + self.redundant) // self.world_size > self.expert_num:
            raise ValueError(f"--redundant={self.redundant} gives a rank more slots than there are experts.")

    @property
    def slots_per_rank(self) -> int:
        return (self.expert_num + self.redundant) // self.world_size


def expand_table(table: np.ndarray, slots_per_rank: int) -> np.ndarray:
    """Add slots to every rank: ``table [L, R, K0]`` -> ``[L, R, slots_per_rank]``.

    Each rank keeps its experts in its first ``K0`` slots; each extra slot gets an expert the
    rank does not hold yet, the one with the fewest copies so far (lowest id on ties), so
    the redundant copies start spread out. The policy moves them where the load is.
    """
    layers, ranks, k0 = table.shape
    out = np.empty((layers, ranks, slots_per_rank), dtype=np.int64)
    out[:, :, :k0] = table
    experts = int(table.max()) + 1
    for l in range(layers):
        copies = np.bincount(table[l].ravel(), minlength=experts)
        for r in range(ranks):
            for k in range(k0, slots_per_rank):
                held = out[l, r, :k]
                choice = min((e for e in range(experts) if e not in held), key=lambda e: (copies[e], e))
                out[l, r, k] = choice
                copies[choice] += 1
    return out


class Scheduler:
    """Accepts the ranks, plans per layer and round, sends every rank the same messages.

    All planning and sending happens on the thread that runs :meth:`serve_forever`;
    one reader thread per connection only queues what arrives.
    """

    def __init__(self, config: SchedulerConfig) -> None:
        self.config = config
        self.policy = create_policy(
            config.policy, PolicyConfig(max_move=config.max_move if config.mode == "EX" else None)
        )
        self.listener = Listener((config.host, config.port), authkey=config.auth_key)
        self.address = self.listener.address
        self.tables: np.ndarray | None = None  # [L, R, K] once every rank said hello
        self.plans = 0
        self._events: queue.Queue = queue.Queue()
        self._ranks: dict[int, Connection] = {}
        self._hellos: dict[int, np.ndarray] = {}  # rank -> [L, K0], until init
        self._pending: dict[tuple[int, int], dict[int, np.ndarray]] = {}  # (round, layer) -> rank -> [E]
        self._last_round: dict[tuple[int, int], int] = {}  # (rank, layer) -> last round reported
        self._stop = threading.Event()

    # -- threads --------------------------------------------------------------------------

    def serve_forever(self) -> None:
        threading.Thread(target=self._accept_loop, name="eplb-accept", daemon=True).start()
        cfg = self.config
        logger.info(
            "EPLB scheduler listening on %s:%d: mode %s, %d ranks, %d experts, %d layers, %d slots per rank, policy %s",
            *self.address, cfg.mode, cfg.world_size, cfg.expert_num, cfg.block_num, cfg.slots_per_rank,
            resolve_policy_name(cfg.policy),
        )
        while not self._stop.is_set():
            try:
                kind, conn, msg = self._events.get(timeout=0.2)
            except queue.Empty:
                continue
            if kind == "closed":
                self._closed(conn)
            else:
                self._handle(conn, msg)

    def stop(self) -> None:
        self._stop.set()
        self.listener.close()
        for conn in list(self._ranks.values()):
            conn.close()

    def _accept_loop(self) -> None:
        while not self._stop.is_set():
            try:
                conn = self.listener.accept()
            except AuthenticationError as exc:  # raised before any message is read or sent
                logger.warning("EPLB scheduler rejected a connection: wrong auth key (%s)", exc)
                continue
            except OSError:
                if self._stop.is_set():
                    return
                logger.exception("EPLB scheduler: accept failed")
                continue
            threading.Thread(target=self._read_loop, args=(conn,), name="eplb-reader", daemon=True).start()

    def _read_loop(self, conn: Connection) -> None:
        try:
            while True:
                self._events.put(("msg", conn, recv(conn)))
        except ProtocolError as exc:
            self._events.put(("msg", conn, {"type": "invalid", "message": str(exc)}))
        except (EOFError, OSError):
            pass
        self._events.put(("closed", conn, None))

    # -- messages (serve_forever's thread) ---------------------------------------------

    def _rank_of(self, conn: Connection) -> int | None:
        return next((r for r, c in self._ranks.items() if c is conn), None)

    def _send(self, rank: int, msg: dict[str, Any]) -> None:
        conn = self._ranks.get(rank)
        if conn is None:
            return
        try:
            send(conn, msg)
        except OSError:
            self._closed(conn)

    def _refuse(self, conn: Connection, message: str, *, close: bool) -> None:
        logger.warning("EPLB scheduler: %s", message)
        try:
            send(conn, {"type": "error", "message": message})
        except OSError:
            pass
        if close:
            conn.close()

    def _handle(self, conn: Connection, msg: dict[str, Any]) -> None:
        kind = msg["type"]
        if kind == "hello":
            self._hello(conn, msg)
        elif kind == "load":
            rank = self._rank_of(conn)
            if rank is None or self.tables is None:
                self._refuse(conn, "a load report before hello and init; say hello first", close=False)
            else:
                self._load(rank, msg)
        else:
            self._refuse(conn, msg.get("message") or f"unknown message type {kind!r}", close=kind == "invalid")

    def _hello(self, conn: Connection, msg: dict[str, Any]) -> None:
        cfg = self.config
        expected = {"world_size": cfg.world_size, "num_layers": cfg.block_num, "num_experts": cfg.expert_num}
        for field, want in expected.items():
            if msg.get(field) != want:
                return self._refuse(conn, f"hello: {field}={msg.get(field)!r}, but this scheduler serves {field}={want}", close=True)
        rank = msg.get("rank")
        if not isinstance(rank, int) or not 0 <= rank < cfg.world_size:
            return self._refuse(conn, f"hello: rank={rank!r} is not in [0, {cfg.world_size})", close=True)
        if rank in self._ranks:
            return self._refuse(conn, f"hello: rank {rank} is already connected", close=True)
        try:
            table = np.asarray(msg.get("table"), dtype=np.int64)
        except (TypeError, ValueError):
            table = np.empty(0)
        if table.ndim != 2 or table.shape[0] != cfg.block_num:
            return self._refuse(conn, f"hello: rank {rank}'s table must be [num_layers={cfg.block_num}][slots]; got shape {list(table.shape)}", close=True)
        if self.tables is not None:  # a rank coming back: it must still hold what the others think
            current = self.tables[:, rank, :]
            if table.shape != current.shape or np.any(table != current):
                return self._refuse(conn, f"hello: rank {rank} reconnects with a table that differs from its current one; restart all ranks", close=True)
            self._ranks[rank] = conn
            logger.info("EPLB scheduler: rank %d reconnected", rank)
            return self._send(rank, {"type": "init", "mode": cfg.mode, "table": self.tables.tolist()})
        self._ranks[rank] = conn
        self._hellos[rank] = table
        if len(self._hellos) == cfg.world_size:
            self._init()

    def _init(self) -> None:
        cfg = self.config
        shapes = {t.shape for t in self._hellos.values()}
        try:
            if len(shapes) > 1:
                raise ValueError(f"ranks hold different slot counts: {sorted(shapes)}")
            table = np.stack([self._hellos[r] for r in range(cfg.world_size)], axis=1)  # [L, R, K0]
            table = validate_table(table, cfg.expert_num, name="ranks' assembled table")
            if table.shape[2] > cfg.slots_per_rank:
                raise ValueError(f"ranks hold {table.shape[2]} slots each, more than (expert_num + redundant) / world_size = {cfg.slots_per_rank}")
            if table.shape[2] < cfg.slots_per_rank:
                table = expand_table(table, cfg.slots_per_rank)
        except ValueError as exc:
            for rank in list(self._ranks):
                self._refuse(self._ranks.pop(rank), f"hello: {exc}", close=True)
            self._hellos.clear()
            return
        self.tables = table
        self._hellos.clear()
        logger.info("EPLB scheduler: all %d ranks connected; starting table [L, R, K] = %s", cfg.world_size, list(table.shape))
        for rank in range(cfg.world_size):
            self._send(rank, {"type": "init", "mode": cfg.mode, "table": table.tolist()})

    def _load(self, rank: int, msg: dict[str, Any]) -> None:
        cfg = self.config
        rnd, layer = msg.get("round"), msg.get("layer")
        try:
            load = np.asarray(msg.get("load"), dtype=np.float64)
        except (TypeError, ValueError):
            load = np.empty(0)
        problem = None
        if not isinstance(layer, int) or not 0 <= layer < cfg.block_num:
            problem = f"layer={layer!r} is not in [0, {cfg.block_num})"
        elif not isinstance(rnd, int) or rnd <= self._last_round.get((rank, layer), -1):
            problem = f"round={rnd!r} for layer {layer} does not follow round {self._last_round.get((rank, layer), -1)}"
        elif load.shape != (cfg.expert_num,) or not np.all(np.isfinite(load)) or np.any(load < 0):
            problem = f"load must be {cfg.expert_num} finite non-negative numbers"
        if problem:
            return self._refuse(self._ranks[rank], f"load report from rank {rank}: {problem}; report ignored", close=False)
        self._last_round[(rank, layer)] = rnd
        reports = self._pending.setdefault((rnd, layer), {})
        reports[rank] = load
        if len(reports) == cfg.world_size:
            del self._pending[(rnd, layer)]
            self._plan(rnd, layer, np.sum(list(reports.values()), axis=0))

    def _closed(self, conn: Connection) -> None:
        rank = self._rank_of(conn)
        if rank is None:
            return
        del self._ranks[rank]
        self._hellos.pop(rank, None)
        # Rounds this rank has not reported can no longer complete: drop them all.
        dropped = len(self._pending)
        self._pending.clear()
        logger.warning("EPLB scheduler: rank %d disconnected; dropped %d pending rounds; the others keep their tables", rank, dropped)

    # -- planning -------------------------------------------------------------------------

    def _plan(self, rnd: int, layer: int, load: np.ndarray) -> None:
        """Plan ``layer`` on the ranks' summed ``load [E]`` and tell every rank."""
        assert self.tables is not None
        cfg = self.config
        old = self.tables[layer][None]  # [1, R, K]
        start = time.perf_counter()
        try:
            result = self.policy.rebalance_experts(old.copy(), expert_to_slot_load(old, load[None]))
            new = check_plan(old, result.new_table, cfg.expert_num)
            moved = int(changed_slots(old, new)[0])
            if cfg.max_move is not None and moved > cfg.max_move:
                raise ValueError(f"the plan changes {moved} slots, more than --max_move={cfg.max_move}")
        except Exception as exc:  # any policy failure keeps the table; the scheduler carries on
            reason = f"policy failed: {type(exc).__name__}: {exc}"
            logger.error("EPLB round %d layer %d: %s; ranks keep their table", rnd, layer, reason)
            return self._broadcast({"type": "keep", "round": rnd, "layer": layer, "reason": reason})
        ms = (time.perf_counter() - start) * 1e3
        before, after = float(balancedness(old, load[None])[0]), float(balancedness(new, load[None])[0])
        new, layers, note = review_plan(old, new, load[None])
        if not layers:
            reason = ("the policy keeps the table" if moved == 0 else note
                      or f"the plan is predicted no better ({after:.3f} vs {before:.3f})")
            return self._broadcast({"type": "keep", "round": rnd, "layer": layer, "reason": reason})
        self.tables[layer] = new[0]
        self.plans += 1
        logger.info(
            "EPLB plan %d (round %d, layer %d): balancedness %.3f -> %.3f (predicted), %d/%d slots changed, "
            "%d replicas at most, policy %.1f ms",
            self.plans, rnd, layer, before, after, moved, new.size, int(logcnt(new, cfg.expert_num).max()), ms,
        )
        self._broadcast({"type": "plan", "round": rnd, "layer": layer, "table": new[0].tolist()})

    def _broadcast(self, msg: dict[str, Any]) -> None:
        for rank in sorted(self._ranks):
            self._send(rank, msg)


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m vllm_eplb_plugin.runtime.scheduler", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--world_size", type=int, required=True, help="EP ranks")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--mode", required=True, choices=MODES)
    ap.add_argument("--expert_num", type=int, required=True, help="logical experts per MoE layer")
    ap.add_argument("--block_num", type=int, required=True, help="MoE layers")
    ap.add_argument("--max_move", type=int, default=None, help="EX mode: slots a plan may change per layer")
    ap.add_argument("--redundant", type=int, default=0, help="redundant slots in all (default 0)")
    ap.add_argument("--policy", default=None, help="policy name or module:Class (default: the project's default)")
    ap.add_argument("--auth_key", default=None, help="shared key; default: $EPLB_AUTH_KEY (required, no built-in key)")
    ap.add_argument("--log-level", default="INFO")
    return ap


def main(argv: list[str] | None = None) -> None:
    ap = _parser()
    args = ap.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stdout,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config = SchedulerConfig(
            world_size=args.world_size, host=args.host, port=args.port, mode=args.mode, expert_num=args.expert_num,
            block_num=args.block_num, max_move=args.max_move, redundant=args.redundant, policy=args.policy,
            auth_key=resolve_auth_key(args.auth_key),
        )
        scheduler = Scheduler(config)
    except (ValueError, LookupError, ImportError) as exc:  # AuthKeyMissing is a ValueError
        ap.error(str(exc))
    except OSError as exc:
        ap.error(f"cannot listen on --host {args.host} --port {args.port}: {exc}; choose a free port")
    signal.signal(signal.SIGTERM, lambda *_: scheduler.stop())
    try:
        scheduler.serve_forever()
    except KeyboardInterrupt:
        scheduler.stop()


if __name__ == "__main__":
    main()
