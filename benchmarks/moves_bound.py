"""How few slots any policy can change per update while keeping every layer within ``1 /
fit`` of its best possible peak: an exact lower bound, by exhaustive search over tables,
on shapes where :mod:`benchmarks.exact` scores every table (Mixtral-like: 8 experts on 4
ranks x 3 slots).

Even a policy that knew every window in advance has to hold, after update ``w``, a table
whose peak on window ``w`` is at most ``best_w / fit``. So its moves are at least those of
the cheapest sequence of such tables, one per window: a shortest path through the sets of
tables that fit each window, with the changed slots between consecutive tables as the
edge cost (a dynamic program over windows). The benchmark's steady moves are the updates
after the first (the first starts from vLLM's linear table), so the path starts at the
first fitted window's tables, free of charge.

    python -m benchmarks.moves_bound [--shape mixtral-8e-ep4x3] [--fits 0.99,0.995] [--json F]

Runs on the policy benchmark's traces (same seed and sizes) and sets ``swift``'s steady
moves and worst per-layer exact fit beside the bound.
"""

from __future__ import annotations

import argparse
import itertools
import json

import numpy as np

from vllm_eplb_plugin import create_policy
from vllm_eplb_plugin.placement import changed_slots, default_table, expert_to_slot_load, rank_load

from .exact import rank_contents, table_peaks
from .traces import SHAPES, SKEWS, drifting_trace

__all__ = ["fitting_tables", "transition_moves", "path_bound"]


def fitting_tables(weight: np.ndarray, num_ranks: int, slots_per_rank: int, fit: float) -> np.ndarray:
    """Indices ``[n]`` into :func:`benchmarks.exact.rank_contents`' tables whose peak on
    ``weight [E]`` is at most the best possible peak over ``fit``."""
    peaks = table_peaks(weight, num_ranks, slots_per_rank)
    return np.flatnonzero(peaks <= peaks.min() / fit * (1 + 1e-12))


def transition_moves(a: np.ndarray, b: np.ndarray, member: np.ndarray) -> np.ndarray:
    """Fewest changed slots ``[na, nb]`` from each table of ``a [na, R]`` to each of ``b [nb,
    R]`` (rows of rank-content indices, ``member [S, E]``), over every way to give ``b``'s
    rank contents to the physical ranks: a rank keeps the experts its old and new contents
    share and changes one slot per expert it gains."""
    R = a.shape[1]
    K = int(member[0].sum())
    shared = (member @ member.T).astype(np.int64)  # [S, S]: experts two rank contents share
    kept = np.zeros((len(a), len(b)), dtype=np.int64)
    for order in itertools.permutations(range(R)):
        kept = np.maximum(kept, shared[a[:, None, :], b[None, :, list(order)]].sum(axis=-1))
    return R * K - kept


def path_bound(windows: np.ndarray, num_ranks: int, slots_per_rank: int, fit: float) -> int:
    """Fewest changed slots, summed over the ``W - 1`` updates, of any sequence of tables
    for one layer whose ``w``-th table's peak on ``windows[w]`` (``[W, E]``) is at most
    that window's best possible peak over ``fit``."""
    member, choices = rank_contents(windows.shape[1], num_ranks, slots_per_rank)
    fitting = [fitting_tables(w, num_ranks, slots_per_rank, fit) for w in windows]
    cost = np.zeros(len(fitting[0]), dtype=np.int64)  # cheapest path ending at each table
    for before, after in itertools.pairwise(fitting):
        cost = (cost[:, None] + transition_moves(choices[before], choices[after], member)).min(axis=0)
    return int(cost.min())


def swift_steady(shape_name: str, trace: np.ndarray) -> tuple[float, float]:
    """``swift``'s steady moves (fraction of slots per update after the first) and worst
    per-layer exact fit over the fitted windows of ``trace [W, T, L, E]``."""
    shape = SHAPES[shape_name]
    W, _, L, E = trace.shape
    swift = create_policy("swift")
    table = default_table(L, shape.ranks, shape.slots_per_rank, E)
    moves, fits = [], []
    for w in range(W - 1):
        new = swift.rebalance_experts(table, expert_to_slot_load(table, trace[w])).new_table
        window = trace[w].sum(axis=0)
        best = np.array([table_peaks(x, shape.ranks, shape.slots_per_rank).min() for x in window])
        fits.append(best / rank_load(new, window).max(axis=1))
        moves.append(changed_slots(table, new).mean() / shape.slots)
        table = new
    return float(np.mean(moves[1:])), float(np.min(fits))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="mixtral-8e-ep4x3", choices=sorted(SHAPES))
    parser.add_argument("--fits", default="0.99,0.995", help="comma-separated per-layer fits to hold")
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--windows", type=int, default=6)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None, help="write the result here")
    args = parser.parse_args(argv)

    shape = SHAPES[args.shape]
    fits = [float(f) for f in args.fits.split(",")]
    rows = []
    for skew, s in SKEWS.items():
        trace = drifting_trace(shape.experts, args.layers, args.windows, 32, 256 * shape.ranks, shape.top_k, s,
                               seed=args.seed)
        fitted = trace[:-1].sum(axis=1)  # [W - 1, L, E]: the windows policies are fitted on
        updates = (fitted.shape[0] - 1) * args.layers  # steady updates: after the first
        row = {"shape": args.shape, "skew": skew}
        for fit in fits:
            total = sum(path_bound(fitted[:, layer], shape.ranks, shape.slots_per_rank, fit)
                        for layer in range(args.layers))
            row[f"bound_at_fit_{fit}"] = round(total / updates / shape.slots, 4)
        row["swift_moves"], row["swift_worst_fit"] = (round(v, 4) for v in swift_steady(args.shape, trace))
        rows.append(row)
        print(f"{args.shape} {skew:<9} fewest steady moves any policy can make, every layer within 1 / fit of its "
              f"best peak: " + ", ".join(f"fit {f}: {row[f'bound_at_fit_{f}']:.3f}" for f in fits)
              + f"; swift {row['swift_moves']:.3f} (worst layer fit {row['swift_worst_fit']:.4f})", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"params": vars(args), "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
