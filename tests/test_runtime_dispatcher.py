"""DynamicDispatcher and ExpertLoadCollector: maps, A2A / AG routing, the staged swap
agreed across real gloo ranks, and buffer reuse."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.helpers.gloo import run_gloo
from vllm_eplb_plugin.consistency import InconsistentExpertTable
from vllm_eplb_plugin.runtime import DynamicDispatcher, ExpertLoadCollector

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
