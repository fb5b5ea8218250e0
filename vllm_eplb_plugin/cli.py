"""``vllm-eplb``: plan expert maps offline, inspect them, list and check policies."""

from __future__ import annotations

import argparse
import json
import os
import stat
import sys
import time
import traceback

import numpy as np

from .metrics import imbalance
from .placement import (
    InvalidExpertTable,
    changed_slots,
    default_table,
    load_expert_map,
    logcnt,
    num_experts_of,
    save_expert_map,
)
from .policy import PolicyConfig
from .registry import PolicyLoadError, PolicyNotFound, available_policies, load_policy_class


class CliError(Exception):
    """A user error: printed as one line, exit status 2."""


class PolicyFailed(Exception):
    """The policy itself raised: printed with its traceback, exit status 1."""


MAX_JSON_HEAT_BYTES = 256 << 20
"""A JSON heat file larger than this is refused (use .npy for long per-step series)."""


def _regular_file(path: str, what: str) -> None:
    try:
        st = os.stat(path)
    except OSError as exc:
        raise CliError(f"cannot read {what} {path!r}: {exc.strerror}") from exc
    if not stat.S_ISREG(st.st_mode):
        raise CliError(f"{what} {path!r} is not a regular file; give a .json or .npy file")
    if path.lower().endswith(".json") and st.st_size > MAX_JSON_HEAT_BYTES:
        raise CliError(f"{what} {path!r} is {st.st_size >> 20} MiB, over the {MAX_JSON_HEAT_BYTES >> 20} MiB a JSON "
                       "heat file may have; save long series as .npy")


def load_heat(path: str) -> np.ndarray:
    """Read expert heat ``[L, E]`` or per-step ``[T, L, E]`` from .json (a nested list, or
    an object with a "heat" list) or .npy; values must be finite and non-negative."""
    ext = os.path.splitext(path)[1].lower()
    if ext not in (".json", ".npy"):
        raise CliError(f"heat file {path!r} must end in .json or .npy")
    _regular_file(path, "heat file")
    try:
        if ext == ".npy":
            # Memory-mapped, so a header that claims more data than the file holds fails
            # here instead of allocating it.
            heat = np.load(path, allow_pickle=False, mmap_mode="r")
            if not isinstance(heat, np.ndarray):
                raise CliError(f"heat file {path!r} is a .npz archive, not one array; save it with numpy.save")
            heat = np.array(heat)
        else:
            with open(path, encoding="utf-8") as f:
                doc = json.load(f)
            heat = np.asarray(doc["heat"] if isinstance(doc, dict) and "heat" in doc else doc)
    except CliError:
        raise
    except (OSError, ValueError, EOFError, RecursionError) as exc:
        raise CliError(f"cannot read heat file {path!r}: {type(exc).__name__}: {exc}") from exc
    if heat.dtype.kind not in "iuf" or heat.ndim not in (2, 3) or 0 in heat.shape:
        raise CliError(
            f"heat file {path!r} must hold numbers shaped [layers, experts] or [steps, layers, experts]; "
            f"got dtype {heat.dtype}, shape {list(heat.shape)}"
        )
    heat = heat.astype(np.float64)
    if not np.all(np.isfinite(heat)) or np.any(heat < 0):
        raise CliError(f"heat file {path!r} holds negative, NaN or infinite values")
    return heat


def _layer_table(before: np.ndarray, after: np.ndarray, moved: np.ndarray) -> str:
    rows = [f"{'layer':>5} {'imbalance':>10} {'-> planned':>10} {'slots moved':>11}"]
    rows += [f"{l:>5} {before[l]:>10.3f} {after[l]:>10.3f} {moved[l]:>11d}" for l in range(before.shape[0])]
    return "\n".join(rows)


def cmd_plan(args: argparse.Namespace) -> int:
    heat = load_heat(args.heat)
    E = heat.shape[-1]
    L = heat.shape[-2]
    S = E + args.redundant
    if S % args.ranks:
        raise CliError(
            f"{E} experts + {args.redundant} redundant = {S} slots do not split evenly over {args.ranks} ranks; "
            f"use --redundant {args.redundant + (-S) % args.ranks} or another --ranks"
        )
    K = S // args.ranks
    if args.current:
        current = load_expert_map(args.current)
        if current.shape != (L, args.ranks, K) or num_experts_of(current) != E:
            raise CliError(
                f"--current map has shape {list(current.shape)} with {num_experts_of(current)} experts; the heat "
                f"and flags need [{L}, {args.ranks}, {K}] with {E} experts"
            )
    else:
        current = default_table(L, args.ranks, K, E)
    config = PolicyConfig(num_nodes=args.nodes, num_groups=args.groups, max_move=args.max_move)
    cls = load_policy_class(_policy_arg(args.policy))
    label = cls.name or cls.__name__
    start = time.perf_counter()
    try:  # inputs are checked: from here on, an exception is the policy's
        policy = cls(config)
        result = policy.plan(current, heat)  # heat per expert, [L, E] or [T, L, E]
    except Exception as exc:  # reported with its traceback
        raise PolicyFailed(f"policy {label!r} raised {type(exc).__name__}: {exc}") from exc
    elapsed = time.perf_counter() - start
    save_expert_map(args.output, result.new_table)
    total = heat if heat.ndim == 2 else heat.sum(axis=0)
    before, after = imbalance(current, total), imbalance(result.new_table, total)
    print(_layer_table(before, after, changed_slots(current, result.new_table)))
    print(
        f"policy {type(policy).name or type(policy).__name__}: {L} layers, {args.ranks} ranks x {K} slots, {E} experts "
        f"+ {args.redundant} redundant; mean imbalance {before.mean():.3f} -> {after.mean():.3f}; "
        f"{elapsed * 1000:.1f} ms; wrote {args.output}"
    )
    return 0


def _record_section(path: str) -> dict | None:
    """The ``"eplb"`` section the serving plugin adds to a record file, if any."""
    with open(path, encoding="utf-8") as f:
        section = json.load(f).get("eplb")
    return section if isinstance(section, dict) else None


def cmd_inspect(args: argparse.Namespace) -> int:
    table = load_expert_map(args.expert_map)
    L, R, K = table.shape
    E = num_experts_of(table)
    counts = logcnt(table, E)
    print(f"{args.expert_map}: {L} layers, {R} ranks x {K} slots = {R * K} slots, {E} experts, {R * K - E} redundant")
    record = _record_section(args.expert_map)
    if record is not None:
        print(
            f"recorded by the serving plugin: plan {record.get('plan')} at step {record.get('step')}, policy "
            f"{record.get('policy')}, heat window {record.get('heat_window')}, layers changed "
            f"{record.get('layers_changed')}, {record.get('slots_moved')} slots moved, policy time "
            f"{1e3 * float(record.get('policy_seconds', 0)):.1f} ms"
        )
        before, after = record.get("balancedness_before"), record.get("balancedness_after")
        if isinstance(before, list) and isinstance(after, list) and before and len(before) == len(after):
            print(f"{'layer':>5} {'balancedness before':>19} {'-> after (predicted)':>20}")
            for l, (b, a) in enumerate(zip(before, after, strict=True)):
                print(f"{l:>5} {b:>19.3f} {a:>20.3f}")
    heat = None
    if args.heat:
        heat = load_heat(args.heat)
    elif record is not None and "heat" in record:
        heat = np.asarray(record["heat"], dtype=np.float64)
        print("heat: the planning window recorded with this map")
    if heat is not None:
        heat = heat if heat.ndim == 2 else heat.sum(axis=0)
        if heat.shape != (L, E):
            raise CliError(f"heat has shape {list(heat.shape)}; this map needs [{L}, {E}]")
        score = imbalance(table, heat)
    print(f"{'layer':>5} {'replicated experts':>18} {'max replicas':>12}"
          + (f" {'imbalance':>10} {'balancedness':>12}" if heat is not None else ""))
    for l in range(L):
        row = f"{l:>5} {int((counts[l] > 1).sum()):>18d} {int(counts[l].max()):>12d}"
        if heat is not None:
            row += f" {score[l]:>10.3f} {1 / score[l]:>12.3f}"
        print(row)
    if heat is not None:
        print(f"mean imbalance {score.mean():.3f} (max rank load / mean rank load; 1.000 is perfect)")
    return 0


def cmd_policies(args: argparse.Namespace) -> int:
    status = 0
    for name in available_policies():
        try:
            cls = load_policy_class(name)
        except PolicyLoadError as exc:
            print(f"{name:<16} BROKEN  {exc}")
            status = 1
            continue
        doc = (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else ""
        print(f"{name:<16} {cls.__module__}.{cls.__qualname__}  {doc}")
        for key, opt in cls.OPTIONS.items():
            print(f"{'':<18}option {key} (default {opt.default!r}): {opt.help}")
    return status


def cmd_conformance(args: argparse.Namespace) -> int:
    from .conformance import run_conformance

    # Always in a child process: a policy that exits, is killed or hangs fails a property
    # with a report, instead of ending this command with its own exit code.
    report = run_conformance(_policy_arg(args.policy), examples=args.examples, time_budget=args.time_budget,
                             case_timeout=args.case_timeout)
    print(report.format())
    return 0 if report.ok else 1


def cmd_demo(args: argparse.Namespace) -> int:
    from .engine.demo import run_demo

    return run_demo(args.workdir, port=args.port, requests=args.requests, tp=args.tp)


def _policy_arg(value: str | None) -> str | int | None:
    return int(value) if value is not None and value.isdigit() else value


def _count(minimum: int):
    """argparse type: an integer >= ``minimum`` (and at most 2**20, far above any deployment)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if not minimum <= value <= 1 << 20:
            raise argparse.ArgumentTypeError(f"{value} is not in [{minimum}, {1 << 20}]")
        return value

    return parse


def _seconds(text: str) -> float:
    """argparse type: a positive, finite number of seconds."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"{value} is not a positive number of seconds")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vllm-eplb", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("plan", help="heat file -> expert map JSON (vLLM Ascend format)")
    p.add_argument("--heat", required=True, help="[L, E] or [T, L, E] heat, .json or .npy")
    p.add_argument("--ranks", type=_count(1), required=True, help="expert-parallel ranks R")
    p.add_argument("--redundant", type=_count(0), default=0, help="redundant slots in all (default 0)")
    p.add_argument("--nodes", type=_count(1), default=1, help="server nodes (default 1)")
    p.add_argument("--groups", type=_count(1), default=1, help="expert groups (default 1)")
    p.add_argument("--policy", default=None, help="policy name, number or module:Class (default: the default policy)")
    p.add_argument("--max-move", type=_count(0), default=None, help="max slots changed per layer")
    p.add_argument("--current", default=None, help="current expert map (default: vLLM's initial placement)")
    p.add_argument("-o", "--output", required=True, help="expert map JSON to write")
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser(
        "inspect", help="per-layer replicas and balance of an expert map (or of a record file the plugin wrote)"
    )
    p.add_argument("expert_map")
    p.add_argument("--heat", default=None, help="[L, E] or [T, L, E] heat, .json or .npy")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("policies", help="list installed policies and their options")
    p.set_defaults(func=cmd_policies)

    p = sub.add_parser("demo", help="real `vllm serve` of a tiny MoE with the plugin on, skewed traffic, what EPLB did")
    p.add_argument("--workdir", default=".cache/demo", help="model, logs and the recorded map (default .cache/demo)")
    p.add_argument("--port", type=int, default=8765, help="HTTP port (default 8765)")
    p.add_argument("--requests", type=int, default=32, help="requests to send (default 32)")
    p.add_argument("--tp", type=int, default=2, help="tensor-parallel ranks (default 2)")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("conformance", help="run the conformance suite on a policy")
    p.add_argument("policy", help="registered name or package.module:Class")
    p.add_argument("--examples", type=int, default=100, help="generated cases per property (default 100)")
    p.add_argument("--time-budget", type=float, default=2.0, help="seconds allowed per call (default 2)")
    p.add_argument("--case-timeout", type=_seconds, default=None,
                   help="seconds one case may take before the policy's process is killed "
                        "(default 3 x time budget + 10)")
    p.set_defaults(func=cmd_conformance)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except PolicyFailed as exc:
        traceback.print_exception(exc.__cause__, file=sys.stderr)
        print(f"vllm-eplb {args.command}: {exc} (a bug in the policy, not in the input)", file=sys.stderr)
        return 1
    except (CliError, InvalidExpertTable, PolicyNotFound, PolicyLoadError, ValueError, TypeError, OSError) as exc:
        print(f"vllm-eplb {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
