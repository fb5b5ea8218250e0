"""PNG plots of a policy benchmark run (``benchmarks/policies.py``); needs matplotlib."""

from __future__ import annotations

import os
import statistics

__all__ = ["draw"]


def draw(rows: list[dict], summary: list[dict], outdir: str) -> list[str]:
    """Write ``realized_imbalance.png`` (per policy per shape, mean over skews) and
    ``moves_vs_imbalance.png`` (suite means); returns the paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(outdir, exist_ok=True)
    ok = [r for r in rows if "error" not in r]
    shapes = list(dict.fromkeys(r["shape"] for r in ok))
    policies = [s["policy"] for s in summary if "realized_imbalance" in s]
    kinds = {s["policy"]: s["kind"] for s in summary}
    colors = plt.get_cmap("tab10")

    fig, ax = plt.subplots(figsize=(13, 5.5))
    width = 0.8 / len(policies)
    for p, name in enumerate(policies):
        values = [statistics.fmean([r["realized_imbalance"] for r in ok if r["shape"] == s and r["policy"] == name]
                                   or [float("nan")]) for s in shapes]
        ax.bar([x + (p - len(policies) / 2 + 0.5) * width for x in range(len(shapes))], values, width,
               label=name, color="lightgrey" if kinds[name] == "reference" else colors(p % 10),
               hatch={"ours": None, "peer": "//", "reference": ".."}[kinds[name]],
               edgecolor="black", linewidth=0.4)
    ax.set_xticks(range(len(shapes)), shapes)
    ax.set_ylabel("realized imbalance (max / mean rank load per step)")
    ax.set_ylim(1.0, None)
    ax.axhline(1.10, color="grey", linestyle="--", linewidth=0.8)
    ax.set_title("Realized imbalance on the next window, mean over skews (lower is better; hatched: peers, "
                 "dotted grey: hindsight and per-step bound)")
    ax.legend(ncol=3, fontsize=8)
    fig.tight_layout()
    bars = os.path.join(outdir, "realized_imbalance.png")
    fig.savefig(bars, dpi=110)
    plt.close(fig)

    # Left: every policy; right: the same points zoomed on the best-balanced cluster, where
    # most policies sit within a few tenths of a percent of each other.
    points = [s for s in summary if "moves_steady" in s]
    fig, (ax, zoom) = plt.subplots(1, 2, figsize=(14, 6), gridspec_kw={"width_ratios": [1, 1.3]})
    for p, s in enumerate(points):
        for a in (ax, zoom):
            a.scatter(s["moves_steady"], s["realized_imbalance"], s=80, color=colors(p % 10),
                      marker="o" if s["kind"] == "ours" else "s", edgecolors="black",
                      label=s["policy"] if a is zoom else None)
    best = min(s["realized_imbalance"] for s in points)
    zoom.set_ylim(best - 0.002, best * 1.015)
    zoom.set_title("zoom: within 1.5 % of the best realized imbalance")
    zoom.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.set_title("Weight moves vs balance (down-left is better;\ncircles: ours, squares: peers)")
    for a in (ax, zoom):
        a.set_xlabel("moves per update (fraction of slots, after the first update)")
        a.set_ylabel("realized imbalance, suite mean")
        a.grid(alpha=0.3)
    fig.tight_layout()
    scatter = os.path.join(outdir, "moves_vs_imbalance.png")
    fig.savefig(scatter, dpi=110)
    plt.close(fig)
    return [bars, scatter]
