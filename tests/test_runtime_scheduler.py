"""The scheduler: auth key, flags, per-layer planning once every rank reported, the same
messages to every rank, failures that never stop it. Real sockets on 127.0.0.1."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from multiprocessing import AuthenticationError

import numpy as np
import pytest

from tests.helpers.gloo import free_port
from vllm_eplb_plugin.metrics import balancedness
from vllm_eplb_plugin.runtime.protocol import connect, recv, send
from vllm_eplb_plugin.runtime.scheduler import Scheduler, SchedulerConfig, expand_table

KEY = b"scheduler-test-key"
W, E, L = 4, 8, 2


def _cli(*args: str, key: str | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "EPLB_AUTH_KEY"}
    if key is not None:
        env["EPLB_AUTH_KEY"] = key
    return subprocess.run([sys.executable, "-m", "vllm_eplb_plugin.runtime.scheduler", *args], env=env,
                          capture_output=True, text=True, timeout=60)


BASE = ["--world_size", "4", "--port", "1", "--expert_num", "8", "--block_num", "2"]


@pytest.mark.parametrize("args, key, message", [
    (["--mode", "A2A"], None, "pass --auth_key or set EPLB_AUTH_KEY"),
    (["--mode", "EX"], "k", "--mode EX needs --max_move"),
    (["--mode", "A2A", "--max_move", "2"], "k", "--max_move applies to --mode EX only"),
    (["--mode", "A2A", "--redundant", "3"], "k",
     "--redundant=3: 8 experts + 3 redundant slots must divide over --world_size=4 ranks; use e.g. --redundant 4"),
    (["--mode", "A2A", "--policy", "swiftt"], "k", "swiftt"),
    (["--mode", "XYZ"], "k", "invalid choice: 'XYZ'"),
])
def test_cli_refuses_bad_flags_and_a_missing_key(args, key, message):
    done = _cli(*BASE, *args, key=key)
    assert done.returncode == 2 and message in done.stderr, done.stderr


def test_cli_names_a_port_it_cannot_listen_on():
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = str(busy.getsockname()[1])
        done = _cli("--world_size", "4", "--port", port, "--expert_num", "8", "--block_num", "2", "--mode", "A2A",
                    key="k")
    assert done.returncode == 2 and f"cannot listen on --host 127.0.0.1 --port {port}" in done.stderr, done.stderr


@pytest.fixture
def scheduler(request):
    """A scheduler in a background thread; parametrize with config overrides."""
    overrides = getattr(request, "param", {})
    config = SchedulerConfig(**{"world_size": W, "port": free_port(), "mode": "A2A", "expert_num": E,
                                "block_num": L, "auth_key": KEY, "redundant": 4, **overrides})
    sched = Scheduler(config)
    thread = threading.Thread(target=sched.serve_forever, daemon=True)
    thread.start()
    yield sched
    sched.stop()
    thread.join(5)


def _ranks(sched: Scheduler, world: int = W) -> tuple[list, list]:
    """Connect ``world`` fake ranks with the linear start table; returns connections and inits."""
    conns = [connect("127.0.0.1", sched.config.port, KEY) for _ in range(world)]
    for r, c in enumerate(conns):
        table = [list(range(r * E // W, (r + 1) * E // W))] * L
        send(c, {"type": "hello", "rank": r, "world_size": W, "num_layers": L, "num_experts": E, "table": table})
    return conns, [recv(c) for c in conns]


def _skew(rank: int) -> list[float]:
    return [400.0 + rank, 200.0, 50, 50, 20, 20, 10, 10]


def test_expand_table_keeps_each_ranks_experts_and_adds_the_least_copied():
    table = np.array([[[0, 1], [2, 3]]])
    assert expand_table(table, 3).tolist() == [[[0, 1, 2], [2, 3, 0]]]


def test_wrong_key_is_rejected_and_the_scheduler_keeps_serving(scheduler):
    with pytest.raises(AuthenticationError, match="refused the auth key"):
        connect("127.0.0.1", scheduler.config.port, b"wrong")
    conns, inits = _ranks(scheduler)
    assert {m["type"] for m in inits} == {"init"}


def test_every_rank_gets_the_same_plans_once_all_reported(scheduler):
    conns, inits = _ranks(scheduler)
    table = np.array(inits[0]["table"])  # [L, R, K]
    assert all(m == inits[0] for m in inits) and table.shape == (L, W, 3)
    assert table[:, :, :2].tolist() == [[[0, 1], [2, 3], [4, 5], [6, 7]]] * L  # originals kept in place
    for layer in range(L):
        for r in range(W - 1):
            send(conns[r], {"type": "load", "round": 0, "layer": layer, "load": _skew(r)})
    for c in conns:  # three of four reported: nothing is planned yet
        assert not c.poll(0.3)
    for layer in range(L):
        send(conns[W - 1], {"type": "load", "round": 0, "layer": layer, "load": _skew(W - 1)})
    got = [[recv(c) for _ in range(L)] for c in conns]
    assert all(g == got[0] for g in got), "every rank receives the same messages in the same order"
    load = np.sum([_skew(r) for r in range(W)], axis=0)
    for msg in got[0]:
        assert msg["type"] == "plan" and msg["round"] == 0
        new = np.array(msg["table"])[None]
        old = table[msg["layer"]][None]
        assert balancedness(new, load[None])[0] > balancedness(old, load[None])[0]
    assert sorted(m["layer"] for m in got[0]) == [0, 1]


@pytest.mark.parametrize("scheduler", [{"mode": "EX", "max_move": 1}], indirect=True)
def test_ex_mode_changes_at_most_max_move_slots(scheduler):
    conns, inits = _ranks(scheduler)
    current = np.array(inits[0]["table"])[0]
    for rnd in range(4):
        for r, c in enumerate(conns):
            send(c, {"type": "load", "round": rnd, "layer": 0, "load": _skew(r)})
        msgs = [recv(c) for c in conns]
        if msgs[0]["type"] == "plan":
            new = np.array(msgs[0]["table"])
            assert (new != current).sum() <= 1
            current = new


@pytest.mark.parametrize("scheduler", [{"policy": "tests.helpers.flaky_policies:FlakyPolicy"}], indirect=True)
def test_failing_policy_keeps_tables_and_the_scheduler_carries_on(scheduler):
    conns, _ = _ranks(scheduler)
    kinds = []
    for rnd in range(3):
        for r, c in enumerate(conns):
            send(c, {"type": "load", "round": rnd, "layer": 0, "load": _skew(r)})
        msgs = [recv(c) for c in conns]
        assert all(m == msgs[0] for m in msgs)
        kinds.append((msgs[0]["type"], msgs[0].get("reason", "")))
    assert kinds[0][0] == "keep" and "boom from FlakyPolicy" in kinds[0][1]
    assert kinds[1][0] == "keep" and "holds logical expert 0 twice" in kinds[1][1]
    assert kinds[2][0] == "plan"


def test_bad_reports_are_refused_by_name(scheduler):
    conns, _ = _ranks(scheduler)
    send(conns[1], {"type": "load", "round": 0, "layer": 5, "load": _skew(1)})
    assert "load report from rank 1: layer=5 is not in [0, 2)" in recv(conns[1])["message"]
    send(conns[1], {"type": "load", "round": 0, "layer": 0, "load": [-1] * E})
    assert (
        "load report from rank 1: load[0]=-1 is not a finite number in [0, 2**53]; report ignored"
        == recv(conns[1])["message"]
    )


def test_hello_that_does_not_fit_is_refused():
    sched_port = free_port()
    sched = Scheduler(SchedulerConfig(world_size=W, port=sched_port, mode="A2A", expert_num=E, block_num=L,
                                      auth_key=KEY))
    threading.Thread(target=sched.serve_forever, daemon=True).start()
    try:
        c = connect("127.0.0.1", sched_port, KEY)
        send(c, {"type": "hello", "rank": 0, "world_size": 2, "num_layers": L, "num_experts": E, "table": [[0]] * L})
        assert recv(c)["message"] == "hello: world_size=2, but this scheduler serves world_size=4"
    finally:
        sched.stop()


def test_a_rank_that_disconnects_does_not_block_the_others_and_may_come_back(scheduler):
    conns, inits = _ranks(scheduler)
    for r in range(2):
        send(conns[r], {"type": "load", "round": 0, "layer": 0, "load": _skew(r)})
    conns[3].close()  # gone mid-round
    table = np.array(inits[0]["table"])
    back = connect("127.0.0.1", scheduler.config.port, KEY)
    send(back, {"type": "hello", "rank": 3, "world_size": W, "num_layers": L, "num_experts": E,
                "table": table[:, 3].tolist()})
    assert recv(back)["type"] == "init"
    conns[3] = back
    for r, c in enumerate(conns):  # the next round completes with every rank again
        send(c, {"type": "load", "round": 1, "layer": 0, "load": _skew(r)})
    msgs = [recv(c) for c in conns]
    assert all(m == msgs[0] for m in msgs) and msgs[0]["round"] == 1


def test_auth_key_comes_from_the_flag_else_the_environment(monkeypatch):
    from vllm_eplb_plugin.runtime.protocol import AuthKeyMissing, resolve_auth_key

    monkeypatch.setenv("EPLB_AUTH_KEY", "from-env")
    assert resolve_auth_key("from-flag") == b"from-flag"
    assert resolve_auth_key(None) == b"from-env"
    monkeypatch.delenv("EPLB_AUTH_KEY")
    with pytest.raises(AuthKeyMissing, match="pass --auth_key or set EPLB_AUTH_KEY"):
        resolve_auth_key("")


def test_pool_refuses_a_module_without_blocks():
    import torch

    from vllm_eplb_plugin.runtime import construct_expert_info_transfer_pool

    with pytest.raises(ValueError, match="no MoE block with both `expert_load_collector`"):
        construct_expert_info_transfer_pool(torch.nn.Linear(2, 2), 0, None, "127.0.0.1", 1, "k")
