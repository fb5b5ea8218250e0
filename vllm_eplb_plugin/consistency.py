"""Check that every rank holds the same expert table, with one small all-gather.

A rank that routes with a different table than its peers sends tokens to experts that
are not where it thinks they are: outputs go silently wrong. So the table is verified
across the EP ranks at start-up and before every update.

The digests travel as CPU int64 tensors, so the group must have a CPU backend: gloo, or
a group whose backend config maps ``cpu`` (``"cpu:gloo,cuda:nccl"``), e.g. vLLM's
``GroupCoordinator.cpu_group``. An NCCL- or HCCL-only group refuses CPU tensors; the
functions here say so up front (:func:`require_cpu_group`) and :func:`cpu_group_for`
gives the gloo group to use instead.

Shapes: table ``[L, R, K]``; per-layer digests ``[L]``; ``B`` tables checked together.
"""

from __future__ import annotations

import hashlib
import weakref
from collections import Counter
from typing import Sequence

import numpy as np
import torch
import torch.distributed as dist


class InconsistentExpertTable(RuntimeError):
    """Ranks disagree about the expert table; the message names them and the first layer."""


def _digest(data: bytes) -> int:
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little", signed=True)


def layer_digests(table: np.ndarray) -> np.ndarray:
    """One int64 digest per layer of ``table [L, R, K]`` -> ``[L]``."""
    table = np.ascontiguousarray(table, dtype=np.int64)
    return np.array([_digest(layer.tobytes()) for layer in table], dtype=np.int64)


def table_summary(table: np.ndarray) -> np.ndarray:
    """``[L, R, K, digest of the whole table]`` as int64 ``[4]``: what ranks compare first."""
    table = np.ascontiguousarray(table, dtype=np.int64)
    return np.array([*table.shape, _digest(table.tobytes())], dtype=np.int64)


def _all_gather(values: np.ndarray, group: dist.ProcessGroup | None) -> np.ndarray:
    """All-gather a 1-D int64 array of equal length on every rank -> ``[W, n]`` (CPU tensors)."""
    local = torch.from_numpy(np.ascontiguousarray(values, dtype=np.int64))
    world = dist.get_world_size(group)
    out = [torch.empty_like(local) for _ in range(world)]
    dist.all_gather(out, local, group=group)
    return torch.stack(out).numpy()


# Backends whose plain name (a config without ``device:``) means they carry CPU tensors.
_CPU_BACKENDS = ("gloo", "mpi")


def cpu_backend_of(config: str) -> str | None:
    """The backend that carries CPU tensors in a backend config as
    ``dist.get_backend_config`` writes it (``"cpu:gloo,cuda:nccl"`` -> ``"gloo"``,
    ``"cuda:nccl"`` -> None), or in a plain backend name (``"gloo"``)."""
    config = config.strip().lower()
    if ":" not in config:
        return config if config in _CPU_BACKENDS else None
    for pair in config.split(","):
        device, _, backend = pair.partition(":")
        if device.strip() == "cpu":
            return backend.strip()
    return None


def require_cpu_group(group: dist.ProcessGroup | None, what: str = "expert-table consistency check") -> None:
    """Raise ``ValueError`` unless ``group`` (default: the world) can all-gather CPU
    tensors, naming its backend and the fix; an NCCL/HCCL group would refuse them
    mid-step with an error that says nothing about which group or why."""
    config = dist.get_backend_config(group)
    if cpu_backend_of(config) is None:
        raise ValueError(
            f"{what}: process group backend {dist.get_backend(group)!r} ({config}) cannot carry CPU tensors, "
            "and the expert-table check all-gathers CPU int64. Pass a CPU group over the same ranks: "
            "dist.new_group(ranks, backend='gloo'), or vLLM's GroupCoordinator.cpu_group."
        )


# group -> its gloo twin; weak keys, so a destroyed group's twin goes with it.
_cpu_twins: "weakref.WeakKeyDictionary[dist.ProcessGroup, dist.ProcessGroup]" = weakref.WeakKeyDictionary()


def cpu_group_for(group: dist.ProcessGroup | None) -> dist.ProcessGroup | None:
    """A group over the ranks of ``group`` (default: the world) that carries CPU tensors:
    ``group`` itself when it can, else a gloo group created once per ``group`` and reused.

    Creating one is ``dist.new_group``, a collective of the *whole world*: the first call
    for a non-CPU group must happen at the same point on every process of the world."""
    if cpu_backend_of(dist.get_backend_config(group)) is not None:
        return group
    key = group if group is not None else dist.group.WORLD
    assert key is not None  # the default group exists once torch.distributed is initialised
    twin = _cpu_twins.get(key)
    if twin is None:
        twin = dist.new_group(ranks=group_ranks(group), backend="gloo")
        _cpu_twins[key] = twin
    return twin


def group_ranks(group: dist.ProcessGroup | None) -> list[int]:
    """Global ranks of ``group`` in group-rank order (names in errors are global ranks)."""
    if group is None:
        return list(range(dist.get_world_size()))
    return [dist.get_global_rank(group, i) for i in range(dist.get_world_size(group))]


def _reference(rows: list[tuple[int, ...]]) -> tuple[int, ...]:
    """The value most ranks hold; ties go to the lowest rank's value."""
    counts = Counter(rows)
    best = max(counts.values())
    return next(r for r in rows if counts[r] == best)


def verify_consistency(
    table: np.ndarray,
    group: dist.ProcessGroup | None = None,
    *,
    what: str = "expert table",
    extra: Sequence[int] = (),
) -> np.ndarray:
    """Raise :class:`InconsistentExpertTable` on every rank unless all hold ``table``.

    ``table [L, R, K]``. One all-gather of 4 int64 when the ranks agree; one more of
    ``[L]`` digests to find the first layer that differs when they do not. The majority
    table is the reference; the error lists the (global) ranks that differ from it.

    ``group`` must carry CPU tensors (gloo, or a CPU group such as vLLM's
    ``GroupCoordinator.cpu_group``); an NCCL/HCCL-only group raises ``ValueError`` naming
    its backend. ``extra`` ``[n]`` ints ride along in the same all-gather (e.g. how far
    each rank has staged an update); returns them from every rank, ``[W, n]``.
    """
    return verify_consistency_many([table], group, whats=[what], extra=extra)


def verify_consistency_many(
    tables: Sequence[np.ndarray],
    group: dist.ProcessGroup | None = None,
    *,
    whats: Sequence[str],
    extra: Sequence[int] = (),
) -> np.ndarray:
    """:func:`verify_consistency` for ``B`` tables (``[L_b, R_b, K_b]`` each, e.g. one per
    MoE block) in one all-gather of ``4 * B + n`` int64; ``whats[b]`` names table ``b`` in
    errors. Every rank passes the same number of tables and ``extra`` ints. The first
    table that differs is reported (every rank gathers the same rows, so every rank raises
    for the same table). Returns ``extra`` from every rank, ``[W, n]``."""
    if len(whats) != len(tables):
        raise ValueError(
            f"verify_consistency_many: {len(tables)} tables but {len(whats)} names; pass one name per table."
        )
    require_cpu_group(group)
    ranks = group_ranks(group)
    local = np.concatenate([*(table_summary(t) for t in tables), np.asarray(extra, dtype=np.int64).reshape(-1)])
    gathered = _all_gather(local, group)  # [W, 4 * B + n]
    for b, (table, what) in enumerate(zip(tables, whats, strict=True)):
        _raise_if_differ(gathered[:, 4 * b:4 * b + 4], table, group, ranks, what)
    return gathered[:, 4 * len(tables):]


def _raise_if_differ(
    summaries: np.ndarray, table: np.ndarray, group: dist.ProcessGroup | None, ranks: list[int], what: str
) -> None:
    """Raise :class:`InconsistentExpertTable` unless every rank's ``summaries [W, 4]`` row
    (:func:`table_summary`) is the same; this rank's ``table [L, R, K]`` is digested per
    layer (one more all-gather) to name the first layer that differs."""
    rows = [tuple(int(v) for v in row) for row in summaries]
    ref = _reference(rows)
    odd = [ranks[i] for i, row in enumerate(rows) if row != ref]
    if not odd:
        return
    holders = [ranks[i] for i, row in enumerate(rows) if row == ref]
    shapes = {tuple(row[:3]) for row in rows}
    if len(shapes) > 1:
        per_rank = ", ".join(f"rank {ranks[i]}: {list(row[:3])}" for i, row in enumerate(rows))
        raise InconsistentExpertTable(
            f"{what} differs across ranks: shapes [L, R, K] differ ({per_rank}); ranks {odd} "
            f"disagree with ranks {holders}. Every rank must load the same expert_map_path."
        )
    digests = _all_gather(layer_digests(table), group)
    ref_layers = digests[rows.index(ref)]
    differing = np.nonzero((digests != ref_layers).any(axis=0))[0]
    raise InconsistentExpertTable(
        f"{what} differs across ranks: ranks {odd} disagree with ranks {holders}; first "
        f"layer that differs: {int(differing[0])} ({len(differing)} of {table.shape[0]} "
        "layers differ). Every rank must load the same expert_map_path and apply the same plans."
    )
