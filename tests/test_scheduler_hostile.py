"""The scheduler against hostile or broken clients (issue 15), one test per defect class:
handshakes that never finish, many ranks at once, fields of the wrong type or range,
oversized or deeply nested messages, and floods. Real sockets on 127.0.0.1; every wait is
bounded, so a regression fails in seconds instead of hanging."""

from __future__ import annotations

import json
import logging
import os
import socket
import struct
import subprocess
import sys
import threading
import time
from multiprocessing.connection import Connection, answer_challenge, deliver_challenge
from typing import Any, Callable

import pytest

from tests.helpers.gloo import free_port
from vllm_eplb_plugin.runtime import scheduler as scheduler_module
from vllm_eplb_plugin.runtime.protocol import MAX_MESSAGE_BYTES, connect, encode, recv, send
from vllm_eplb_plugin.runtime.scheduler import MAX_PENDING_ROUNDS, MAX_QUEUED, Scheduler, SchedulerConfig

KEY = b"hostile-test-key"
E, L = 8, 2


@pytest.fixture
def start():
    """``start(world_size, **config)`` -> a scheduler serving in a background thread."""
    started: list[tuple[Scheduler, threading.Thread]] = []

    def _start(world: int = 1, **overrides: Any) -> Scheduler:
        config = SchedulerConfig(**{"world_size": world, "port": free_port(), "mode": "A2A", "expert_num": E,
                                    "block_num": L, "auth_key": KEY, **overrides})
        sched = Scheduler(config)
        thread = threading.Thread(target=sched.serve_forever, daemon=True)
        thread.start()
        started.append((sched, thread))
        return sched

    yield _start
    for sched, thread in started:
        sched.stop()
        thread.join(5)


def _within(seconds: float, fn: Callable[[], Any]) -> Any:
    """``fn()``, failing the test if it takes longer than ``seconds`` (it may block forever)."""
    out: dict[str, Any] = {}

    def run() -> None:
        try:
            out["value"] = fn()
        except BaseException as exc:  # noqa: BLE001 - handed to the test below
            out["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"no answer within {seconds} s"
    if "error" in out:
        raise out["error"]
    return out["value"]


def _eventually(predicate: Callable[[], Any], seconds: float = 3.0) -> Any:
    """Poll ``predicate`` until it is true; fail after ``seconds``."""
    deadline = time.monotonic() + seconds
    while not (value := predicate()):
        assert time.monotonic() < deadline, f"not true within {seconds} s"
        time.sleep(0.05)
    return value


def _hello_msg(r: int, world: int, experts: int = E, layers: int = L, **fields: Any) -> dict[str, Any]:
    per = experts // world
    return {"type": "hello", "rank": r, "world_size": world, "num_layers": layers, "num_experts": experts,
            "table": [list(range(r * per, (r + 1) * per))] * layers, **fields}


def _rank(sched: Scheduler, rank: int = 0, world: int = 1):
    """A connected rank that said hello; returns it with the scheduler's answer."""
    conn = _within(3, lambda: connect("127.0.0.1", sched.config.port, KEY))
    send(conn, _hello_msg(rank, world, sched.config.expert_num, sched.config.block_num))
    return conn, (_within(3, lambda: recv(conn)) if world == 1 else None)


def _answered(conn, msg: dict[str, Any]) -> dict[str, Any]:
    send(conn, msg)
    return _within(3, lambda: recv(conn))


def _load(rnd: int, layer: int = 0, **fields: Any) -> dict[str, Any]:
    return {"type": "load", "round": rnd, "layer": layer, "load": [400.0, 200, 50, 50, 20, 20, 10, 10], **fields}


def _warnings(caplog, text: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if text in r.getMessage()]


# -- 1: handshakes ------------------------------------------------------------------------

def test_peers_that_break_the_handshake_do_not_stop_anyone_else(start, caplog):
    caplog.set_level(logging.WARNING, "vllm_eplb_plugin.runtime")
    sched = start()
    port = sched.config.port
    hang_up = socket.create_connection(("127.0.0.1", port))
    hang_up.recv(100)  # the challenge; then gone (EOFError on the scheduler's side)
    hang_up.close()
    garbage = socket.create_connection(("127.0.0.1", port))
    garbage.recv(100)
    garbage.sendall(struct.pack("!i", 16) + b"x" * 16)  # a wrong digest
    silent = [socket.create_connection(("127.0.0.1", port)) for _ in range(3)]  # stay open, never answer
    start_time = time.monotonic()
    conn, init = _rank(sched)
    assert init["type"] == "init" and time.monotonic() - start_time < 2
    rejected = _eventually(lambda: len(_warnings(caplog, "rejected")) >= 2 and _warnings(caplog, "rejected"))
    assert rejected[0].startswith("EPLB scheduler: rejected the connection from 127.0.0.1:")
    assert any(m.endswith("(EOFError: ); still accepting") for m in rejected), rejected
    assert any(
        m.endswith("(AuthenticationError: digest received was wrong); still accepting") for m in rejected
    ), rejected
    for s in silent + [garbage]:
        s.close()


def test_a_silent_peer_is_dropped_at_the_handshake_deadline(start, caplog):
    caplog.set_level(logging.WARNING, "vllm_eplb_plugin.runtime")
    sched = start(handshake_timeout=0.5)
    silent = socket.create_connection(("127.0.0.1", sched.config.port))
    silent.settimeout(3)
    assert b"#CHALLENGE#" in silent.recv(100)
    start_time = time.monotonic()
    assert silent.recv(100) == b""  # closed by the scheduler
    assert 0.2 < time.monotonic() - start_time < 2
    assert _eventually(lambda: _warnings(caplog, "(no handshake within 0.5 s); still accepting"))


def test_more_silent_peers_than_handshake_slots_only_delay_a_rank_until_the_deadline(start):
    sched = start(handshake_timeout=0.5)
    silent = [
        socket.create_connection(("127.0.0.1", sched.config.port))
        for _ in range(scheduler_module.MAX_HANDSHAKES + 6)
    ]
    start_time = time.monotonic()
    conn, init = _rank(sched)
    assert init["type"] == "init" and time.monotonic() - start_time < 2.5
    for s in silent:
        s.close()


# -- 2: many ranks at once -----------------------------------------------------------------

def test_sixteen_ranks_connecting_at_once_all_get_init(start):
    world = 16
    sched = start(world, expert_num=16)
    inits: list[Any] = [None] * world

    def rank(r: int) -> None:
        conn = connect("127.0.0.1", sched.config.port, KEY)
        send(conn, _hello_msg(r, world, 16))
        inits[r] = recv(conn)

    threads = [threading.Thread(target=rank, args=(r,), daemon=True) for r in range(world)]
    start_time = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join(max(0.0, 10 - (time.monotonic() - start_time)))
    assert [m and m["type"] for m in inits] == ["init"] * world
    assert time.monotonic() - start_time < 10


# -- 3: fields of the wrong type or range -------------------------------------------------

BAD_LOADS = [
    ({"load": [10**400] + [1] * (E - 1)},
     "load[0]=100000000000000000000000000000... (401 characters) is not a finite number in [0, 2**53]"),
    ({"load": ["5"] * E}, "load[0]='5' is not a finite number in [0, 2**53]"),
    ({"load": [1, True] + [1] * (E - 2)}, "load[1]=True is not a finite number in [0, 2**53]"),
    ({"load": [1, 2, float("nan")] + [1] * (E - 3)}, "load[2]=nan is not a finite number in [0, 2**53]"),
    ({"load": [float("inf")] * E}, "load[0]=inf is not a finite number in [0, 2**53]"),
    ({"load": [1] * (E - 1) + [-1]}, "load[7]=-1 is not a finite number in [0, 2**53]"),
    ({"load": [1] * (E + 1)}, "load must be a list of 8 numbers; got a JSON list of 9"),
    ({"load": {"0": 1}}, "load must be a list of 8 numbers; got a JSON object of 1"),
    ({"layer": True}, "layer=True is not an integer"),
    ({"layer": 1.0}, "layer=1.0 is not an integer"),
    ({"layer": "0"}, "layer='0' is not an integer"),
    ({"layer": 2}, "layer=2 is not in [0, 2)"),
    ({"round": -1}, "round=-1 is not in [0, 9223372036854775808)"),
    ({"round": 2**64}, "round=18446744073709551616 is not in [0, 9223372036854775808)"),
    ({"round": None}, "round=None is not an integer"),
]


def test_every_bad_field_of_a_load_is_refused_by_name_and_the_rank_carries_on(start):
    sched = start()
    conn, _ = _rank(sched)
    for fields, problem in BAD_LOADS:
        reply = _answered(conn, _load(0, **fields))
        assert reply == {"type": "error", "message": f"load report from rank 0: {problem}; report ignored"}, fields
    assert _answered(conn, _load(0))["type"] in ("plan", "keep")  # none of them counted as round 0
    assert _answered(conn, _load(0)) == {
        "type": "error",
        "message": "load report from rank 0: round=0 for layer 0 does not follow round 0; report ignored"}
    unranked = _within(3, lambda: connect("127.0.0.1", sched.config.port, KEY))
    assert (_answered(unranked, _load(0, layer=True))["message"]
            == "load report: layer=True is not an integer; report ignored")
    assert _answered(unranked, _load(0))["message"] == "a load report before hello and init; say hello first"
    assert (_answered(unranked, {"type": "x" * 100})["message"]
            == "unknown message type 'xxxxxxxxxxxxxxxxxxxxxxxxxxxxx... (102 characters)")


BAD_HELLOS = [
    ({"world_size": 2.0}, "world_size=2.0 is not an integer"),
    ({"world_size": True}, "world_size=True is not an integer"),
    ({"num_experts": None}, "num_experts=None is not an integer"),
    ({"num_layers": 3}, "num_layers=3, but this scheduler serves num_layers=2"),
    ({"rank": True}, "rank=True is not an integer"),
    ({"rank": 10**400}, "rank=100000000000000000000000000000... (401 characters) is not in [0, 2)"),
    ({"table": [[0, 1]]}, "table must be 2 lists of the same length, 1 to 4 expert ids each"),
    ({"table": [[0, 1], [0]]}, "table must be 2 lists of the same length, 1 to 4 expert ids each"),
    ({"table": [[0, 1, 2, 3, 4]] * L}, "table must be 2 lists of the same length, 1 to 4 expert ids each"),
    ({"table": [[0, "1"]] * L}, "table[0][1]='1' is not an expert id in [0, 8)"),
    ({"table": [[0, 1], [0, 10**400]]},
     "table[1][1]=100000000000000000000000000000... (401 characters) is not an expert id in [0, 8)"),
    ({"table": [[0, 1.0]] * L}, "table[0][1]=1.0 is not an expert id in [0, 8)"),
]


def test_every_bad_field_of_a_hello_is_refused_by_name(start):
    sched = start(2)
    for fields, problem in BAD_HELLOS:
        conn = _within(3, lambda: connect("127.0.0.1", sched.config.port, KEY))
        reply = _answered(conn, _hello_msg(0, 2, **fields))
        assert reply == {"type": "error", "message": f"hello: {problem}"}, fields
        with pytest.raises(EOFError):  # a hello that does not fit ends the connection
            _within(3, lambda conn=conn: recv(conn))
    conns = [_rank(sched, r, 2)[0] for r in range(2)]  # none of them took a rank
    assert [_within(3, lambda c=c: recv(c))["type"] for c in conns] == ["init", "init"]


# -- 4: oversized and nested messages; a rank is always freed --------------------------------

def test_nested_and_non_json_messages_are_refused_and_the_connection_stays(start):
    sched = start()
    conn, _ = _rank(sched)
    for raw, message in [
        (b"[" * 100_000 + b"]" * 100_000, "EPLB message is nested too deeply to be a message"),
        (b"{not json", "EPLB message is not JSON: b'{not json'"),
        (b"1" * 5000, "EPLB message is not JSON: b'" + "1" * 80 + "'"),  # over Python's 4300-digit limit
        (b"[1]", "EPLB message must be a JSON object with a string 'type'; got b'[1]'"),
    ]:
        conn.send_bytes(raw)
        assert _within(3, lambda: recv(conn)) == {"type": "error", "message": message}
    assert _answered(conn, _load(0))["type"] in ("plan", "keep")


def test_a_length_header_over_the_limit_closes_only_that_connection_and_frees_its_rank(start, caplog):
    caplog.set_level(logging.WARNING, "vllm_eplb_plugin.runtime")
    sched = start()
    conn, init = _rank(sched)
    os.write(conn.fileno(), struct.pack("!i", -1) + struct.pack("!Q", 50 * 2**30))  # "50 GiB follow"
    with pytest.raises(EOFError):
        _within(3, lambda: recv(conn))
    assert _warnings(caplog, f"EPLB message over the {MAX_MESSAGE_BYTES}-byte limit; connection closed")
    again, reinit = _within(5, lambda: _rank(sched))  # the rank is free again
    assert reinit == init


def test_a_reader_that_fails_unexpectedly_still_frees_its_rank(start, caplog, monkeypatch):
    caplog.set_level(logging.WARNING, "vllm_eplb_plugin.runtime")
    sched = start()
    parse = sched._parse
    monkeypatch.setattr(sched, "_parse", lambda msg: 1 / 0 if msg["type"] == "load" else parse(msg))  # a bug
    conn, init = _rank(sched)
    send(conn, _load(0))
    with pytest.raises(EOFError):
        _within(3, lambda: recv(conn))
    assert _warnings(caplog, "EPLB scheduler: reading from 127.0.0.1:")[0].endswith("failed; connection closed")
    monkeypatch.undo()
    assert _within(5, lambda: _rank(sched))[1] == init


def test_the_largest_legitimate_messages_fit_the_limit(start):
    # DeepSeek-V3-sized: 61 MoE layers x 256 experts over 2 ranks (the init table is the
    # largest message; protocol.MAX_MESSAGE_BYTES documents bigger models).
    sched = start(2, expert_num=256, block_num=61)
    conns = [_rank(sched, r, 2)[0] for r in range(2)]
    inits = [_within(5, lambda c=c: recv(c)) for c in conns]
    assert inits[0]["type"] == "init" and len(encode(inits[0])) * 40 < MAX_MESSAGE_BYTES


# -- 5: floods ------------------------------------------------------------------------------

_FLOODER = """
import socket, sys, threading, time
from multiprocessing.connection import Client, Connection, answer_challenge, deliver_challenge
port, key, seconds = int(sys.argv[1]), sys.argv[2].encode(), float(sys.argv[3])
def small_window_client():  # Client() with a 4 KiB receive buffer: fills after fewer replies
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", port))
    conn = Connection(sock.detach())
    answer_challenge(conn, key)
    deliver_challenge(conn, key)
    return conn
bad = b'{"type": "load", "round": 0, "layer": 0, "load": [1]}'
def flood(conn, sent):
    end = time.monotonic() + seconds
    try:
        while time.monotonic() < end:
            conn.send_bytes(bad)
            sent[0] += 1
    except OSError:
        sent[1] = "disconnected"
reader, deaf = Client(("127.0.0.1", port), authkey=key), small_window_client()
def drain():
    try:
        while True:
            reader.recv_bytes()
    except (EOFError, OSError):
        pass
threading.Thread(target=drain, daemon=True).start()
results = [[0, "open"], [0, "open"]]
# Daemon threads: a sender the scheduler no longer reads (back-pressure) stays blocked in
# send_bytes past the deadline, which is what back-pressure means; it must not hang us.
threads = [threading.Thread(target=flood, args=(c, r), daemon=True) for c, r in zip((reader, deaf), results)]
for t in threads: t.start()
for t, r in zip(threads, results):
    t.join(timeout=seconds + 2)
    if t.is_alive():
        r[1] = "blocked"
print(results, flush=True)
"""


def test_a_flood_neither_starves_a_rank_nor_grows_the_queue_or_the_log(start, caplog):
    caplog.set_level(logging.WARNING, "vllm_eplb_plugin.runtime")
    sched = start()
    conn, _ = _rank(sched)
    seconds = 3.0
    # Two flooders in another process (as a real client would be): one reads its error
    # replies, one never does (see the next test for what happens to it).
    flooder = subprocess.Popen([sys.executable, "-c", _FLOODER, str(sched.config.port), KEY.decode(), str(seconds)],
                               stdout=subprocess.PIPE, text=True)
    time.sleep(0.5)
    latencies, queued = [], []
    end = time.monotonic() + seconds - 1
    rnd = 0
    while time.monotonic() < end:
        begin = time.monotonic()
        assert _answered(conn, _load(rnd))["type"] in ("plan", "keep")
        latencies.append(time.monotonic() - begin)
        queued.append(sched._events.qsize())
        rnd += 1
    out, _ = flooder.communicate(timeout=seconds + 10)
    (read_sent, read_state), (deaf_sent, deaf_state) = json.loads(out.replace("'", '"'))
    print(f"flooders sent {read_sent} (reading) and {deaf_sent} (not reading, {deaf_state}); "
          f"{rnd} rounds, latency max {max(latencies):.3f} s; queue max {max(queued)}")
    assert read_sent > 10 * MAX_QUEUED and rnd >= 5
    assert max(latencies) < 1.0
    assert max(queued) <= 3 * MAX_QUEUED  # three connections, each holding at most MAX_QUEUED
    refusals = _warnings(caplog, "EPLB scheduler: load report: load must be a list of 8 numbers; got a JSON list of 1")
    assert 2 <= len(refusals) <= seconds / scheduler_module.LOG_INTERVAL_S + 3
    assert any(m.endswith("more like it not logged)") for m in refusals)


def test_a_client_that_never_reads_is_disconnected_not_waited_for(start, caplog):
    caplog.set_level(logging.WARNING, "vllm_eplb_plugin.runtime")
    sched = start()
    conn, _ = _rank(sched)
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # fills after fewer replies
    sock.connect(("127.0.0.1", sched.config.port))
    port = sock.getsockname()[1]
    deaf = Connection(sock.detach())
    answer_challenge(deaf, KEY)
    deliver_challenge(deaf, KEY)
    bad = encode(_load(0, load=[1]))

    def flood() -> int:  # until the scheduler drops it: its error replies fill every buffer
        for sent in range(200_000):
            try:
                deaf.send_bytes(bad)
            except OSError:
                return sent
        return -1

    sent = _within(10, flood)
    assert sent > scheduler_module.MAX_OUTBOX
    assert _eventually(lambda: _warnings(
        caplog, f"EPLB scheduler: 127.0.0.1:{port} does not read its messages "
                f"({scheduler_module.MAX_OUTBOX} unsent); disconnected"))
    assert _answered(conn, _load(0))["type"] in ("plan", "keep")


def test_a_rank_far_ahead_of_the_others_holds_at_most_a_bounded_number_of_rounds(start, caplog):
    caplog.set_level(logging.WARNING, "vllm_eplb_plugin.runtime")
    sched = start(2)
    ahead, behind = (_rank(sched, r, 2)[0] for r in range(2))
    for c in (ahead, behind):
        assert _within(3, lambda c=c: recv(c))["type"] == "init"
    for rnd in range(100):
        send(ahead, _load(rnd))
    _answered(ahead, {"type": "sync"})  # every report before it has been handled
    assert len(sched._pending) == MAX_PENDING_ROUNDS
    assert _warnings(caplog, "EPLB round 0 layer 0: dropped unplanned, only ranks [0] reported it "
                             "(at most 16 rounds wait per layer)")
    send(behind, _load(99))
    assert [_within(3, lambda c=c: recv(c))["round"] for c in (ahead, behind)] == [99, 99]


def test_a_bug_met_by_one_message_drops_that_message_only(start, caplog, monkeypatch):
    caplog.set_level(logging.WARNING, "vllm_eplb_plugin.runtime")
    sched = start()
    conn, _ = _rank(sched)
    load = sched._load
    monkeypatch.setattr(sched, "_load", lambda rank, report: 1 / 0 if report["round"] == 0 else load(rank, report))
    send(conn, _load(0))
    assert _answered(conn, _load(1))["round"] == 1
    message = _warnings(caplog, "EPLB scheduler: handling a load message from 127.0.0.1:")[0]
    assert message.endswith("failed; message dropped")


def test_a_failing_accept_is_logged_and_accepting_goes_on(caplog):
    caplog.set_level(logging.WARNING, "vllm_eplb_plugin.runtime")
    sched = Scheduler(SchedulerConfig(world_size=1, port=free_port(), mode="A2A", expert_num=E, block_num=L,
                                      auth_key=KEY))
    accept, calls = sched.listener.accept, []

    def accept_failing_once():
        calls.append(1)
        if len(calls) == 1:
            raise OSError(24, "Too many open files")
        return accept()

    sched.listener.accept = accept_failing_once
    threading.Thread(target=sched.serve_forever, daemon=True).start()
    try:
        assert _rank(sched)[1]["type"] == "init"
        assert _warnings(caplog, "EPLB scheduler: accept failed ([Errno 24] Too many open files); still accepting")
    finally:
        sched.stop()


# -- 6: connections that pile up or go silent after the handshake -----------------------------

def test_authenticated_connections_beyond_two_per_rank_are_refused_and_room_comes_back(start, caplog):
    caplog.set_level(logging.WARNING, "vllm_eplb_plugin.runtime")
    sched = start(2)  # two ranks: room for four connections
    port = sched.config.port
    held = [_within(3, lambda: connect("127.0.0.1", port, KEY)) for _ in range(4)]  # authenticated, never say hello
    _eventually(lambda: len(sched._peers) == 4)
    extra = _within(3, lambda: connect("127.0.0.1", port, KEY))
    refused = _within(3, lambda: recv(extra))
    assert refused == {"type": "error", "message": "4 connections are open already (2 per rank of world_size=2); "
                                                   "close unused ones"}
    with pytest.raises(EOFError):
        _within(3, lambda: recv(extra))
    assert _warnings(caplog, "EPLB scheduler: refused 127.0.0.1:")
    held.pop().close()  # one leaves: a rank gets in again
    _eventually(lambda: len(sched._peers) == 3)
    conn, _ = _rank(sched, 0, 2)
    _eventually(lambda: len(sched._peers) == 4)
    for c in held + [conn, extra]:
        c.close()


def test_every_connection_has_tcp_keepalive_so_a_vanished_host_frees_its_rank(start):
    sched = start()
    conn, init = _rank(sched)
    assert init["type"] == "init"
    (peer,) = _eventually(lambda: list(sched._peers))
    with socket.socket(fileno=os.dup(peer.conn.fileno())) as sock:
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
        idle, interval, count = scheduler_module.KEEPALIVE
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE) == idle
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL) == interval
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT) == count
    conn.close()
