"""Run a function on W real gloo processes and collect what each returns.

    results = run_gloo(fn, world=4, args=(...))   # fn(rank, world, *args) -> picklable

Each process joins a fresh gloo group on a free loopback port before ``fn`` runs and
leaves it afterwards. An exception in any rank fails the call with that rank's traceback.
"""

from __future__ import annotations

import os
import socket
import traceback
from typing import Any, Callable

import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world: int, port: int, fn: Callable, args: tuple, results: Any) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        results[rank] = ("ok", fn(rank, world, *args))
    except BaseException:  # noqa: BLE001 - reported to the parent, which raises
        results[rank] = ("error", traceback.format_exc())
    finally:
        dist.destroy_process_group()


def run_gloo(fn: Callable, world: int, args: tuple = ()) -> list[Any]:
    """``fn(rank, world, *args)`` on ``world`` processes; returns their results by rank.
    ``fn`` must be importable (a module-level function of a test module)."""
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_entry, args=(world, free_port(), fn, args, results), nprocs=world, join=True)
        out = [results.get(r, ("error", "no result")) for r in range(world)]
    errors = [f"rank {r}:\n{body}" for r, (status, body) in enumerate(out) if status != "ok"]
    if errors:
        raise RuntimeError("\n".join(errors))
    return [body for _, body in out]
