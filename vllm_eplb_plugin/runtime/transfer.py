"""Move expert weights from an old placement to a new one with the fewest transfers.

Shapes: one layer's tables ``old [R, K0]`` and ``new [R, K1]`` (logical expert per slot,
``R`` ranks); a rank's weights ``[K, ...]`` per tensor (row ``k`` = its slot ``k``).

A new slot whose expert the rank already holds is a local copy; every other slot is one
remote fetch, so the fetches are exactly the (rank, expert) pairs new to a rank. Each
fetch is served by the holder with the fewest sends so far (then the nearest on the ring),
which spreads a hot expert's copies over its replicas. The plan is pure numpy and
deterministic: every rank computes the same one, so the send and receive orders match.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
import torch.distributed as dist

from ..placement import num_experts_of, validate_table


@dataclass(frozen=True)
class TransferPlan:
    """How every rank builds its new weights from the old ones.

    - ``local`` ``int64 [n_local, 3]``: ``(rank, src_slot, dst_slot)`` copies inside a rank.
    - ``remote`` ``int64 [n_remote, 5]``: ``(src_rank, dst_rank, expert, src_slot, dst_slot)``.
    """

    local: np.ndarray
    remote: np.ndarray
    old_slots: int
    new_slots: int

    @property
    def num_remote(self) -> int:
        return len(self.remote)


def plan_transfers(old: np.ndarray, new: np.ndarray) -> TransferPlan:
    """The fewest-fetch plan from ``old [R, K0]`` to ``new [R, K1]`` (valid tables of the
    same experts and ranks)."""
    old = validate_table(np.asarray(old)[None], name="old table")[0]
    new = validate_table(np.asarray(new)[None], name="new table")[0]
    if old.shape[0] != new.shape[0] or num_experts_of(old[None]) != num_experts_of(new[None]):
        raise ValueError(
            f"old table {list(old.shape)} over {num_experts_of(old[None])} experts and new table "
            f"{list(new.shape)} over {num_experts_of(new[None])} experts: a transfer keeps the ranks and experts."
        )
    ranks = old.shape[0]
    slot_of = [{int(e): k for k, e in enumerate(row)} for row in old]  # rank -> expert -> old slot
    holders: dict[int, list[int]] = {}
    for r in range(ranks):
        for e in old[r]:
            holders.setdefault(int(e), []).append(r)
    sends = np.zeros(ranks, dtype=np.int64)
    local, remote = [], []
    for r in range(ranks):
        for k, e in enumerate(new[r].tolist()):
            if e in slot_of[r]:
                local.append((r, slot_of[r][e], k))
                continue
            src = min(holders[e], key=lambda h: (sends[h], (r - h) % ranks, h))
            sends[src] += 1
            remote.append((src, r, e, slot_of[src][e], k))
    return TransferPlan(
        np.array(local, dtype=np.int64).reshape(-1, 3),
        np.array(remote, dtype=np.int64).reshape(-1, 5),
        old.shape[1],
        new.shape[1],
    )


def _check_buffers(plan: TransferPlan, sources: Sequence[torch.Tensor], targets: Sequence[torch.Tensor]) -> None:
    if len(sources) != len(targets) or not sources:
        raise ValueError(
            f"execute_transfers: {len(sources)} source and {len(targets)} target tensors; "
            "pass one of each per weight."
        )
    for i, (src, dst) in enumerate(zip(sources, targets, strict=True)):
        if src.shape[0] != plan.old_slots or dst.shape[0] != plan.new_slots or src.shape[1:] != dst.shape[1:]:
            raise ValueError(
                f"execute_transfers: weight {i}: source {list(src.shape)} and target {list(dst.shape)} do not fit "
                f"the plan ([{plan.old_slots}, ...] -> [{plan.new_slots}, ...], same trailing dims)."
            )
        if src.untyped_storage().data_ptr() == dst.untyped_storage().data_ptr():
            raise ValueError(
                f"execute_transfers: weight {i}: the target shares storage with the source; fetch into a "
                "separate buffer, the source is still read by the forward pass and by other ranks."
            )


def execute_transfers(
    plan: TransferPlan,
    rank: int,
    sources: Sequence[torch.Tensor],
    targets: Sequence[torch.Tensor],
    group: dist.ProcessGroup | None = None,
) -> None:
    """Fill every slot of ``targets[i] [K1, ...]`` from ``sources[i] [K0, ...]`` (read only)
    and the other ranks' sources, with one ``batch_isend_irecv``. ``rank`` is this rank's
    index in ``group``. Receives land directly in the target rows: no allocation."""
    _check_buffers(plan, sources, targets)
    def peer(r: int) -> int:  # P2POp takes global ranks
        return r if group is None else dist.get_global_rank(group, r)

    ops = []
    for n, (src, dst, _, src_slot, dst_slot) in enumerate(plan.remote.tolist()):
        if rank not in (src, dst):
            continue
        for i, (source, target) in enumerate(zip(sources, targets, strict=True)):
            tag = n * len(sources) + i  # one tag per message: pairs match whatever the backend's ordering
            if rank == src:
                ops.append(dist.P2POp(dist.isend, source[src_slot], peer(dst), group, tag))
            else:
                ops.append(dist.P2POp(dist.irecv, target[dst_slot], peer(src), group, tag))
    works = dist.batch_isend_irecv(ops) if ops else []
    for src_slot, dst_slot in plan.local[plan.local[:, 0] == rank, 1:].tolist():
        for source, target in zip(sources, targets, strict=True):
            target[dst_slot].copy_(source[src_slot])
    for work in works:
        work.wait()
