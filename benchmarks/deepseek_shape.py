"""Time one DeepSeek-placement call on DeepSeek-V3's shape, ours next to the peers.

Shape: 58 MoE layers, 256 logical experts, EP32, 288 slots (9 per rank, 32 redundant),
Zipf-skewed heat. Peers in the same run: DeepSeek's reference algorithm (torch, read from
vLLM Ascend's source) and vLLM's installed ``DefaultEplbPolicy``. Also reports whether
each places the same experts on every rank as ours, the imbalance it reaches, and how
many (layer, rank) pairs hold one expert twice (the peers allow it; we never do).

    python -m benchmarks.deepseek_shape [--repeat 7] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import numpy as np

from vllm_eplb_plugin import PolicyConfig, create_policy
from vllm_eplb_plugin.metrics import imbalance
from vllm_eplb_plugin.placement import default_table, expert_to_slot_load

from .peers import deepseek_reference, vllm_default_policy

L, E, R, S = 58, 256, 32, 288
K = S // R


def skewed_heat(seed: int) -> np.ndarray:
    """Per layer a Zipf(1.1) popularity over a random permutation of experts -> ``[L, E]``."""
    rng = np.random.default_rng(seed)
    ranks = np.stack([rng.permutation(E) for _ in range(L)]) + 1
    pop = 1.0 / ranks**1.1
    return np.stack([rng.multinomial(200_000, p / p.sum()) for p in pop]).astype(np.float64)


def timed(fn, repeat: int) -> tuple[float, object]:
    out = fn()  # warm-up (imports, allocator)
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        out = fn()
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times), out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None, help="write the results here")
    args = parser.parse_args(argv)

    import torch

    torch.set_num_threads(1)
    heat = skewed_heat(args.seed)
    table = default_table(L, R, K, E)
    workload = expert_to_slot_load(table, heat)
    reference = deepseek_reference()
    vllm_policy = vllm_default_policy()
    rows = []
    for topo, (groups, nodes) in {"hierarchical (8 groups, 4 nodes)": (8, 4), "global (1 node)": (1, 1)}.items():
        ours = create_policy("deepseek", PolicyConfig(num_groups=groups, num_nodes=nodes))
        runs = {
            "vllm-eplb-plugin deepseek": lambda ours=ours: ours.rebalance_experts(table, workload).new_table,
            "vLLM DefaultEplbPolicy": lambda groups=groups, nodes=nodes: vllm_policy.rebalance_experts(
                torch.from_numpy(heat), S, groups, nodes, R).numpy().reshape(L, R, K),
            "DeepSeek reference (torch)": lambda groups=groups, nodes=nodes: reference(
                torch.from_numpy(heat), S, groups, nodes, R)[0].numpy().reshape(L, R, K),
        }
        results = {name: timed(fn, args.repeat) for name, fn in runs.items()}
        ours_sorted = np.sort(results["vllm-eplb-plugin deepseek"][1], axis=-1)
        for name, (ms, new) in results.items():
            rows.append({
                "topology": topo, "implementation": name, "ms_per_call": round(ms, 2),
                "mean_imbalance": round(float(imbalance(new, heat).mean()), 4),
                "same_rank_sets_as_ours": bool(np.array_equal(np.sort(new, axis=-1), ours_sorted)),
                # (layer, rank) pairs holding one expert twice: invalid under our invariants
                "ranks_with_duplicates": int(np.any(np.diff(np.sort(new, axis=-1), axis=-1) == 0, axis=-1).sum()),
            })

    print(f"DeepSeek-V3 shape: {L} layers, {E} experts, EP{R}, {S} slots; median of {args.repeat} calls, "
          f"1 thread; start imbalance {imbalance(table, heat).mean():.3f}")
    print(f"{'topology':<34} {'implementation':<28} {'ms/call':>9} {'imbalance':>10} "
          f"{'same placement':>15} {'dup ranks':>10}")
    for r in rows:
        print(f"{r['topology']:<34} {r['implementation']:<28} {r['ms_per_call']:>9.2f} "
              f"{r['mean_imbalance']:>10.4f} {str(r['same_rank_sets_as_ours']):>15} {r['ranks_with_duplicates']:>10}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"shape": {"layers": L, "experts": E, "ranks": R, "slots": S}, "repeat": args.repeat,
                       "machine": platform.processor() or platform.machine(), "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
