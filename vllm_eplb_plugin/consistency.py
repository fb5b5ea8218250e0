"""Check that every rank holds the same expert table, with one small all-gather.

A rank that routes with a different table than its peers sends tokens to experts that
are not where it thinks they are: outputs go silently wrong. So the table is verified
across the EP ranks at start-up and before every update, on any torch.distributed
backend (gloo, nccl, hccl).

Shapes: table ``[L, R, K]``; per-layer digests ``[L]``.
"""

from __future__ import annotations

import hashlib
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
    """All-gather a 1-D int64 array of equal length on every rank -> ``[W, n]``."""
    local = torch.from_numpy(np.ascontiguousarray(values, dtype=np.int64))
    world = dist.get_world_size(group)
    out = [torch.empty_like(local) for _ in range(world)]
    dist.all_gather(out, local, group=group)
    return torch.stack(out).numpy()


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

    ``extra`` ``[n]`` ints ride along in the same all-gather (e.g. how far each rank has
    staged an update); returns them from every rank, ``[W, n]``.
    """
    ranks = group_ranks(group)
    gathered = _all_gather(np.concatenate([table_summary(table), np.asarray(extra, dtype=np.int64)]), group)
    rows = [tuple(int(v) for v in row[:4]) for row in gathered]
    ref = _reference(rows)
    odd = [ranks[i] for i, row in enumerate(rows) if row != ref]
    if not odd:
        return gathered[:, 4:]
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
