"""Cost of the heat collector on decode steps, with and without the plugin, same run.

1. Real engine: the tiny Qwen3-MoE under `vllm serve` (TP=2, eager), plugin off and on
   (dynamic_eplb off, so only the collector differs), alternated over several rounds
   (off-on, on-off, ...) so that drift and start order hit both alike; decode time per output token
   from single-request generations, median over all repeats of each side.
2. Inside the engine, same server: a benchmark-only ``sitecustomize`` (never shipped)
   times the plugin's per-step work in each worker (arm, count per layer, disarm) against
   the decode step (start of one step's forward to the next: the engine step the issue's
   target is about) and against the forward pass alone (stricter). Precise where the A/B
   above drowns in the noise of four processes sharing two cores; the timers' own cost
   counts as the plugin's.
3. The collector alone at a decode step: begin_step + L x count + end_step on a
   DeepSeek-V3-like shape (58 layers, 256 experts, top-8, 64 decode tokens), CPU.

    python -m benchmarks.collector_overhead [--rounds 3] [--repeats 5] [--tokens 128] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from vllm_eplb_plugin.engine.demo import VllmServer, build_tiny_moe, complete
from vllm_eplb_plugin.heat import HeatCounter

# Loaded into every process of the "on" server through PYTHONPATH. Wraps the plugin's
# per-step entry points with timers and writes each worker's per-step times every 50 steps.
_TIMING_SITECUSTOMIZE = """
import json, os, time
from vllm_eplb_plugin.engine import vllm_worker
from vllm_eplb_plugin import heat

_steps = {"ours_us": [], "forward_us": [], "period_us": []}
_now = {"begin": None, "ours": 0.0}

def _timed(fn, start=False, stop=False):
    def wrapper(*args, **kwargs):
        t0 = time.perf_counter()
        if start:
            if _now["begin"] is not None:  # start to start: the whole engine step
                _steps["period_us"].append((t0 - _now["begin"]) * 1e6)
            _now["begin"], _now["ours"] = t0, 0.0
        out = fn(*args, **kwargs)
        t1 = time.perf_counter()
        _now["ours"] += t1 - t0
        if stop:
            _steps["ours_us"].append(_now["ours"] * 1e6)
            _steps["forward_us"].append((t1 - _now["begin"]) * 1e6)
            if len(_steps["ours_us"]) % 50 == 0:
                with open(os.path.join(os.environ["EPLB_TIMING_DIR"], f"{os.getpid()}.json"), "w") as f:
                    json.dump(_steps, f)
        return out
    return wrapper

vllm_worker.WorkerEplb.begin_step = _timed(vllm_worker.WorkerEplb.begin_step, start=True)
vllm_worker.WorkerEplb.end_step = _timed(vllm_worker.WorkerEplb.end_step, stop=True)
heat.HeatCounter.count = _timed(heat.HeatCounter.count)
"""


def engine_ms_per_token(
    model: Path, workdir: Path, *, plugin: bool, repeats: int, tokens: int, port: int, env: dict[str, str] | None = None
) -> list[float]:
    config = {"eplb": {"dynamic_eplb": False}} if plugin else None
    name = "on" if plugin else "off"
    with VllmServer(model, port=port, log=workdir / f"serve-{name}.log", additional_config=config, env=env) as server:
        complete(server, [1, 2, 3], 8)  # warm-up
        per_token = []
        for i in range(repeats):
            start = time.perf_counter()
            out = complete(server, [5 + i, 6, 7, 8], tokens)
            per_token.append((time.perf_counter() - start) / out["completion_tokens"] * 1e3)
    return per_token


def engine_self_timed(model: Path, workdir: Path, *, repeats: int, tokens: int, port: int) -> dict[str, float]:
    """Plugin on, timers in the workers: the plugin's share of the forward time."""
    site, timing = workdir / "site", workdir / "timing"
    site.mkdir(exist_ok=True)
    timing.mkdir(exist_ok=True)
    (site / "sitecustomize.py").write_text(_TIMING_SITECUSTOMIZE)
    env = {"PYTHONPATH": f"{site}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", "EPLB_TIMING_DIR": str(timing)}
    engine_ms_per_token(model, workdir, plugin=True, repeats=repeats, tokens=tokens, port=port, env=env)
    workers = [json.loads(f.read_text()) for f in timing.glob("*.json")]
    if not workers:
        raise RuntimeError(f"no worker wrote timings into {timing}; see {workdir / 'serve-on.log'}")
    # Medians: the first step of each new shape pays one-time kernel set-up (seconds).
    ours = statistics.median(v for w in workers for v in w["ours_us"])
    forward = statistics.median(v for w in workers for v in w["forward_us"])
    step = statistics.median(v for w in workers for v in w["period_us"])
    steps = sum(len(w["ours_us"]) for w in workers)
    return {"workers": len(workers), "steps": steps, "ours_us_per_step": ours, "forward_us_per_step": forward,
            "step_us": step, "ratio_of_step": ours / step, "ratio_of_forward": ours / forward}


def collector_us_per_step(
    layers: int = 58, experts: int = 256, top_k: int = 8, rows: int = 64, iters: int = 200, traced: bool = False
) -> float:
    counter = HeatCounter(layers, experts, max_rows=1024, top_k=top_k, traced=traced)
    ids = [torch.randint(0, experts, (rows, top_k)) for _ in range(layers)]
    def step() -> None:
        counter.begin_step(rows)
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
    ap.add_argument("--rounds", type=int, default=3, help="off/on server pairs")
    ap.add_argument("--repeats", type=int, default=5, help="generations per server")
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--port", type=int, default=18477)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model = build_tiny_moe(work / "tiny-qwen3-moe")
        samples: dict[bool, list[float]] = {False: [], True: []}
        for r in range(args.rounds):
            for plugin in ((False, True) if r % 2 == 0 else (True, False)):  # ABBA: order effects cancel
                got = engine_ms_per_token(model, work, plugin=plugin, repeats=args.repeats, tokens=args.tokens,
                                          port=args.port)
                samples[plugin] += got
                print(f"round {r + 1}/{args.rounds} plugin {'on ' if plugin else 'off'}: "
                      f"{statistics.median(got):.3f} ms/token (min {min(got):.3f})", flush=True)
        timed = engine_self_timed(model, work, repeats=args.repeats, tokens=args.tokens, port=args.port)
    off, on = statistics.median(samples[False]), statistics.median(samples[True])
    micro = collector_us_per_step()
    micro_traced = collector_us_per_step(traced=True)
    tiny = collector_us_per_step(layers=2, experts=8, top_k=2, rows=1)
    rows = {
        "engine_ms_per_token_off": round(off, 3),
        "engine_ms_per_token_on": round(on, 3),
        "engine_overhead_ratio": round(on / off - 1, 4),
        "engine_samples_ms_per_token": {
            "off": [round(v, 3) for v in samples[False]], "on": [round(v, 3) for v in samples[True]],
        },
        "engine_self_timed": {k: round(v, 5) for k, v in timed.items()},
        "collector_us_per_step_tiny": round(tiny, 1),
        "collector_us_per_step_v3_shape": round(micro, 1),
        "collector_us_per_step_v3_shape_traced_path": round(micro_traced, 1),
    }
    print(f"{'measure':<40} {'value':>10}")
    print(f"{'decode ms/token, plugin off (tiny, TP=2)':<40} {off:>10.3f}")
    print(f"{'decode ms/token, plugin on':<40} {on:>10.3f}")
    print(f"{'overhead (on / off - 1)':<40} {100 * (on / off - 1):>9.2f}%")
    print(f"{'in engine: plugin us/step (median)':<40} {timed['ours_us_per_step']:>10.1f}")
    print(f"{'in engine: forward us/step (median)':<40} {timed['forward_us_per_step']:>10.1f}")
    print(f"{'in engine: decode step us (median)':<40} {timed['step_us']:>10.1f}")
    print(f"{'in engine: plugin share of decode step':<40} {100 * timed['ratio_of_step']:>9.2f}%")
    print(f"{'in engine: plugin share of forward':<40} {100 * timed['ratio_of_forward']:>9.2f}%")
    print(f"{'collector alone, tiny model, us/step':<40} {tiny:>10.1f}")
    print(f"{'collector alone, V3 shape, us/step':<40} {micro:>10.1f}")
    print(f"{'  same, traced path (arm/disarm ops)':<40} {micro_traced:>10.1f}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
