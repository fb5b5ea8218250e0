"""How far each policy is from the best possible table when a rank holds two slots
(DeepSeek-V3 on EP144 x 2), where the benchmark's lower bound
``max(total / R, min over counts of max_e w_e / c_e)`` is loose.

With two slots per rank a table is a pairing of the ``2R`` replicas, and for given
replica counts no pairing beats largest-with-smallest. So

    min over tables of the max rank load >= min over counts c of P(c),

``P(c)`` the sorted-pairing peak of the replicas of ``c`` (the bound only drops the rule
that a rank holds two different experts). ``P(c) <= T`` holds iff every replica larger than
``T / 2`` finds its own partner no larger than ``T`` minus it (Hall's condition on a
threshold graph): for each such size ``s``, #replicas ``<= T - s`` >= #replicas ``>= s``.
A mixed-integer program (``scipy.optimize.milp``, HiGHS) decides whether counts with
``P(c) <= T`` exist; bisection on ``T`` brackets the optimum. ``bound`` is the largest
``T`` proven infeasible: no table of that layer has a lower peak.

    python -m benchmarks.pairing_bound [--layers 4] [--json F]

Runs on the first fitted window of the policy benchmark's EP144 traces (same seed).
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

from vllm_eplb_plugin.placement import default_table, expert_to_slot_load, rank_load
from vllm_eplb_plugin.policies.search import lower_bound

from .policies import contenders
from .traces import SHAPES, SKEWS, drifting_trace

POLICIES = ("optimal", "optimal pairing", "swift", "deepseek", "vLLM DefaultEplbPolicy", "vLLM Ascend FlashLB")


def pairing_feasible(weight: np.ndarray, num_ranks: int, peak: float, time_limit: float) -> bool | None:
    """Whether replica counts with sorted-pairing peak ``<= peak`` exist for one layer's
    ``weight [E]`` (each expert 1..R replicas, 2R in all); ``None``: not decided in time.

    Variables: binary ``x[e, c]`` (expert ``e`` has ``c`` replicas), one column per
    (e, c) sorted by replica size ``w_e / c``, and prefix sums ``P[k]`` of ``c * x`` over the
    first ``k + 1`` columns, so each Hall row needs two entries: for a big size ``s``,
    ``P[#cols <= peak - s] + P[#cols < s] >= 2R`` (partners >= replicas of size >= s).
    """
    from scipy.optimize import Bounds, LinearConstraint, milp
    from scipy.sparse import coo_matrix

    S = 2 * num_ranks
    least = np.maximum(1, np.ceil(weight / peak - 1e-12)).astype(np.int64)  # replicas no larger than peak
    if least.max() > num_ranks or least.sum() > S:
        return False
    spare = S - least.sum()
    col_e = np.concatenate([np.full(min(num_ranks, n + spare) - n + 1, e) for e, n in enumerate(least)])
    col_c = np.concatenate([np.arange(n, min(num_ranks, n + spare) + 1) for n in least])
    size = weight[col_e] / col_c
    order = np.argsort(size, kind="stable")
    col_e, col_c, size = col_e[order], col_c[order], size[order]
    n = len(size)
    rows: list[np.ndarray] = []
    cols: list[np.ndarray] = []
    vals: list[np.ndarray] = []
    lo: list[float] = []
    hi: list[float] = []

    def add(c: list[int], v: list[float], low: float, high: float) -> None:
        rows.append(np.full(len(c), len(lo)))
        cols.append(np.asarray(c))
        vals.append(np.asarray(v, dtype=np.float64))
        lo.append(low)
        hi.append(high)

    for e in range(len(weight)):
        idx = np.flatnonzero(col_e == e)
        add(list(idx), [1.0] * len(idx), 1, 1)
    add(list(range(n)), list(col_c.astype(np.float64)), S, S)
    for k in range(n):  # P[k] = P[k-1] + c_k x_k
        add([n + k, k] + ([n + k - 1] if k else []), [1.0, -float(col_c[k])] + ([-1.0] if k else []), 0, 0)
    for s in np.unique(size[size > peak / 2]):
        partners = int(np.searchsorted(size, peak - s, side="right"))
        smaller = int(np.searchsorted(size, s, side="left"))
        add([n + i - 1 for i in (partners, smaller) if i], [1.0 for i in (partners, smaller) if i], S, np.inf)
    A = coo_matrix((np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))), shape=(len(lo), 2 * n))
    res = milp(np.zeros(2 * n), constraints=LinearConstraint(A.tocsr(), lo, hi),
               integrality=np.r_[np.ones(n), np.zeros(n)],
               bounds=Bounds(np.zeros(2 * n), np.r_[np.ones(n), np.full(n, S)]),
               options={"time_limit": time_limit})
    return True if res.status == 0 else False if res.status == 2 else None


def pairing_bound(weight: np.ndarray, num_ranks: int, low: float, high: float, steps: int = 14,
                  time_limit: float = 60.0) -> tuple[float, float]:
    """Bisect between ``low`` (infeasible or a known bound) and ``high`` (a table's peak):
    ``(largest peak proven impossible, smallest peak found possible)``."""
    for _ in range(steps):
        mid = (low + high) / 2
        ok = pairing_feasible(weight, num_ranks, mid, time_limit)
        if ok is None:
            break
        low, high = (low, mid) if ok else (mid, high)
    return low, high


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=4, help="layers per skew (default 4)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    shape = SHAPES["deepseek-v3-ep144"]
    runs = [c for c in contenders() if c.name in POLICIES]
    rows = []
    print(f"{'skew':<9} {'layer':>5} {'loose bound':>11} {'pairing bound':>13}  "
          + "  ".join(f"{c.name[:22]:>22}" for c in runs))
    for skew, s in SKEWS.items():
        # The policy benchmark's trace (8 layers); its first window is what policies fit first.
        trace = drifting_trace(shape.experts, 8, 6, 32, 256 * shape.ranks, shape.top_k, s, seed=args.seed)
        window = trace[0].sum(axis=0)[: args.layers]  # [L, E]
        start = default_table(args.layers, shape.ranks, shape.slots_per_rank, shape.experts)
        series = expert_to_slot_load(start, trace[0][:, : args.layers])
        peaks = {c.name: rank_load(np.asarray(c.make(shape)(start, series)), window).max(axis=1) for c in runs}
        loose = lower_bound(window, shape.ranks, shape.slots)
        for layer in range(args.layers):
            t0 = time.perf_counter()
            best_table = min(p[layer] for p in peaks.values())
            bound, found = pairing_bound(window[layer], shape.ranks, loose[layer], best_table)
            row = {"skew": skew, "layer": layer, "loose_bound": float(loose[layer]), "pairing_bound": bound,
                   "pairing_found": found, "seconds": round(time.perf_counter() - t0, 1),
                   "fit_vs_pairing_bound": {name: bound / float(p[layer]) for name, p in peaks.items()},
                   "fit_vs_loose_bound": {name: float(loose[layer] / p[layer]) for name, p in peaks.items()}}
            rows.append(row)
            print(f"{skew:<9} {layer:>5} {loose[layer]:>11.0f} {bound:>13.0f}  "
                  + "  ".join(f"{row['fit_vs_pairing_bound'][c.name]:>22.4f}" for c in runs), flush=True)
    print("\nfit ratio against the pairing bound (mean / worst over layers):")
    summary = {}
    for c in runs:
        fits = [r["fit_vs_pairing_bound"][c.name] for r in rows]
        loose_fits = [r["fit_vs_loose_bound"][c.name] for r in rows]
        summary[c.name] = {"mean": float(np.mean(fits)), "worst": float(np.min(fits)),
                           "loose_mean": float(np.mean(loose_fits)), "loose_worst": float(np.min(loose_fits))}
        print(f"  {c.name:<26} {np.mean(fits):.4f} / {np.min(fits):.4f}   "
              f"(against the loose bound {np.mean(loose_fits):.4f} / {np.min(loose_fits):.4f})")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"params": vars(args), "summary": summary, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
