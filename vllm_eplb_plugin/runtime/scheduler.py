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

Hostile or broken clients cannot stop it either: each connection's auth handshake runs on
a thread of its own with a deadline (``handshake_timeout``), so a peer that never answers
or hangs up mid-handshake holds up no one; every field of every message is checked before
use (:mod:`.protocol`); each connection may have at most :data:`MAX_QUEUED` messages waiting
for the planning thread (then its reader stops reading and TCP pushes back on the sender)
and :data:`MAX_OUTBOX` messages waiting to be written (then it is disconnected: it does not
read); at most two authenticated connections per rank are open at once (more are told so
and closed); TCP keepalive (:data:`KEEPALIVE`) drops a connection whose host vanished;
refusals are logged at most once a second.
"""

from __future__ import annotations

import argparse
import logging
import os
import queue
import signal
import socket
import sys
import threading
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection, Listener, answer_challenge, deliver_challenge
from typing import Any

import numpy as np

from ..metrics import balancedness
from ..placement import changed_slots, logcnt, validate_table
from ..planner import check_plan, review_plan
from ..policy import PolicyConfig
from ..registry import create_policy, resolve_policy_name
from .protocol import (
    MessageTooLarge,
    ProtocolError,
    encode,
    int_field,
    load_field,
    recv,
    resolve_auth_key,
    show,
    table_field,
)

logger = logging.getLogger("vllm_eplb_plugin.runtime")

MODES = ("A2A", "AG", "EX")

LISTEN_BACKLOG = 128
"""Connections the kernel holds until they are accepted (multiprocessing's default is 1:
ranks starting together were dropped and retried for minutes)."""
MAX_HANDSHAKES = 64
"""Handshakes in progress at once; more connections wait in the backlog."""
KEEPALIVE = (30, 10, 3)
"""TCP keepalive on every connection: first probe after 30 s idle, then every 10 s, drop
after 3 unanswered. A rank whose host vanished (no FIN, no RST) frees its rank and threads
within about a minute instead of never."""
MAX_QUEUED = 16
"""Messages of one connection waiting for the planning thread; its reader then waits."""
MAX_OUTBOX = 1024
"""Messages to one connection not yet written (on top of the kernel's socket buffers)."""
MAX_PENDING_ROUNDS = 16
"""Incomplete rounds kept per layer; older ones are dropped (ranks run in step, so a round
this far behind will never complete)."""
LOG_INTERVAL_S = 1.0


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
    handshake_timeout: float = 5.0
    """Seconds a new connection has to pass the auth handshake before it is dropped."""

    def __post_init__(self) -> None:
        for name in ("world_size", "expert_num", "block_num"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name}={getattr(self, name)} must be >= 1.")
        if self.mode not in MODES:
            raise ValueError(f"--mode={self.mode!r} must be one of {', '.join(MODES)}.")
        if self.mode == "EX" and self.max_move is None:
            raise ValueError("--mode EX needs --max_move M (slots a plan may change per layer).")
        if self.mode != "EX" and self.max_move is not None:
            raise ValueError(
                f"--max_move applies to --mode EX only; drop it or use --mode EX (got --mode {self.mode})."
            )
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


class _RateLimitedLog:
    """Warnings at most once per ``interval`` seconds per ``key`` (a kind of problem, so a
    flood of one kind hides no other); the next one says how many were left out. A flood of
    bad messages or connections must not flood the log (312 MB in 25 s, before)."""

    def __init__(self, interval: float = LOG_INTERVAL_S) -> None:
        self.interval = interval
        self._lock = threading.Lock()
        self._state: dict[str, tuple[float, int]] = {}  # key -> (next time to log, left out since)

    def warning(self, key: str, fmt: str, *args: Any, exc_info: bool = False) -> None:
        with self._lock:
            now = time.monotonic()
            due, left_out = self._state.get(key, (0.0, 0))
            if now < due:
                self._state[key] = (due, left_out + 1)
                return
            self._state[key] = (now + self.interval, 0)
        if left_out:
            fmt, args = fmt + " (and %d more like it not logged)", (*args, left_out)
        logger.warning(fmt, *args, exc_info=exc_info)


def _keep_alive(conn: Connection) -> None:
    """Turn on TCP keepalive (:data:`KEEPALIVE`) for ``conn``'s socket."""
    idle, interval, count = KEEPALIVE
    try:
        with socket.socket(fileno=os.dup(conn.fileno())) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
            for name, value in (("TCP_KEEPIDLE", idle), ("TCP_KEEPINTVL", interval), ("TCP_KEEPCNT", count)):
                if hasattr(socket, name):  # Linux; elsewhere the system's timings apply
                    sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, name), value)
    except OSError:  # the peer is gone already: its handshake fails next
        pass


class _Peer:
    """One connection: its socket, the reader's credit (at most :data:`MAX_QUEUED` messages
    queued for the planning thread) and the writer's outbox (at most :data:`MAX_OUTBOX`).

    The reader and the writer thread both use the socket, so the last of them to stop closes
    it; anyone else only shuts it down, which wakes both (a plain close wakes neither, and a
    closed descriptor's number may be reused by the next connection).
    """

    def __init__(self, conn: Connection, address: Any) -> None:
        self.conn = conn
        self.name = "%s:%s" % tuple(address) if isinstance(address, tuple) else str(address)
        self.credit = threading.Semaphore(MAX_QUEUED)
        self.outbox: queue.Queue[bytes | None] = queue.Queue(MAX_OUTBOX)
        self.authenticated = False
        self.expired = False
        self._lock = threading.Lock()
        self._users = 1  # the connection's thread; the writer adds one

    def send(self, msg: dict[str, Any]) -> bool:
        """Queue ``msg`` for the writer; False when the outbox is full (the peer does not read)."""
        try:
            self.outbox.put_nowait(encode(msg))
            return True
        except queue.Full:
            return False

    def finish(self) -> None:
        """Let the writer send what is queued, then shut the socket down."""
        try:
            self.outbox.put_nowait(None)
        except queue.Full:
            self.shutdown()

    def shutdown(self) -> None:
        with self._lock:
            if self.conn.closed:
                return
            try:
                with socket.socket(fileno=os.dup(self.conn.fileno())) as sock:
                    sock.shutdown(socket.SHUT_RDWR)
            except OSError:  # already shut down, or reset by the peer
                pass

    def expire(self) -> None:
        """The handshake deadline: drop the peer unless it has authenticated by now."""
        with self._lock:
            if self.authenticated:
                return
            self.expired = True
        self.shutdown()

    def authenticate(self) -> bool:
        """Mark the handshake done; False if the deadline came first."""
        with self._lock:
            self.authenticated = not self.expired
            if self.authenticated:
                self._users += 1
            return self.authenticated

    def release(self) -> None:
        """A thread stops using the socket; the last one closes it."""
        with self._lock:
            self._users -= 1
            if self._users == 0:
                self.conn.close()


class Scheduler:
    """Accepts the ranks, plans per layer and round, sends every rank the same messages.

    All planning happens on the thread that runs :meth:`serve_forever`; per connection, one
    thread runs the handshake and then reads, checks and queues what arrives, and one writes
    what the planning thread queued for it, so no peer can make the planning thread wait.
    """

    def __init__(self, config: SchedulerConfig) -> None:
        self.config = config
        self.policy = create_policy(
            config.policy, PolicyConfig(max_move=config.max_move if config.mode == "EX" else None)
        )
        # No authkey here: Listener.accept() would run the handshake on the accept thread,
        # where one silent peer blocks everyone. _connection runs it, with a deadline.
        self.listener = Listener((config.host, config.port), backlog=LISTEN_BACKLOG)
        self.address = self.listener.address
        self.tables: np.ndarray | None = None  # [L, R, K] once every rank said hello
        self.plans = 0
        self._events: queue.Queue = queue.Queue()  # (peer, kind, payload); at most MAX_QUEUED per peer
        self._peers: set[_Peer] = set()
        self._peers_lock = threading.Lock()
        self._handshakes = threading.BoundedSemaphore(MAX_HANDSHAKES)
        self.max_peers = 2 * config.world_size  # each rank, and its reconnect while the old connection drains
        self._ranks: dict[int, _Peer] = {}
        self._hellos: dict[int, np.ndarray] = {}  # rank -> [L, K0], until init
        self._pending: dict[tuple[int, int], dict[int, np.ndarray]] = {}  # (round, layer) -> rank -> [E]
        self._last_round: dict[tuple[int, int], int] = {}  # (rank, layer) -> last round reported
        self._log = _RateLimitedLog()
        self._parsers = {"hello": self._parse_hello, "load": self._parse_load}
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
                peer, kind, payload = self._events.get(timeout=0.2)
            except queue.Empty:
                continue
            try:
                if kind == "closed":
                    self._closed(peer)
                else:
                    self._handle(peer, kind, payload)
            except Exception:  # noqa: BLE001 - a bug met by one message must not stop the scheduler
                self._log.warning("bug", "EPLB scheduler: handling a %s message from %s failed; message dropped",
                                  kind, peer.name, exc_info=True)
            finally:
                if kind != "closed":
                    peer.credit.release()

    def stop(self) -> None:
        self._stop.set()
        try:  # closing a listening socket does not wake a thread blocked in accept(); a connection does
            socket.create_connection(self.address[:2], timeout=1).close()
        except OSError:
            pass
        self.listener.close()
        with self._peers_lock:
            peers = list(self._peers)
        for peer in peers:
            peer.shutdown()

    def _accept_loop(self) -> None:
        while not self._stop.is_set():
            if not self._handshakes.acquire(timeout=0.2):  # MAX_HANDSHAKES in progress
                continue
            try:
                conn = self.listener.accept()
            except OSError as exc:  # e.g. out of file descriptors: wait, then carry on
                self._handshakes.release()
                if self._stop.is_set():
                    return
                self._log.warning("accept", "EPLB scheduler: accept failed (%s); still accepting", exc)
                time.sleep(0.1)
                continue
            if self._stop.is_set():
                conn.close()
                return
            _keep_alive(conn)
            peer = _Peer(conn, self.listener.last_accepted)
            threading.Thread(target=self._connection, args=(peer,), name="eplb-conn", daemon=True).start()

    def _connection(self, peer: _Peer) -> None:
        """Thread of one connection: the handshake, then the writer thread and reading."""
        try:
            authenticated = self._handshake(peer)
        finally:
            self._handshakes.release()
        if not authenticated:
            return peer.release()
        with self._peers_lock:
            full = len(self._peers) >= self.max_peers
            if not full:
                self._peers.add(peer)
        threading.Thread(target=self._write_loop, args=(peer,), name="eplb-writer", daemon=True).start()
        if not full:
            return self._read_loop(peer)
        # Each connection holds two threads: a key holder reconnecting in a loop must not pile them up.
        message = (f"{self.max_peers} connections are open already (2 per rank of world_size="
                   f"{self.config.world_size}); close unused ones")
        self._log.warning("too many peers", "EPLB scheduler: refused %s: %s", peer.name, message)
        peer.send({"type": "error", "message": message})
        peer.finish()  # the writer sends it, then shuts the socket down
        peer.release()

    def _handshake(self, peer: _Peer) -> bool:
        """multiprocessing's HMAC challenge both ways, within ``handshake_timeout`` seconds."""
        timer = threading.Timer(self.config.handshake_timeout, peer.expire)
        timer.daemon = True
        timer.start()
        try:
            deliver_challenge(peer.conn, self.config.auth_key)
            answer_challenge(peer.conn, self.config.auth_key)
            if peer.authenticate():
                return True
            raise TimeoutError
        except Exception as exc:  # noqa: BLE001 - EOFError, AuthenticationError, OSError, AssertionError: any of them
            reason = (f"no handshake within {self.config.handshake_timeout:g} s" if peer.expired
                      else f"{type(exc).__name__}: {exc}")
            self._log.warning("handshake timeout" if peer.expired else f"handshake {type(exc).__name__}",
                              "EPLB scheduler: rejected the connection from %s (%s); still accepting",
                              peer.name, reason)
            return False
        finally:
            timer.cancel()

    def _read_loop(self, peer: _Peer) -> None:
        """Check and queue what ``peer`` sends until it closes, then always report it closed
        (else its rank stays taken for good)."""
        try:
            while not self._stop.is_set():
                # Back-pressure: at most MAX_QUEUED messages of this peer wait; then this
                # thread stops reading and the kernel's buffers make the sender wait.
                if not peer.credit.acquire(timeout=0.2):
                    continue
                try:
                    self._events.put((peer, *self._parse(recv(peer.conn))))
                except MessageTooLarge as exc:  # the stream is out of step: nothing more to read
                    self._log.warning("too large", "EPLB scheduler: %s: %s", peer.name, exc)
                    return
                except ProtocolError as exc:  # not JSON, too deep, not an object: refused, the next may be fine
                    self._events.put((peer, "invalid", ("", str(exc))))
        except (EOFError, OSError):
            pass
        except Exception:  # noqa: BLE001 - never leave the rank taken, whatever went wrong
            self._log.warning("bug", "EPLB scheduler: reading from %s failed; connection closed", peer.name,
                              exc_info=True)
        finally:
            peer.shutdown()
            peer.finish()  # stops the writer
            self._events.put((peer, "closed", None))
            with self._peers_lock:
                self._peers.discard(peer)
            peer.release()

    def _write_loop(self, peer: _Peer) -> None:
        """Send what the planning thread queued for ``peer``; stop at None or an error."""
        try:
            while (data := peer.outbox.get()) is not None:
                peer.conn.send_bytes(data)
        except OSError:
            pass
        finally:
            peer.shutdown()  # wakes the reader, if it still reads
            peer.release()

    # -- checking messages (reader threads) -----------------------------------------------

    def _parse(self, msg: dict[str, Any]) -> tuple[str, Any]:
        """``(type, fields)`` of a message whose every field fits this scheduler, else
        ``("invalid", (type, what is wrong))``."""
        kind = msg["type"]
        parser = self._parsers.get(kind)
        if parser is None:  # what is queued is short: never the peer's (up to 4 MiB) type string
            return "invalid", ("", f"unknown message type {show(kind)}")
        try:
            return kind, parser(msg)
        except ProtocolError as exc:
            return "invalid", (kind, str(exc))

    def _parse_hello(self, msg: dict[str, Any]) -> dict[str, Any]:
        cfg = self.config
        expected = {"world_size": cfg.world_size, "num_layers": cfg.block_num, "num_experts": cfg.expert_num}
        for field, want in expected.items():
            if int_field(msg, field) != want:
                raise ProtocolError(f"{field}={show(msg[field])}, but this scheduler serves {field}={want}")
        rank = int_field(msg, "rank", 0, cfg.world_size)
        return {"rank": rank, "table": table_field(msg, "table", cfg.block_num, cfg.slots_per_rank, cfg.expert_num)}

    def _parse_load(self, msg: dict[str, Any]) -> dict[str, Any]:
        cfg = self.config
        return {"round": int_field(msg, "round", 0, 2**63), "layer": int_field(msg, "layer", 0, cfg.block_num),
                "load": load_field(msg, "load", cfg.expert_num)}

    # -- messages (serve_forever's thread) ---------------------------------------------

    def _rank_of(self, peer: _Peer) -> int | None:
        return next((r for r, p in self._ranks.items() if p is peer), None)

    def _send(self, peer: _Peer, msg: dict[str, Any]) -> None:
        if not peer.send(msg):
            rank = self._rank_of(peer)
            self._log.warning("not reading", "EPLB scheduler: %s does not read its messages (%d unsent); disconnected",
                                   peer.name if rank is None else f"rank {rank} ({peer.name})", MAX_OUTBOX)
            peer.shutdown()

    def _refuse(self, peer: _Peer, message: str, *, close: bool, about: str) -> None:
        """Tell ``peer`` what is wrong with its ``about`` message (hello, load, other), and
        log it (at most once a second per kind)."""
        self._log.warning(f"refused {about}", "EPLB scheduler: %s", message)
        self._send(peer, {"type": "error", "message": message})
        if close:
            peer.finish()

    def _handle(self, peer: _Peer, kind: str, payload: Any) -> None:
        if kind == "hello":
            self._hello(peer, payload["rank"], payload["table"])
        elif kind == "load":
            rank = self._rank_of(peer)
            if rank is None or self.tables is None:
                self._refuse(peer, "a load report before hello and init; say hello first", close=False, about="load")
            else:
                self._load(rank, payload)
        elif payload[0] == "hello":  # a hello that does not fit: this peer cannot take part
            self._refuse(peer, f"hello: {payload[1]}", close=True, about="hello")
        elif payload[0] == "load":
            rank = self._rank_of(peer)
            self._refuse(peer, f"load report{'' if rank is None else f' from rank {rank}'}: {payload[1]}; "
                         "report ignored", close=False, about="load")
        else:
            self._refuse(peer, payload[1], close=False, about="other")

    def _hello(self, peer: _Peer, rank: int, table: np.ndarray) -> None:
        cfg = self.config
        if rank in self._ranks:
            return self._refuse(peer, f"hello: rank {rank} is already connected", close=True, about="hello")
        if self.tables is not None:  # a rank coming back: it must still hold what the others think
            current = self.tables[:, rank, :]
            if table.shape != current.shape or np.any(table != current):
                return self._refuse(
                    peer,
                    f"hello: rank {rank} reconnects with a table that differs from its current one; restart all ranks",
                    close=True,
                    about="hello",
                )
            self._ranks[rank] = peer
            logger.info("EPLB scheduler: rank %d reconnected", rank)
            return self._send(peer, {"type": "init", "mode": cfg.mode, "table": self.tables.tolist()})
        self._ranks[rank] = peer
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
            if table.shape[2] < cfg.slots_per_rank:
                table = expand_table(table, cfg.slots_per_rank)
        except ValueError as exc:
            for rank in list(self._ranks):
                self._refuse(self._ranks.pop(rank), f"hello: {exc}", close=True, about="hello")
            self._hellos.clear()
            return
        self.tables = table
        self._hellos.clear()
        logger.info("EPLB scheduler: all %d ranks connected; starting table [L, R, K] = %s", cfg.world_size,
                    list(table.shape))
        self._broadcast({"type": "init", "mode": cfg.mode, "table": table.tolist()})

    def _load(self, rank: int, report: dict[str, Any]) -> None:
        cfg = self.config
        rnd, layer = report["round"], report["layer"]
        last = self._last_round.get((rank, layer), -1)
        if rnd <= last:
            return self._refuse(self._ranks[rank], f"load report from rank {rank}: round={rnd} for layer {layer} "
                                f"does not follow round {last}; report ignored", close=False, about="load")
        self._last_round[(rank, layer)] = rnd
        reports = self._pending.setdefault((rnd, layer), {})
        reports[rank] = report["load"]
        if len(reports) == cfg.world_size:
            del self._pending[(rnd, layer)]
            self._plan(rnd, layer, np.sum(list(reports.values()), axis=0))
        else:
            self._drop_stale_rounds(layer)

    def _drop_stale_rounds(self, layer: int) -> None:
        """Keep at most MAX_PENDING_ROUNDS incomplete rounds of ``layer`` (a rank far ahead
        of the others, or a report that was refused, must not hold memory for good)."""
        waiting = sorted(rnd for rnd, l in self._pending if l == layer)
        for rnd in waiting[:-MAX_PENDING_ROUNDS]:
            reported = sorted(self._pending.pop((rnd, layer)))
            self._log.warning("stale round", "EPLB round %d layer %d: dropped unplanned, only ranks %s reported it "
                                   "(at most %d rounds wait per layer)", rnd, layer, reported, MAX_PENDING_ROUNDS)

    def _closed(self, peer: _Peer) -> None:
        rank = self._rank_of(peer)
        if rank is None:
            return
        del self._ranks[rank]
        self._hellos.pop(rank, None)
        # Rounds this rank has not reported can no longer complete: drop them all.
        dropped = len(self._pending)
        self._pending.clear()
        logger.warning("EPLB scheduler: rank %d disconnected; dropped %d pending rounds; the others keep their tables",
                       rank, dropped)

    # -- planning -------------------------------------------------------------------------

    def _plan(self, rnd: int, layer: int, load: np.ndarray) -> None:
        """Plan ``layer`` on the ranks' summed ``load [E]`` and tell every rank."""
        assert self.tables is not None
        cfg = self.config
        old = self.tables[layer][None]  # [1, R, K]
        start = time.perf_counter()
        try:
            result = self.policy.plan(old.copy(), load[None])
            new = check_plan(old, result.new_table, cfg.expert_num)
            moved = int(changed_slots(old, new)[0])
            if cfg.max_move is not None and moved > cfg.max_move:
                raise ValueError(f"the plan changes {moved} slots, more than --max_move={cfg.max_move}")
        except Exception as exc:  # noqa: BLE001 - any policy failure keeps the table; the scheduler carries on
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
            self._send(self._ranks[rank], msg)


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
