"""How few slots a repair could change: for one layer, the fewest changed slots that bring
every rank's load to at most ``T`` with the replica counts fixed, as a mixed-integer
program (``scipy.optimize.milp``, HiGHS).

The policy benchmark's moves floor (one slot per rank above the new peak) holds for every
policy but is loose; this is the exact minimum where HiGHS proves it, and a lower bound
(HiGHS's dual bound) where it stops at its time limit.

    python -m benchmarks.min_moves [--shape deepseek-v3-ep64] [--skew moderate] [--layer 0]
                                   [--seconds 600] [--json F]

Runs on the policy benchmark's traces (same seed and sizes): ``swift`` plans window 0 from
vLLM's linear table, then window 1; the program starts from swift's window-0 table, keeps
swift's window-1 replica counts, and must bring every rank within ``1 / 0.99`` lower bounds
(fit 0.99) on window 1.
"""

from __future__ import annotations

import argparse
import json
import time
from typing import NamedTuple

import numpy as np

from vllm_eplb_plugin import create_policy
from vllm_eplb_plugin.moves import changed_slots
from vllm_eplb_plugin.placement import default_table, expert_to_slot_load, logcnt, rank_load
from vllm_eplb_plugin.policies.search import lower_bound

from .traces import SHAPES, SKEWS, drifting_trace


class MinMoves(NamedTuple):
    """``moves``: the fewest changed slots found (None: none found) and ``table [R, K]``,
    the table that changes them (experts that stay on a rank keep their slot); ``bound``:
    no table changes fewer (equals ``moves`` when ``proven``); ``message``: HiGHS's status."""

    proven: bool
    moves: int | None
    table: np.ndarray | None
    bound: float
    message: str


def min_moves(old: np.ndarray, weight: np.ndarray, counts: np.ndarray, peak: float, seconds: float) -> MinMoves:
    """Fewest slots of ``old [R, K]`` that change so that, with ``counts [E]`` replicas per
    expert (on distinct ranks) and ``weight [E]`` split evenly over them, no rank carries
    more than ``peak``. Binary ``x[e, r]``: rank ``r`` holds expert ``e``; a held pair
    keeps its slot, so the changed slots are the pairs ``old`` lacks."""
    from scipy.optimize import Bounds, LinearConstraint, milp
    from scipy.sparse import csr_matrix

    R, K = old.shape
    E = len(weight)
    held = np.zeros((E, R), dtype=bool)
    held[old, np.arange(R)[:, None]] = True
    x = np.arange(E * R).reshape(E, R)  # variable of (e, r)
    size = weight / np.maximum(counts, 1)

    def rows(per_row: np.ndarray, values: np.ndarray) -> csr_matrix:  # one row per row of per_row [m, n]
        m, n = per_row.shape
        return csr_matrix((values.ravel(), (np.repeat(np.arange(m), n), per_row.ravel())), shape=(m, E * R))

    constraints = [
        LinearConstraint(rows(x, np.ones((E, R))), counts, counts),  # each expert's replicas
        LinearConstraint(rows(x.T, np.ones((R, E))), K, K),  # K slots per rank
        LinearConstraint(rows(x.T, np.tile(size, (R, 1))), 0, peak),  # rank loads
    ]
    res = milp((~held).ravel().astype(np.float64), constraints=constraints, integrality=np.ones(E * R),
               bounds=Bounds(0, 1), options={"time_limit": seconds})
    moves = None if res.x is None else int(round(res.fun))
    bound = float(moves) if res.status == 0 and moves is not None else float(getattr(res, "mip_dual_bound", 0) or 0)
    if res.status == 2:  # infeasible: no table of these counts reaches ``peak``
        bound = np.inf
    return MinMoves(res.status == 0, moves, None if res.x is None else _table(old, res.x.reshape(E, R) > 0.5),
                    bound, res.message)


def _table(old: np.ndarray, chosen: np.ndarray) -> np.ndarray:
    """``old [R, K]`` with each rank's experts replaced by its chosen set (``chosen [E,
    R]``): experts the rank keeps stay in their slots, new ones fill the others."""
    table = old.copy()
    for r, row in enumerate(table):
        new = iter(sorted(set(np.flatnonzero(chosen[:, r])) - set(row.tolist())))
        for k, e in enumerate(row):
            if not chosen[e, r]:
                table[r, k] = next(new)
    return table


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="deepseek-v3-ep64", choices=sorted(SHAPES))
    parser.add_argument("--skew", default="moderate", choices=sorted(SKEWS))
    parser.add_argument("--layer", type=int, default=0, help="layer of the trace (8 layers, as the benchmark)")
    parser.add_argument("--seconds", type=float, default=600, help="HiGHS time limit")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None, help="write the result here")
    args = parser.parse_args(argv)

    shape = SHAPES[args.shape]
    trace = drifting_trace(shape.experts, 8, 2, 32, 256 * shape.ranks, shape.top_k, SKEWS[args.skew], seed=args.seed)
    swift = create_policy("swift")
    start = default_table(8, shape.ranks, shape.slots_per_rank, shape.experts)
    old = swift.rebalance_experts(start, expert_to_slot_load(start, trace[0])).new_table
    new = swift.rebalance_experts(old, expert_to_slot_load(old, trace[1])).new_table
    l, window = args.layer, trace[1].sum(axis=0)
    bound = float(lower_bound(window, shape.ranks, shape.slots)[l])
    peak = float(rank_load(new[l:l + 1], window[l:l + 1]).max())
    floor = int((rank_load(old[l:l + 1], window[l:l + 1]) > peak).sum())
    t0 = time.perf_counter()
    found = min_moves(old[l], window[l], logcnt(new[l:l + 1], shape.experts)[0], bound / 0.99, args.seconds)
    seconds = time.perf_counter() - t0
    changed = None if found.table is None else np.bincount((found.table != old[l]).sum(axis=1), minlength=4)
    result = {"shape": args.shape, "skew": args.skew, "layer": l, "slots": shape.slots,
              "swift_moves": int(changed_slots(old[l:l + 1], new[l:l + 1])[0]),
              "swift_peak_over_bound": round(peak / bound, 4), "floor": floor,
              "min_moves": found.moves, "min_moves_bound": found.bound, "proven": found.proven,
              "message": found.message, "seconds": round(seconds, 1),
              "ranks_by_slots_changed": None if changed is None else changed.tolist(),
              "swift_ranks_by_slots_changed": np.bincount((new[l] != old[l]).sum(axis=1), minlength=4).tolist()}
    print(f"{args.shape} {args.skew} layer {l}: swift changes {result['swift_moves']} of {shape.slots} slots "
          f"(peak {peak / bound:.4f} x the lower bound); floor {floor}; within 1 / 0.99 lower bounds with swift's "
          f"counts: {'exactly' if found.proven else 'at least'} {found.bound:g} slots"
          f"{'' if found.proven else f' (best found: {found.moves})'}, {seconds:.0f} s: {found.message}")
    print(f"ranks by slots changed (0, 1, 2, ...): that table {result['ranks_by_slots_changed']}, "
          f"swift {result['swift_ranks_by_slots_changed']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
