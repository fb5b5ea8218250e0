"""Cost of the heat collector on decode steps, with and without the plugin, same run.

1. Real engine: the tiny Qwen3-MoE under `vllm serve` (TP=2, eager), plugin off then on
   (dynamic_eplb off, so only the collector differs); decode time per output token from
   single-request generations, median of the repeats.
2. The collector alone at a decode step: begin_step + L x count + end_step on a
   DeepSeek-V3-like shape (58 layers, 256 experts, top-8, 64 decode tokens), CPU.

    python -m benchmarks.collector_overhead [--repeats 5] [--tokens 128] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from vllm_eplb_plugin.engine.demo import VllmServer, build_tiny_moe, complete
from vllm_eplb_plugin.heat import HeatCounter


def engine_ms_per_token(model: Path, workdir: Path, *, plugin: bool, repeats: int, tokens: int, port: int) -> float:
    config = {"eplb": {"dynamic_eplb": False}} if plugin else None
    name = "on" if plugin else "off"
    with VllmServer(model, port=port, log=workdir / f"serve-{name}.log", additional_config=config) as server:
        complete(server, [1, 2, 3], 8)  # warm-up
        per_token = []
        for i in range(repeats):
            start = time.perf_counter()
            out = complete(server, [5 + i, 6, 7, 8], tokens)
            per_token.append((time.perf_counter() - start) / out["completion_tokens"] * 1e3)
    return statistics.median(per_token)


def collector_us_per_step(layers: int = 58, experts: int = 256, top_k: int = 8, rows: int = 64, iters: int = 200) -> float:
    counter = HeatCounter(layers, experts, max_rows=1024)
    ids = [torch.randint(0, experts, (rows, top_k)) for _ in range(layers)]
    real = torch.ones(rows, dtype=torch.bool)
    def step() -> None:
        counter.begin_step(real)
        for l in range(layers):
            counter.count(l, ids[l])
        counter.end_step()
    for _ in range(10):
        step()
    start = time.perf_counter()
    for _ in range(iters):
        step()
    return (time.perf_counter() - start) / iters * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--port", type=int, default=18477)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model = build_tiny_moe(work / "tiny-qwen3-moe")
        off = engine_ms_per_token(model, work, plugin=False, repeats=args.repeats, tokens=args.tokens, port=args.port)
        on = engine_ms_per_token(model, work, plugin=True, repeats=args.repeats, tokens=args.tokens, port=args.port)
    micro = collector_us_per_step()
    rows = {
        "engine_ms_per_token_off": round(off, 3),
        "engine_ms_per_token_on": round(on, 3),
        "engine_overhead_ratio": round(on / off - 1, 4),
        "collector_us_per_step_v3_shape": round(micro, 1),
    }
    print(f"{'measure':<40} {'value':>10}")
    print(f"{'decode ms/token, plugin off (tiny, TP=2)':<40} {off:>10.3f}")
    print(f"{'decode ms/token, plugin on':<40} {on:>10.3f}")
    print(f"{'overhead (on / off - 1)':<40} {100 * (on / off - 1):>9.2f}%")
    print(f"{'collector alone, V3 shape, us/step':<40} {micro:>10.1f}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
