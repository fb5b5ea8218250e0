"""The generic runtime end to end: 4 gloo processes, the scheduler as a real subprocess,
a plain PyTorch EP-MoE (runtime/toy_moe.py) on skewed inputs, rebalanced several times
during the run. Outputs are compared with the same model run without EPLB."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import torch.distributed as dist

from tests.helpers.gloo import free_port, run_gloo
from vllm_eplb_plugin.runtime import construct_expert_info_transfer_pool
from vllm_eplb_plugin.runtime.protocol import connect
from vllm_eplb_plugin.runtime.toy_moe import ToyMoE

WORLD, LAYERS, HIDDEN, FFN, EXPERTS, TOP_K, TOKENS = 4, 2, 32, 48, 16, 2, 256
KEY = "e2e-test-key"


def _scheduler(port: int, mode: str, *extra: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "vllm_eplb_plugin.runtime.scheduler", "--world_size", str(WORLD), "--host",
           "127.0.0.1", "--port", str(port), "--mode", mode, "--expert_num", str(EXPERTS), "--block_num",
           str(LAYERS), "--redundant", "4", *extra]
    env = {**os.environ, "EPLB_AUTH_KEY": KEY}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 30
    while True:  # ready once it accepts an authenticated connection
        try:
            connect("127.0.0.1", port, KEY.encode()).close()
            return proc
        except (ConnectionError, OSError) as exc:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"scheduler did not start: {proc.communicate()[0]}") from exc
            time.sleep(0.1)


def _run_rank(rank: int, world: int, port: int, mode: str, steps: int) -> dict:
    torch.manual_seed(1234 + rank)
    kwargs = dict(seed=7, skew=2.0, lb_interval=4)
    model = ToyMoE(LAYERS, HIDDEN, FFN, EXPERTS, TOP_K, rank, world, **kwargs)
    static = ToyMoE(LAYERS, HIDDEN, FFN, EXPERTS, TOP_K, rank, world, **kwargs)  # no EPLB, A2A
    pool = construct_expert_info_transfer_pool(model, rank, None, "127.0.0.1", port, KEY)
    diffs, loads = [], []
    for step in range(steps):
        if step == steps // 2:  # the hot experts change mid-run: EPLB must follow
            for m in (model, static):
                for block in m.blocks:
                    block.bias = block.bias.flip(0)
        x = torch.randn(TOKENS, HIDDEN)
        with torch.no_grad():
            out, ref = model(x), static(x)
        diffs.append(float((out - ref).abs().max()))
        rows = torch.tensor([b.last_rows for b in model.blocks], dtype=torch.float64)
        every = [torch.empty_like(rows) for _ in range(world)]
        dist.all_gather(every, rows)
        per_rank = torch.stack(every)  # [R, L]
        loads.append((per_rank.max(0).values / per_rank.mean(0)).tolist())  # [L] max / mean
        time.sleep(0.01)  # stands in for the rest of a real step; lets plans land mid-run
    pool.stop()
    return {
        "diffs": diffs, "loads": loads, "moves": [b.dispatcher.moves for b in model.blocks],
        "updates": [b.dispatcher.seq for b in model.blocks], "pool_error": pool.error,
        "tables": [b.dispatcher.table.tolist() for b in model.blocks],
    }


def _e2e(mode: str, steps: int, *extra: str) -> tuple[list[dict], str]:
    port = free_port()
    sched = _scheduler(port, mode, *extra)
    try:
        results = run_gloo(_run_rank, WORLD, args=(port, mode, steps))
    finally:
        sched.terminate()
        log = sched.communicate(timeout=10)[0]
    return results, log


@pytest.fixture(scope="module")
def a2a():
    return _e2e("A2A", 80)


def test_a2a_outputs_equal_the_run_without_eplb(a2a):
    results, log = a2a
    for r in results:
        assert r["pool_error"] is None
        assert max(r["diffs"]) <= 1e-6, f"max |out - ref| = {max(r['diffs'])}"


def test_a2a_rebalances_several_times_and_flattens_rank_load(a2a):
    results, log = a2a
    first = results[0]
    assert all(r["tables"] == first["tables"] for r in results), "every rank ends on the same tables"
    assert all(len(m) >= 3 for m in first["moves"]), f"slots moved by each plan, per layer: {first['moves']}\n{log}"
    loads = np.array(first["loads"])  # [steps, L] max / mean rank load
    half = len(loads) // 2
    print("A2A: max/mean rank load at steps 0, half-1, half, last:", loads[[0, half - 1, half, -1]].round(3).tolist(),
          "slots changed per plan:", first["moves"])
    assert loads[0].min() >= 2.0, f"start-up max/mean rank load {loads[0]}"
    assert loads[half - 10:half].max() <= 1.15, f"before the shift {loads[half - 10:half].max(axis=0)}\n{log}"
    assert loads[half].max() >= 1.5, f"right after the shift {loads[half]}"
    assert loads[-10:].max() <= 1.15, f"last steps max/mean rank load {loads[-10:].max(axis=0)}\n{log}"


def test_ex_mode_never_moves_more_than_max_move():
    results, log = _e2e("EX", 60, "--max_move", "2")
    print("EX: slots changed per applied plan, per layer:", results[0]["moves"],
          "max/mean rank load, last step:", results[0]["loads"][-1])
    for r in results:
        assert r["pool_error"] is None and max(r["diffs"]) <= 1e-6
        moves = [m for layer in r["moves"] for m in layer]
        assert moves and max(moves) <= 2, f"moves per update {r['moves']}"


def test_ag_mode_gives_the_a2a_outputs():
    results, log = _e2e("AG", 40)
    print("AG: max |AG out - A2A ref| per rank:", [max(r["diffs"]) for r in results])
    for r in results:
        assert r["pool_error"] is None
        assert all(u >= 2 for u in r["updates"]), log
        assert max(r["diffs"]) <= 1e-5, f"max |AG out - A2A ref| = {max(r['diffs'])}"
