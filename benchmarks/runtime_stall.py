"""Does any forward step wait on the EPLB algorithm or on weights in flight?

4 gloo processes run the toy EP-MoE (vllm_eplb_plugin/runtime/toy_moe.py) on skewed,
drifting inputs, once without EPLB and once with the scheduler as a subprocess and the
transfer pool on every rank, same inputs. Step times of the two runs side by side, the
steps that swapped an update in, how long plans and transfers took off the forward path,
and the max / mean rank load.

    python -m benchmarks.runtime_stall [--steps 200] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from vllm_eplb_plugin.runtime import construct_expert_info_transfer_pool
from vllm_eplb_plugin.runtime.protocol import connect
from vllm_eplb_plugin.runtime.toy_moe import ToyMoE

WORLD, LAYERS, HIDDEN, FFN, EXPERTS, TOP_K, TOKENS, REDUNDANT = 4, 4, 32, 64, 32, 4, 64, 8
KEY = "stall-benchmark"


def _rank(rank: int, port: int, sched_port: int | None, steps: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    model = ToyMoE(LAYERS, HIDDEN, FFN, EXPERTS, TOP_K, rank, WORLD, seed=3, skew=2.0, lb_interval=10)
    pool = construct_expert_info_transfer_pool(model, rank, None, "127.0.0.1", sched_port, KEY) if sched_port else None
    gen = torch.Generator().manual_seed(100 + rank)
    times, swaps, loads = [], [], []
    for step in range(steps):
        if step and step % (steps // 4) == 0:  # the hot experts move: plans follow
            for block in model.blocks:
                block.bias = torch.roll(block.bias, EXPERTS // 4)
        x = torch.randn(TOKENS, HIDDEN, generator=gen)
        seqs = [b.dispatcher.seq for b in model.blocks]
        dist.barrier()  # steps start together, as in a real EP step
        start = time.perf_counter()
        with torch.no_grad():
            model(x)
        times.append((time.perf_counter() - start) * 1e3)
        swaps.append(any(b.dispatcher.seq != s for b, s in zip(model.blocks, seqs, strict=True)))
        rows = torch.tensor([b.last_rows for b in model.blocks], dtype=torch.float64)
        every = [torch.empty_like(rows) for _ in range(WORLD)]
        dist.all_gather(every, rows)
        per_rank = torch.stack(every)
        loads.append((per_rank.max(0).values / per_rank.mean(0)).mean().item())
    transfers = pool.transfers if pool else []
    if pool:
        pool.stop()
    Path(out_dir, f"{rank}.json").write_text(
        json.dumps({"times": times, "swaps": swaps, "loads": loads, "transfers": transfers})
    )
    dist.destroy_process_group()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(steps: int, eplb: bool) -> tuple[list[dict], str]:
    log = ""
    sched = None
    sched_port = _free_port() if eplb else None
    if eplb:
        cmd = [sys.executable, "-m", "vllm_eplb_plugin.runtime.scheduler", "--world_size", str(WORLD), "--port",
               str(sched_port), "--mode", "A2A", "--expert_num", str(EXPERTS), "--block_num", str(LAYERS),
               "--redundant", str(REDUNDANT)]
        sched = subprocess.Popen(cmd, env={**os.environ, "EPLB_AUTH_KEY": KEY}, stdout=subprocess.PIPE,
                                 stderr=subprocess.STDOUT, text=True)
        for _ in range(300):
            try:
                connect("127.0.0.1", sched_port, KEY.encode()).close()
                break
            except OSError:
                time.sleep(0.1)
    try:
        with tempfile.TemporaryDirectory() as out:
            mp.spawn(_rank, args=(_free_port(), sched_port, steps, out), nprocs=WORLD, join=True)
            ranks = [json.loads(Path(out, f"{r}.json").read_text()) for r in range(WORLD)]
    finally:
        if sched:
            sched.terminate()
            log = sched.communicate(timeout=10)[0]
    return ranks, log


def _stats(times: list[float]) -> dict:
    arr = np.asarray(times)
    return {"steps": len(arr), "median_ms": float(np.median(arr)), "p95_ms": float(np.percentile(arr, 95)),
            "max_ms": float(arr.max()) if len(arr) else 0.0}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    base, _ = _run(args.steps, eplb=False)
    with_eplb, log = _run(args.steps, eplb=True)
    # A step lasts as long as its slowest rank.
    step_base = np.max([r["times"] for r in base], axis=0)
    step_eplb = np.max([r["times"] for r in with_eplb], axis=0)
    swapped = np.any([r["swaps"] for r in with_eplb], axis=0)
    policy_ms = [float(m) for m in re.findall(r"policy ([0-9.]+) ms", log)]
    transfer_ms = [t["seconds"] * 1e3 for r in with_eplb for t in r["transfers"]]
    skip = 5  # the first steps pay one-time set-up in both runs
    rows = {
        "without EPLB": _stats(step_base[skip:].tolist()),
        "with EPLB, all steps": _stats(step_eplb[skip:].tolist()),
        "with EPLB, steps that swapped an update in": _stats(step_eplb[skip:][swapped[skip:]].tolist()),
        "with EPLB, other steps": _stats(step_eplb[skip:][~swapped[skip:]].tolist()),
    }
    result = {
        "shape": {"ranks": WORLD, "layers": LAYERS, "experts": EXPERTS, "top_k": TOP_K, "tokens_per_rank": TOKENS,
                  "redundant": REDUNDANT, "steps": args.steps},
        "step_time": rows,
        "plans": len(policy_ms),
        "policy_ms": {"median": float(np.median(policy_ms)) if policy_ms else 0.0, "max": max(policy_ms, default=0.0)},
        "transfer_ms_per_layer_update": {"median": float(np.median(transfer_ms)) if transfer_ms else 0.0,
                                         "max": max(transfer_ms, default=0.0)},
        "remote_fetches": sum(t["remote_in"] for r in with_eplb for t in r["transfers"]),
        "max_over_mean_rank_load": {"without EPLB": float(np.mean(base[0]["loads"])),
                                    "with EPLB": float(np.mean(with_eplb[0]["loads"]))},
    }
    print(f"{'step time (slowest rank)':<46} {'steps':>6} {'median':>8} {'p95':>8} {'max':>8}  ms")
    for name, st in rows.items():
        print(f"{name:<46} {st['steps']:>6} {st['median_ms']:>8.2f} {st['p95_ms']:>8.2f} {st['max_ms']:>8.2f}")
    print(f"plans: {result['plans']}, policy {result['policy_ms']['median']:.1f} ms median "
          f"(max {result['policy_ms']['max']:.1f}) "
          f"in the scheduler; transfers {result['transfer_ms_per_layer_update']['median']:.1f} ms median per layer "
          f"update on the pool threads; {result['remote_fetches']} remote expert fetches")
    load = result["max_over_mean_rank_load"]
    print(f"max / mean rank load, mean over steps: {load['without EPLB']:.3f} without EPLB, "
          f"{load['with EPLB']:.3f} with")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
