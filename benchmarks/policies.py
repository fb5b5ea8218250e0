"""Policy benchmark: ours against DeepSeek's reference, vLLM's and vLLM Ascend's policies,
all in one run, on synthetic drifting traces (``benchmarks/traces.py``).

Each policy runs as production runs it: starting from vLLM's linear table, it is fitted on
window ``w`` (the per-slot load its current table measured, ``[T, L, R, K]`` for policies
that take a series, else its sum ``[L, R, K]``), its table is applied, and it is scored on
window ``w + 1``. Metrics, per update, averaged over layers:

- realized imbalance: mean over the next window's steps of max rank load / mean rank load;
- fit ratio: lower bound / max rank load on the fitted window, with the lower bound
  ``max(total / R, min over replica counts of max_e load_e / count_e)``; where exhaustive
  search is cheap (``benchmarks/exact.py``: the Mixtral shape), also the exact fit, the
  best possible peak / max rank load (the lower bound is loose there);
- moves: slots whose expert changes / all slots (first update from the linear table
  reported apart from the steady-state updates that follow);
- moves floor: ranks whose load under the previous table exceeds the new table's peak, on
  the fitted window, / all slots. Each such rank must change at least one slot for the
  new peak to be reached, so no policy reaches that peak with fewer moves (a swap changes
  a slot on the hot rank and one on its partner: a swap-only policy needs about twice it);
- ms per call, and separately one call on the full DeepSeek-V3 shape (58 layers, EP32).

Two reference rows per trace say what realized imbalance is reachable: the optimal policy
fitted on the scored window itself (hindsight: drift costs it nothing), and the per-step
lower bound (no policy can beat it).

Peers are loaded at run time from their own code (see ``benchmarks/peers.py``).

    python -m benchmarks.policies [--quick] [--seed 0] [--json F] [--plots DIR]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
import warnings
from dataclasses import dataclass
from typing import Callable

import numpy as np

from vllm_eplb_plugin import PolicyConfig, create_policy
from vllm_eplb_plugin.placement import (
    InvalidExpertTable,
    changed_slots,
    default_table,
    expert_to_slot_load,
    num_experts_of,
    rank_load,
    slot_to_expert_load,
    validate_table,
)
from vllm_eplb_plugin.policies.search import lower_bound
from vllm_eplb_plugin.registry import DEFAULT_POLICY

from .exact import EXACT_LIMIT, best_peak, exact_tables
from .traces import SHAPES, SKEWS, Shape, drifting_trace, hottest_ratio

# A planner: (current table [L, R, K], slot series [T, L, R, K]) -> new table [L, R, K].
Planner = Callable[[np.ndarray, np.ndarray], np.ndarray]


@dataclass
class Contender:
    name: str
    kind: str  # "ours" or "peer"
    make: Callable[[Shape], Planner]  # a fresh (possibly stateful) planner per run


def _ours(name: str, max_move_fraction: float | None = None, **options) -> Callable[[Shape], Planner]:
    def make(shape: Shape) -> Planner:
        max_move = None if max_move_fraction is None else max(1, round(max_move_fraction * shape.slots))
        config = PolicyConfig(max_move=max_move, options=options)
        policy = create_policy(name, config)
        return lambda table, series: policy.rebalance_experts(table, series).new_table
    return make


def _seed_reference(shape: Shape) -> Planner:
    import torch

    from .peers import deepseek_reference

    fn = deepseek_reference()

    def plan(table, series):
        heat = slot_heat(table, series.sum(axis=0))
        phy2log = fn(torch.from_numpy(heat), shape.slots, 1, 1, shape.ranks)[0]
        return phy2log.numpy().reshape(table.shape)
    return plan


def _vllm_default(shape: Shape) -> Planner:
    import torch

    from .peers import vllm_default_policy

    cls = vllm_default_policy()

    def plan(table, series):
        heat = slot_heat(table, series.sum(axis=0))
        old = torch.from_numpy(table.reshape(table.shape[0], -1))
        return cls.rebalance_experts(torch.from_numpy(heat), shape.slots, 1, 1, shape.ranks, old).numpy().reshape(
            table.shape)
    return plan


def _ascend(label: str) -> Callable[[Shape], Planner]:
    def make(shape: Shape) -> Planner:
        import torch

        from .peers import ascend_policy

        policy = ascend_policy(label, devices_per_host=min(8, shape.ranks))
        takes_series = "FlashLB" in label

        def plan(table, series):
            workload = series if takes_series else series.sum(axis=0)
            changed, _, new = policy.rebalance_experts(torch.from_numpy(table), torch.from_numpy(workload))
            # vLLM Ascend's worker keeps the current table when the policy reports no change.
            return np.asarray(new, dtype=np.int64) if changed else table
        return plan
    return make


def contenders() -> list[Contender]:
    from .peers import ASCEND_POLICY_LABELS

    return [
        Contender("deepseek", "ours", _ours("deepseek")),
        Contender("optimal", "ours", _ours("optimal")),
        Contender("optimal pairing", "ours", _ours("optimal", pairing=True)),
        Contender("swift", "ours", _ours("swift")),
        Contender("flashlb", "ours", _ours("flashlb")),
        Contender("optimal max_move=5%", "ours", _ours("optimal", max_move_fraction=0.05)),
        Contender("DeepSeek reference (seed 003)", "peer", _seed_reference),
        Contender("vLLM DefaultEplbPolicy", "peer", _vllm_default),
        *(Contender(label, "peer", _ascend(label)) for label in ASCEND_POLICY_LABELS),
    ]


def slot_heat(table: np.ndarray, slot_load: np.ndarray) -> np.ndarray:
    """Per-expert load ``[L, E]`` from per-slot load ``[L, R, K]`` (what a peer taking
    logical-expert weights is given)."""
    return slot_to_expert_load(table, slot_load, num_experts_of(table))


def step_imbalance(table: np.ndarray, steps: np.ndarray) -> np.ndarray:
    """Max rank load / mean rank load per step and layer: ``steps [T, L, E]`` -> ``[T, L]``.
    A table holding an expert twice on one rank (peers allow it) is scored as it is."""
    loads = np.stack([rank_load(table, s) for s in steps])  # [T, L, R]
    mean = loads.mean(axis=-1)
    return np.divide(loads.max(axis=-1), mean, out=np.ones_like(mean), where=mean > 0)


def run_one(contender: Contender, shape: Shape, trace: np.ndarray, exact: np.ndarray | None = None) -> dict:
    """Fit on window w, score on w + 1, for every w. ``trace [W, T, L, E]``; ``exact
    [W - 1, L]``: the best possible peak of each fitted window and layer, if known."""
    W, T, L, E = trace.shape
    plan = contender.make(shape)
    table = default_table(L, shape.ranks, shape.slots_per_rank, E)
    realized, fit, fit_exact, moves, floor, ms, invalid = [], [], [], [], [], [], 0
    for w in range(W - 1):
        series = expert_to_slot_load(table, trace[w])  # [T, L, R, K], as the engine measures it
        start = time.perf_counter()
        new = np.asarray(plan(table, series), dtype=np.int64)
        ms.append((time.perf_counter() - start) * 1000)
        try:
            validate_table(new, E)
        except InvalidExpertTable:
            invalid += 1
        window = trace[w].sum(axis=0)
        peak = rank_load(new, window).max(axis=1)  # [L]
        fit.append(float(np.mean(lower_bound(window, shape.ranks, shape.slots) / peak)))
        if exact is not None:
            fit_exact.append(float(np.mean(exact[w] / peak)))
        moves.append(float(changed_slots(table, new).mean() / shape.slots))
        above = rank_load(table, window) > peak[:, None] * (1 + 1e-9)  # [L, R]
        floor.append(float(above.sum(axis=1).mean() / shape.slots))
        realized.append(float(step_imbalance(new, trace[w + 1]).mean()))
        table = new
    return {
        "realized_imbalance": statistics.fmean(realized),
        "fit_ratio": statistics.fmean(fit),
        **({"fit_exact": statistics.fmean(fit_exact)} if fit_exact else {}),
        "moves_first": moves[0],
        "moves_steady": statistics.fmean(moves[1:]) if len(moves) > 1 else moves[0],
        "moves_floor_steady": statistics.fmean(floor[1:]) if len(floor) > 1 else floor[0],
        "ms_per_call": statistics.median(ms),
        "invalid_tables": invalid,
        "updates": len(moves),
        "start_imbalance": float(step_imbalance(default_table(L, shape.ranks, shape.slots_per_rank, E),
                                                trace[0]).mean()),
    }


def best_peaks(shape: Shape, trace: np.ndarray) -> np.ndarray | None:
    """The best possible peak ``[W - 1, L]`` of every fitted window and layer of ``trace
    [W, T, L, E]`` by exhaustive search, or None where that is too large to score."""
    if exact_tables(shape.experts, shape.ranks, shape.slots_per_rank) > EXACT_LIMIT:
        return None
    windows = trace[:-1].sum(axis=1)  # [W - 1, L, E]
    return np.array([[best_peak(w, shape.ranks, shape.slots_per_rank) for w in layers] for layers in windows])


def references(shape: Shape, trace: np.ndarray) -> dict[str, float]:
    """Realized imbalance on the windows the contenders are scored on (``trace
    [W, T, L, E]``, windows 1..W-1) of

    - ``hindsight``: the optimal policy fitted on the scored window itself. A reference,
      not a bound: it knows the future, so the drift between windows costs it nothing,
      and only the per-step noise inside the window remains;
    - ``per-step lower bound``: a bound no policy can beat, the lower bound of each scored
      step on its own, as if the table were re-placed every step knowing its counts.
    """
    W, T, L, E = trace.shape
    policy = create_policy("optimal")
    start = default_table(L, shape.ranks, shape.slots_per_rank, E)
    hindsight, bound = [], []
    for w in range(1, W):
        fitted = policy.rebalance_experts(start, expert_to_slot_load(start, trace[w].sum(axis=0))).new_table
        hindsight.append(float(step_imbalance(fitted, trace[w]).mean()))
        mean = trace[w].sum(axis=2) / shape.ranks  # [T, L]
        bound.append(float(np.mean([lower_bound(step, shape.ranks, shape.slots) for step in trace[w]] / mean)))
    return {"hindsight (optimal fitted on the scored window)": statistics.fmean(hindsight),
            "per-step lower bound": statistics.fmean(bound)}


def time_full_shape(contenders: list[Contender], trace: np.ndarray, repeat: int) -> dict[str, dict | str]:
    """Fastest of ``repeat`` calls per contender, in ms, on DeepSeek-V3's full shape (58
    layers, EP32): ``first``, from vLLM's linear table (a fresh planner each time), and
    ``steady``, from the contender's own plan for the previous window. ``trace [2, T, 58,
    256]``. Round-robin (every contender once per round), and the fastest, not the median:
    on a shared 2-core machine other work only adds time, in bursts of seconds that timed
    each contender's calls back to back would pin on one contender (the median of 7 moved
    by up to 40 % between runs). A contender that raises is reported by its error."""
    shape = SHAPES["deepseek-v3-ep32"]
    start = default_table(trace.shape[2], shape.ranks, shape.slots_per_rank, shape.experts)
    first_series = expert_to_slot_load(start, trace[0])
    first: dict[str, list[float]] = {c.name: [] for c in contenders}
    steady: dict[str, list[float]] = {c.name: [] for c in contenders}
    failed: dict[str, str] = {}
    last: dict[str, tuple[Planner, np.ndarray, np.ndarray]] = {}  # planner, its table, the next window on it
    for _ in range(repeat):
        for c in contenders:
            if c.name in failed:
                continue
            try:
                plan = c.make(shape)
                t0 = time.perf_counter()
                table = np.asarray(plan(start, first_series), dtype=np.int64)
                first[c.name].append((time.perf_counter() - t0) * 1000)
            except Exception as exc:  # noqa: BLE001 - a peer that cannot handle the shape is reported, not fatal
                failed[c.name] = f"{type(exc).__name__}: {exc}"[:200]
                continue
            last[c.name] = (plan, table, expert_to_slot_load(table, trace[1]))
    for _ in range(repeat):
        for c in contenders:
            if c.name in failed:
                continue
            plan, table, series = last[c.name]
            try:
                t0 = time.perf_counter()
                plan(table, series)
                steady[c.name].append((time.perf_counter() - t0) * 1000)
            except Exception as exc:  # noqa: BLE001 - as above
                failed[c.name] = f"{type(exc).__name__}: {exc}"[:200]
    return {c.name: failed.get(c.name) or {"first": round(min(first[c.name]), 2),
                                           "steady": round(min(steady[c.name]), 2)} for c in contenders}


FULL_SHAPE_SKEWS = ("moderate", "extreme")
"""Heats the full-shape timing runs on: realistic (hottest expert ~9x the mean) and the
physical extreme (~31x)."""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seed", type=int, default=0, help="seed of the traces (default 0)")
    parser.add_argument("--layers", type=int, default=8, help="layers per trace (layers are independent)")
    parser.add_argument("--windows", type=int, default=6, help="windows per trace (updates = windows - 1)")
    parser.add_argument("--steps", type=int, default=32, help="steps per window")
    parser.add_argument("--tokens-per-rank", type=int, default=256,
                        help="tokens per step per rank (a step routes tokens x ranks x top-k pairs)")
    parser.add_argument("--drift", type=float, default=0.15, help="std of the log-popularity step between windows")
    parser.add_argument("--jitter", type=float, default=0.1, help="std of the per-step log-popularity noise")
    parser.add_argument("--shapes", default=",".join(SHAPES), help="comma-separated subset of " + ",".join(SHAPES))
    parser.add_argument("--only", default=None, help="comma-separated contender names (default: all)")
    parser.add_argument("--full-repeat", type=int, default=7,
                        help="calls timed on the full DeepSeek-V3 shape (the fastest is reported)")
    parser.add_argument("--quick", action="store_true", help="2 layers, 3 windows, 8 steps: a smoke run")
    parser.add_argument("--json", default=None, help="write all results here")
    parser.add_argument("--plots", default=None, help="write PNG plots into this directory")
    args = parser.parse_args(argv)
    if args.quick:
        args.layers, args.windows, args.steps, args.full_repeat = 2, 3, 8, 1

    import torch

    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    runs = contenders()
    if args.only:
        wanted = set(args.only.split(","))
        runs = [c for c in runs if c.name in wanted]
    rows = []
    for shape_name in args.shapes.split(","):
        shape = SHAPES[shape_name]
        for skew, s in SKEWS.items():
            hottest = round(hottest_ratio(shape.experts, shape.top_k, s), 2)
            trace = drifting_trace(shape.experts, args.layers, args.windows, args.steps,
                                   args.tokens_per_rank * shape.ranks, shape.top_k, s, args.drift, args.jitter,
                                   seed=args.seed)
            exact = best_peaks(shape, trace)
            for c in runs:
                try:
                    result = run_one(c, shape, trace, exact)
                except Exception as exc:  # noqa: BLE001 - a peer that cannot handle a shape is reported, not fatal
                    result = {"error": f"{type(exc).__name__}: {exc}"[:200]}
                rows.append({"shape": shape_name, "skew": skew, "hottest": hottest, "policy": c.name, "kind": c.kind,
                             **result})
                _print_row(rows[-1])
            for name, value in references(shape, trace).items():
                rows.append({"shape": shape_name, "skew": skew, "policy": name, "kind": "reference",
                             "realized_imbalance": value})
                print(f"{shape_name:<18} {skew:<9} {name[:30]:<30} realized {value:.4f}", flush=True)
    full: dict[str, dict] = {c.name: {} for c in runs}
    for skew in FULL_SHAPE_SKEWS:
        full_trace = drifting_trace(256, 58, 2, 4, 256 * 32, 8, SKEWS[skew], args.drift, args.jitter, seed=args.seed)
        for name, result in time_full_shape(runs, full_trace, args.full_repeat).items():
            full[name][skew] = result
    summary = summarize(rows, full)
    cases = per_case(rows)
    print_cases(cases)
    print_summary(summary)
    print_full_shape(full)
    params = {k: v for k, v in vars(args).items() if k not in ("json", "plots", "only")}
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"params": params, "machine": platform.machine(), "python": sys.version.split()[0],
                       "summary": summary, "cases": cases, "full_shape_ms": full, "rows": rows}, f, indent=1)
    if args.plots:
        from .plots import draw

        for path in draw(rows, summary, args.plots):
            print(f"wrote {path}")
    return 0


def _print_row(r: dict) -> None:
    if "error" in r:
        print(f"{r['shape']:<18} {r['skew']:<9} {r['policy']:<30} ERROR {r['error']}", flush=True)
        return
    print(f"{r['shape']:<18} {r['skew']:<9} {r['policy']:<30} realized {r['realized_imbalance']:.4f}  "
          f"fit {r['fit_ratio']:.4f}  moves {r['moves_first']:.3f}/{r['moves_steady']:.3f}  "
          f"{r['ms_per_call']:8.2f} ms  invalid {r['invalid_tables']}"
          + (f"  exact fit {r['fit_exact']:.4f}" if "fit_exact" in r else ""), flush=True)


def per_case(rows: list[dict]) -> list[dict]:
    """One line per (shape, skew): the default policy and ``optimal`` beside the best peer
    of that case. ``gap`` is the default's realized imbalance over the best peer's, minus 1
    (negative: ours is better)."""
    out = []
    for shape, skew in dict.fromkeys((r["shape"], r["skew"]) for r in rows):
        here = {r["policy"]: r for r in rows if r["shape"] == shape and r["skew"] == skew and "error" not in r}
        peers = [r for r in here.values() if r["kind"] == "peer"]
        mine = here.get(DEFAULT_POLICY)
        if not mine or not peers:
            continue
        best = min(peers, key=lambda r: r["realized_imbalance"])
        line = {"shape": shape, "skew": skew, "hottest": mine["hottest"],
                "default_realized": round(mine["realized_imbalance"], 4), "default_fit": round(mine["fit_ratio"], 4),
                "default_moves": round(mine["moves_steady"], 4),
                "default_moves_floor": round(mine["moves_floor_steady"], 4), "best_peer": best["policy"],
                "best_peer_realized": round(best["realized_imbalance"], 4),
                "gap": round(mine["realized_imbalance"] / best["realized_imbalance"] - 1, 4)}
        if "optimal" in here:
            line["optimal_fit"] = round(here["optimal"]["fit_ratio"], 4)
        if "fit_exact" in mine:  # the lower bound is loose here: fit against the best possible table
            line["default_fit_exact"] = round(mine["fit_exact"], 4)
            if "optimal" in here:
                line["optimal_fit_exact"] = round(here["optimal"]["fit_exact"], 4)
        out.append(line)
    return out


def print_cases(cases: list[dict]) -> None:
    head = (f"{'shape':<19} {'skew':<9} {'hot':>5} {DEFAULT_POLICY + ' realized':>16} {'fit':>7} {'moves':>6} "
            f"{'floor':>6} "
            f"{'best peer':<28} {'realized':>8} {'gap':>7} {'optimal fit':>11}")
    print("\n" + head + "\n" + "-" * len(head))
    for c in cases:
        opt = c.get("optimal_fit")
        flag = "  <- peer ahead by > 2 %" if c["gap"] > 0.02 else ""
        if "default_fit_exact" in c:
            flag += (f"  (exact fit: {DEFAULT_POLICY} {c['default_fit_exact']:.4f}, "
                     f"optimal {c.get('optimal_fit_exact', float('nan')):.4f})")
        print(f"{c['shape']:<19} {c['skew']:<9} {c['hottest']:5.1f} {c['default_realized']:16.4f} "
              f"{c['default_fit']:7.4f} {c['default_moves']:6.3f} {c['default_moves_floor']:6.3f} "
              f"{c['best_peer'][:28]:<28} "
              f"{c['best_peer_realized']:8.4f} {c['gap']:+7.2%} {'' if opt is None else f'{opt:11.4f}'}{flag}")


def summarize(rows: list[dict], full: dict) -> list[dict]:
    """One line per policy: suite means, worst-shape fit ratio, full-shape time."""
    out = []
    for name in dict.fromkeys(r["policy"] for r in rows):
        mine = [r for r in rows if r["policy"] == name]
        ok = [r for r in mine if "error" not in r]
        line = {"policy": name, "kind": mine[0]["kind"], "cases": len(mine), "errors": len(mine) - len(ok),
                "full_shape_ms": full.get(name)}
        if ok and mine[0]["kind"] == "reference":
            line["realized_imbalance"] = round(statistics.fmean(r["realized_imbalance"] for r in ok), 4)
        elif ok:
            line.update({
                "realized_imbalance": round(statistics.fmean(r["realized_imbalance"] for r in ok), 4),
                "fit_ratio": round(statistics.fmean(r["fit_ratio"] for r in ok), 4),
                "worst_fit_ratio": round(min(r["fit_ratio"] for r in ok), 4),
                "moves_first": round(statistics.fmean(r["moves_first"] for r in ok), 4),
                "moves_steady": round(statistics.fmean(r["moves_steady"] for r in ok), 4),
                "ms_per_call": round(statistics.fmean(r["ms_per_call"] for r in ok), 2),
                "invalid_tables": sum(r["invalid_tables"] for r in ok),
            })
        out.append(line)
    return out


def print_summary(summary: list[dict]) -> None:
    head = (f"{'policy':<30} {'realized':>9} {'fit':>7} {'worst fit':>9} {'moves 1st':>9} {'moves':>7} "
            f"{'ms/call':>8} {'invalid':>7} {'errors':>6}")
    print("\n" + head + "\n" + "-" * len(head))
    for s in summary:
        if "realized_imbalance" not in s:
            print(f"{s['policy']:<30} failed on every case")
            continue
        if s["kind"] == "reference":
            what = "a bound: no policy beats it" if "bound" in s["policy"] else "knows the scored window"
            print(f"{s['policy'][:30]:<30} {s['realized_imbalance']:9.4f}   ({what})")
            continue
        print(f"{s['policy']:<30} {s['realized_imbalance']:9.4f} {s['fit_ratio']:7.4f} {s['worst_fit_ratio']:9.4f} "
              f"{s['moves_first']:9.3f} {s['moves_steady']:7.3f} {s['ms_per_call']:8.2f} "
              f"{s['invalid_tables']:7d} {s['errors']:6d}")


def print_full_shape(full: dict[str, dict]) -> None:
    """ms per call on DeepSeek-V3 EP32 (58 layers), first call and steady state, per heat."""
    head = f"{'DeepSeek-V3 EP32, 58 layers':<30}" + "".join(
        f"{skew + ' 1st / steady ms':>28}" for skew in FULL_SHAPE_SKEWS
    )
    print("\n" + head + "\n" + "-" * len(head))
    for name, by_skew in full.items():
        cells = [f"{v['first']:10.1f} / {v['steady']:<8.1f}" if isinstance(v, dict) else "error"
                 for v in (by_skew.get(skew) for skew in FULL_SHAPE_SKEWS)]
        print(f"{name:<30}" + "".join(f"{c:>28}" for c in cells))


if __name__ == "__main__":
    raise SystemExit(main())
