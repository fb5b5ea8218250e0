"""DynamicDispatcher and ExpertLoadCollector: maps, A2A / AG routing, the staged swap
agreed across real gloo ranks, buffer reuse, the CPU control group, and one consistency
all-gather per step for all blocks."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.distributed as dist

from tests.helpers.gloo import run_gloo
from tests.test_consistency import register_nccl_like_backend
from vllm_eplb_plugin.consistency import InconsistentExpertTable
from vllm_eplb_plugin.runtime import DynamicDispatcher, ExpertLoadCollector
from vllm_eplb_plugin.runtime.toy_moe import ToyMoE

# 4 experts on 2 ranks x 3 slots: expert 0 has three replicas, expert 1 two.
TABLE = np.array([[0, 1, 2], [0, 3, 1]])
OTHER = np.array([[0, 1, 3], [2, 0, 1]])  # the same experts, moved


def _dispatcher(rank: int = 0, table: np.ndarray = TABLE, group=None) -> DynamicDispatcher:
    w1 = torch.arange(3 * 2, dtype=torch.float32).reshape(3, 2) + 10 * rank
    return DynamicDispatcher(4, w1, w1.clone(), rank, 2, table=table, group=group)


def test_default_table_is_contiguous_and_maps_match_it():
    w = torch.zeros(2, 5)
    d = DynamicDispatcher(8, w, w.clone(), 3, 4)
    assert d.table.tolist() == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert d.local_expert_list == [6, 7]
    assert d.expert_map.tolist() == [-1, -1, -1, -1, -1, -1, 0, 1]


def test_a2a_spreads_an_experts_tokens_evenly_over_its_replicas():
    d = _dispatcher()
    ids = torch.tensor([[0, 1]] * 60 + [[2, 3]] * 6)  # [N, k]
    phys = d.to_physical(ids)
    expert_of_slot = torch.from_numpy(TABLE.reshape(-1))
    assert torch.equal(expert_of_slot[phys], ids), "every token reaches a slot holding its expert"
    zero = torch.bincount(phys[:60, 0], minlength=6)
    assert zero[[0, 3]].tolist() == [30, 30]  # expert 0 lives in slots 0 and 3: half each
    one = torch.bincount(phys[:60, 1], minlength=6)
    assert one[[1, 5]].tolist() == [30, 30]


def test_ag_matrix_splits_scores_over_replicas():
    d = _dispatcher()
    m = d.get_expert_trans_tensor()  # [E, S]
    expected = torch.tensor([
        [0.5, 0, 0, 0.5, 0, 0],
        [0, 0.5, 0, 0, 0, 0.5],
        [0, 0, 1, 0, 0, 0],
        [0, 0, 0, 0, 1, 0],
    ])
    assert torch.equal(m, expected)
    scores = torch.tensor([[0.7, 0.3, 0.0, 0.0]])
    assert torch.allclose((scores @ m).reshape(2, 3).sum(), scores.sum())


def test_bad_construction_is_named():
    w = torch.zeros(3, 2)
    with pytest.raises(ValueError, match="weight1 has 3 local experts but weight2 has 2"):
        DynamicDispatcher(6, w, torch.zeros(2, 2), 0, 2)
    with pytest.raises(ValueError, match=r"2 ranks x 3 local experts != expert_num=8"):
        DynamicDispatcher(8, w, w, 0, 2)
    with pytest.raises(ValueError, match=r"rank_in_group=2 is not in \[0, ep_size=2\)"):
        DynamicDispatcher(6, w, w, 2, 2)
    with pytest.raises(ValueError, match="rank 1 holds logical expert 0 twice"):
        DynamicDispatcher(4, w, w, 0, 2, table=np.array([[0, 1, 2], [0, 3, 0]]))


def test_collector_reports_each_round_and_keeps_totals():
    c = ExpertLoadCollector(4, lb_interval=2)
    rounds = []
    c.sink = lambda rnd, load: rounds.append((rnd, load.tolist()))
    for ids in ([[0, 1]], [[0, 2], [3, 0]], [[1, 1]]):
        c.collect_expert_load(torch.tensor(ids))
    assert rounds == [(0, [3, 1, 1, 1])]  # two calls make a round; the third waits
    c.collect_expert_load(torch.tensor([0, 0, 0]))  # the expanded [N * k] form
    assert rounds[1] == (1, [3, 2, 0, 0])
    assert c.total_load().tolist() == [6, 3, 1, 1]
    with pytest.raises(ValueError, match="lb_interval=0 must be a positive int"):
        ExpertLoadCollector(4, lb_interval=0)


def _swap_ranks(rank: int, world: int, scenario: str) -> dict:
    d = _dispatcher(rank)
    first_weights = d.weights[0]
    out = {}
    d.check_consistency()
    out["flag_before"] = d.update_flag
    buffers = d.staging_buffers(3)
    buffers[0].fill_(rank + 100)
    buffers[1].fill_(rank + 200)
    if scenario == "all" or rank == 0:
        d.stage(OTHER, buffers)
    d.check_consistency()
    out["flag_staged"] = d.update_flag
    if d.update_flag:
        update = d.update_module_weight_and_map()
        out["weights"] = update.weight1[0, 0].item()
        out["list"] = update.local_expert_list
        out["reused"] = d.staging_buffers(3)[0] is first_weights  # the old weights are the next buffers
    if scenario == "diverge":
        d.name = "expert table of MoE block 3"  # what the pool calls it
        if rank == 1:
            d.table = TABLE[::-1].copy()
    try:
        d.check_consistency()
        out["consistent"] = True
    except InconsistentExpertTable as exc:
        out["consistent"] = str(exc)
    return out


def test_ranks_switch_together_and_reuse_buffers():
    results = run_gloo(_swap_ranks, 2, args=("all",))
    for rank, r in enumerate(results):
        assert r["flag_before"] is False and r["flag_staged"] is True
        assert r["weights"] == rank + 100 and r["list"] == OTHER[rank].tolist() and r["reused"]
        assert r["consistent"] is True


def test_no_rank_switches_until_every_rank_staged():
    results = run_gloo(_swap_ranks, 2, args=("one",))
    assert [r["flag_staged"] for r in results] == [False, False]
    assert all("weights" not in r for r in results)


def test_a_rank_with_another_table_is_named():
    results = run_gloo(_swap_ranks, 2, args=("diverge",))
    for r in results:
        assert r["consistent"].startswith("expert table of MoE block 3 differs across ranks: ranks [1] disagree "
                                          "with ranks [0]; first layer that differs: 0")


# -- control group and one gather per step ----------------------------------------------------


def _device_group_ranks(rank: int, world: int) -> dict:
    backend = register_nccl_like_backend()
    device_only = dist.new_group(list(range(world)), backend=backend)  # stands in for an NCCL EP group
    a, b = _dispatcher(rank, group=device_only), _dispatcher(rank, group=device_only)
    out = {"backend": dist.get_backend(a.control_group), "shared": a.control_group is b.control_group}
    buffers = b.staging_buffers(3)
    b.stage(OTHER, buffers)
    DynamicDispatcher.check_consistency_all([a, b])  # gathers on the gloo control group
    out["flags"] = [a.update_flag, b.update_flag]
    a.check_consistency()  # the per-block API too
    errors = []
    for ep_size, control in ((2, device_only), (1, dist.group.WORLD)):  # not CPU; 2 ranks for a 1-rank EP group
        try:
            DynamicDispatcher(3, torch.zeros(3, 2), torch.zeros(3, 2), rank % ep_size, ep_size,
                              table=np.arange(6).reshape(2, 3)[:ep_size] % 3, control_group=control)
        except ValueError as exc:
            errors.append(str(exc))
    c = _dispatcher(rank, group=None)  # the gloo world is its own control group
    out["world_own"] = c.control_group is None
    try:
        DynamicDispatcher.check_consistency_all([a, c])
    except ValueError as exc:
        errors.append(str(exc))
    out["errors"] = errors
    return out


def test_an_ep_group_without_cpu_backend_gets_a_gloo_control_group():
    for r in run_gloo(_device_group_ranks, 2):
        assert r["backend"] == "gloo" and r["shared"]
        assert r["flags"] == [False, True]
        assert r["world_own"]
        assert r["errors"] == [
            "DynamicDispatcher control_group: process group backend 'nccl_like' (cuda:nccl_like) cannot carry "
            "CPU tensors, and the expert-table check all-gathers CPU int64. Pass a CPU group over the same ranks: "
            "dist.new_group(ranks, backend='gloo'), or vLLM's GroupCoordinator.cpu_group.",
            "DynamicDispatcher: control_group has 2 ranks but ep_size=1; it must span the EP group's ranks.",
            "DynamicDispatcher.check_consistency_all: the dispatchers have different control groups; one "
            "all-gather needs one group: pass the same control_group (or EP group) to every block.",
        ]


class _CountGathers:
    """Counts ``dist.all_gather`` calls (the consistency check's collective) while active."""

    def __enter__(self) -> _CountGathers:
        self.calls, self._real = 0, dist.all_gather

        def counted(*args, **kwargs):
            self.calls += 1
            return self._real(*args, **kwargs)

        dist.all_gather = counted
        return self

    def __exit__(self, *exc) -> None:
        dist.all_gather = self._real


def _gathers_per_step(rank: int, world: int, blocks: int, steps: int) -> dict:
    model = ToyMoE(blocks, 8, 8, 4, 2, rank, world, seed=3)  # A2A: the forward itself uses all_to_all only
    for i, d in enumerate(model.dispatchers):
        d.name = f"expert table of MoE block {i}"  # what the pool calls them
    x = torch.randn(6, 8, generator=torch.Generator().manual_seed(rank))
    with _CountGathers() as batched, torch.no_grad():
        for _ in range(steps):
            model(x)
    with _CountGathers() as per_block:
        for _ in range(steps):
            for d in model.dispatchers:  # what ToyMoE did before: each block checked itself
                d.check_consistency()
    # Stage block 1 on every rank and the last block on rank 0 only: one gather decides both.
    for b in (1, blocks - 1):
        d = model.dispatchers[b]
        if b == 1 or rank == 0:
            d.stage(d.table.copy(), tuple(w.clone() for w in d.weights))
    with _CountGathers() as staged:
        DynamicDispatcher.check_consistency_all(model.dispatchers)
    flags = [d.update_flag for d in model.dispatchers]
    model.dispatchers[1].update_module_weight_and_map()
    if rank == 1:
        model.dispatchers[2].table = model.dispatchers[2].table[::-1].copy()
    try:
        DynamicDispatcher.check_consistency_all(model.dispatchers)
        error = None
    except InconsistentExpertTable as exc:
        error = str(exc)
    return {"batched": batched.calls / steps, "per_block": per_block.calls / steps, "staged": staged.calls,
            "flags": flags, "error": error}


@pytest.mark.parametrize("blocks", [3, 8])
def test_one_gather_per_step_whatever_the_block_count(blocks):
    for r in run_gloo(_gathers_per_step, 2, args=(blocks, 3)):
        assert r["batched"] == 1 and r["staged"] == 1
        assert r["per_block"] == blocks  # the per-dispatcher API still works, one gather each
        assert r["flags"] == [False, True] + [False] * (blocks - 2)
        assert r["error"].startswith(
            "expert table of MoE block 2 differs across ranks: ranks [1] disagree with ranks [0]; "
            "first layer that differs: 0"
        )
