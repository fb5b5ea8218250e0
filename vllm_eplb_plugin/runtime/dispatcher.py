"""``DynamicDispatcher``: one MoE block's local expert weights and placement on one rank.

Shapes: ``E`` logical experts, ``R`` EP ranks (``ep_size``), ``K`` local slots per rank
(``K0`` as constructed; ``(E + redundant) / R`` once the scheduler adds redundant slots),
``S = R * K`` physical slots (slot ``r * K + k`` is slot ``k`` of rank ``r``), ``X`` most
replicas of one expert, ``N`` token rows, ``k`` experts per token. The layer's table is
``[R, K]``.

Life of an update (the transfer pool's worker thread does the first two):

1. fetch the new weights into the spare buffers (:meth:`staging_buffers`), never into the
   weights the forward pass reads;
2. :meth:`stage` them with the new table;
3. on the forward path, once per step, :meth:`check_consistency_all` (one all-gather for
   all of a model's blocks; :meth:`check_consistency` for one block) verifies that every
   rank holds the same tables and sets :attr:`update_flag` once *every* rank has staged
   the update, so all ranks switch at the same step;
4. :meth:`update_module_weight_and_map` swaps the staged weights in; the old ones become
   the spare buffers of the next update (no allocation in steady state).

Modes: ``A2A`` routes with :meth:`to_physical` (logical ids -> physical slots, replicas
taking turns); ``AG`` multiplies scores by :meth:`get_expert_trans_tensor`; ``EX`` is
``A2A`` with the scheduler bounding slots changed per update (``max_move``).

The check's all-gather carries CPU int64, so it runs on a *control group* that has a CPU
backend (gloo): the EP group itself when it has one, else ``control_group`` (vLLM's
``GroupCoordinator.cpu_group``) or a gloo group over the same ranks, created once per EP
group. An NCCL/HCCL group refuses CPU tensors.
"""

from __future__ import annotations

import threading
from typing import NamedTuple, Sequence

import numpy as np
import torch
import torch.distributed as dist

from ..consistency import cpu_group_for, require_cpu_group, verify_consistency_many
from ..placement import changed_slots, expert_maps, log2phy, logcnt, validate_table


class DispatcherUpdate(NamedTuple):
    """What :meth:`DynamicDispatcher.update_module_weight_and_map` returns."""

    weight1: torch.Tensor
    """``[K, ...]`` this rank's new up-projection weights, row ``k`` for slot ``k``."""
    weight2: torch.Tensor
    """``[K, ...]`` this rank's new down-projection weights."""
    local_expert_num: int
    """``K``, slots on this rank."""
    device_indices_map: torch.Tensor
    """``int64 [E, X]``: physical slots of each expert (``-1`` padded)."""
    local_expert_indices_map: torch.Tensor
    """``int64 [E]``: local slot of each expert on this rank, ``-1`` where absent."""
    local_expert_list: list[int]
    """Logical expert in each local slot, ``[K]``."""


class _Staged(NamedTuple):
    seq: int
    table: np.ndarray  # [R, K]
    weights: tuple[torch.Tensor, torch.Tensor]


class DynamicDispatcher:
    """Owns a block's local expert weights and maps on this rank.

    Args:
        expert_num: ``E``.
        weight1, weight2: ``[K0, ...]`` local up / down projection weights, row ``k``
            holding the expert of local slot ``k``. The dispatcher owns them from now on:
            after an update, use the returned tensors (the old ones are reused as buffers).
        rank_in_group: this rank in the EP group.
        ep_size: ``R``.
        group: the EP process group (default: the world), any backend.
        control_group: a group over the same ranks that carries CPU tensors (gloo) for
            the consistency all-gather, e.g. vLLM's ``GroupCoordinator.cpu_group``.
            Default: ``group`` when it has a CPU backend, else a gloo group over its
            ranks, created by the first dispatcher of ``group`` (``dist.new_group``, a
            collective of the whole world: create it at the same point on every process).
        table: initial placement ``[R, K0]``; default: rank ``r`` holds experts
            ``r * K0 .. r * K0 + K0 - 1`` (needs ``R * K0 == E``).
    """

    def __init__(
        self,
        expert_num: int,
        weight1: torch.Tensor,
        weight2: torch.Tensor,
        rank_in_group: int,
        ep_size: int,
        *,
        group: dist.ProcessGroup | None = None,
        control_group: dist.ProcessGroup | None = None,
        table: np.ndarray | None = None,
    ) -> None:
        slots = weight1.shape[0]
        if weight2.shape[0] != slots:
            raise ValueError(
                f"DynamicDispatcher: weight1 has {slots} local experts but weight2 has {weight2.shape[0]}; "
                "both are [local_experts, ...] for the same slots."
            )
        if not 0 <= rank_in_group < ep_size:
            raise ValueError(f"DynamicDispatcher: rank_in_group={rank_in_group} is not in [0, ep_size={ep_size}).")
        if table is None:
            if slots * ep_size != expert_num:
                raise ValueError(
                    f"DynamicDispatcher: {ep_size} ranks x {slots} local experts != expert_num={expert_num}; "
                    "pass table=[ep_size, local_experts] to say which expert each slot holds."
                )
            table = np.arange(expert_num, dtype=np.int64).reshape(ep_size, slots)
        table = validate_table(np.asarray(table)[None], expert_num, name="DynamicDispatcher table")[0]
        if table.shape != (ep_size, slots):
            raise ValueError(
                f"DynamicDispatcher: table has shape {list(table.shape)}; "
                f"expected [ep_size, local_experts] = {[ep_size, slots]}."
            )
        self.expert_num, self.rank, self.ep_size, self.group = expert_num, rank_in_group, ep_size, group
        self._control_arg = control_group
        self._control: dist.ProcessGroup | None = None
        self._control_resolved = False
        if dist.is_initialized():  # resolve now, so a bad control_group fails here; else at the first check
            _ = self.control_group
        self.mode = "A2A"  # set by the transfer pool from the scheduler's mode
        self.name = "expert table"  # the pool names the block: errors say which one
        self.table = table
        self.weights = (weight1, weight2)
        self.seq = 0  # updates applied
        self.update_flag = False
        self.moves: list[int] = []  # slots changed by each applied plan
        self._spare: tuple[torch.Tensor, torch.Tensor] | None = None
        self._staged: _Staged | None = None
        self._lock = threading.Lock()
        self._applied = threading.Condition(self._lock)
        self._swap_event: torch.Event | None = None
        self._refresh_maps()

    # -- maps ---------------------------------------------------------------------------

    def _refresh_maps(self) -> None:
        device = self.weights[0].device
        layer = self.table[None]
        self.logcnt = torch.from_numpy(logcnt(layer, self.expert_num)[0]).to(device)  # [E]
        self.log2phy = torch.from_numpy(log2phy(layer, self.expert_num)[0]).to(device)  # [E, X]
        self.expert_map = torch.from_numpy(expert_maps(layer, self.expert_num)[0, self.rank]).to(device)  # [E]
        self._trans: torch.Tensor | None = None

    @property
    def control_group(self) -> dist.ProcessGroup | None:
        """The CPU group the consistency all-gather runs on (None: the world, a CPU one)."""
        if not self._control_resolved:
            self._control = _control_group(self.group, self._control_arg, self.ep_size)
            self._control_resolved = True
        return self._control

    @property
    def local_expert_num(self) -> int:
        return self.table.shape[1]

    @property
    def local_expert_list(self) -> list[int]:
        return self.table[self.rank].tolist()

    def to_physical(self, topk_ids: torch.Tensor) -> torch.Tensor:
        """A2A routing: ``topk_ids [N, k]`` logical -> ``int64 [N, k]`` physical slots.

        An expert's replicas take turns by token row (offset by rank, so ranks do not all
        start on the same replica): its tokens split evenly over its replicas. Destination
        rank is ``slot // K``, local slot ``slot % K``.
        """
        ids = topk_ids.long()
        rows = torch.arange(ids.shape[0], device=ids.device).unsqueeze(1) + self.rank
        return self.log2phy[ids, rows % self.logcnt[ids]]

    def get_expert_trans_tensor(self) -> torch.Tensor:
        """AG routing: ``float32 [E, S]`` with ``1 / replicas`` where slot ``s`` holds expert
        ``e``, so ``scores [N, E] @ M`` gives per-slot scores, replicas splitting an
        expert's score (their outputs add up to the expert's)."""
        if self._trans is None:
            flat = torch.from_numpy(self.table.reshape(-1)).to(self.logcnt.device)
            trans = torch.zeros(self.expert_num, flat.shape[0], dtype=torch.float32, device=flat.device)
            trans[flat, torch.arange(flat.shape[0], device=flat.device)] = 1.0 / self.logcnt[flat].float()
            self._trans = trans
        return self._trans

    # -- forward path ---------------------------------------------------------------------

    def check_consistency(self) -> None:
        """Verify every rank holds this block's table (one all-gather; raises
        :class:`~vllm_eplb_plugin.consistency.InconsistentExpertTable` naming the ranks) and
        set :attr:`update_flag` when every rank has staged the next update. A model with
        several blocks calls :meth:`check_consistency_all` once per step instead."""
        DynamicDispatcher.check_consistency_all([self])

    @staticmethod
    def check_consistency_all(dispatchers: Sequence[DynamicDispatcher]) -> None:
        """:meth:`check_consistency` for all of a model's blocks in *one* all-gather
        (``4 * B + B`` int64 for ``B`` blocks): call it once per step, before the first
        block's forward, with the same blocks in the same order on every rank; each
        block then reads its :attr:`update_flag`. The blocks share one control group."""
        if not dispatchers:
            return
        group = dispatchers[0].control_group
        if any(d.control_group is not group for d in dispatchers):
            raise ValueError(
                "DynamicDispatcher.check_consistency_all: the dispatchers have different control groups; "
                "one all-gather needs one group: pass the same control_group (or EP group) to every block."
            )
        staged = [d._staged_seq() for d in dispatchers]  # [B]
        gathered = verify_consistency_many(
            [d.table[None] for d in dispatchers], group, whats=[d.name for d in dispatchers], extra=staged
        )  # [W, B]
        for d, column in zip(dispatchers, gathered.T, strict=True):
            d.update_flag = bool((column == d.seq + 1).all())

    def _staged_seq(self) -> int:
        """Sequence number of the update this rank has staged, else of the one applied."""
        with self._lock:
            return self._staged.seq if self._staged is not None else self.seq

    def update_module_weight_and_map(self) -> DispatcherUpdate:
        """Switch to the staged update (only when :attr:`update_flag` is set, which is the
        same step on every rank) and return the new weights and maps."""
        if not self.update_flag:
            raise RuntimeError(
                "DynamicDispatcher: no update is ready on every rank; call check_consistency() each "
                "step and update only when update_flag is True."
            )
        with self._lock:
            assert self._staged is not None
            staged, self._staged = self._staged, None
            self._spare, self.weights = self.weights, staged.weights
            if staged.table.shape == self.table.shape:  # not the start-up switch to redundant slots
                self.moves.append(int(changed_slots(self.table[None], staged.table[None])[0]))
            self.table, self.seq = staged.table, staged.seq
            if self._spare[0].device.type != "cpu":
                # The transfer thread may refill the old weights only after the kernels
                # queued on them so far have run.
                self._swap_event = torch.Event(device=self._spare[0].device)
                self._swap_event.record()
            self._applied.notify_all()
        self.update_flag = False
        self._refresh_maps()
        return DispatcherUpdate(
            self.weights[0], self.weights[1], self.local_expert_num, self.log2phy, self.expert_map,
            self.local_expert_list,
        )

    # -- transfer side (the pool's worker thread) -----------------------------------------

    def wait_until_applied(self, timeout: float | None = None) -> bool:
        """Block until no staged update is pending (the previous one was swapped in)."""
        with self._applied:
            return self._applied.wait_for(lambda: self._staged is None, timeout)

    def staging_buffers(self, slots: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Buffers ``[slots, ...]`` to fetch the next weights into: the weights replaced by
        the last update, reused when their shape fits."""
        spare = self._spare
        if spare is None or spare[0].shape[0] != slots:
            spare = tuple(torch.empty((slots, *w.shape[1:]), dtype=w.dtype, device=w.device) for w in self.weights)
            self._spare = spare
        if self._swap_event is not None:
            self._swap_event.synchronize()
        return spare

    def stage(self, table: np.ndarray, weights: tuple[torch.Tensor, torch.Tensor]) -> None:
        """Offer ``table [R, K]`` with this rank's ``weights`` (``[K, ...]`` each) as the
        next update; it is applied once every rank has staged it."""
        with self._lock:
            if self._staged is not None:
                raise RuntimeError("DynamicDispatcher: an update is already staged; wait_until_applied() first.")
            self._staged = _Staged(self.seq + 1, table, weights)
            self._spare = None


def _control_group(
    group: dist.ProcessGroup | None, control_group: dist.ProcessGroup | None, ep_size: int
) -> dist.ProcessGroup | None:
    """The CPU group the consistency check gathers on (see :class:`DynamicDispatcher`)."""
    if control_group is None:
        return cpu_group_for(group)
    require_cpu_group(control_group, "DynamicDispatcher control_group")
    if dist.get_world_size(control_group) != ep_size:
        raise ValueError(
            f"DynamicDispatcher: control_group has {dist.get_world_size(control_group)} ranks but ep_size={ep_size}; "
            "it must span the EP group's ranks."
        )
    return control_group
