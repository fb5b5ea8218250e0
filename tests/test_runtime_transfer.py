"""Transfer planning (fewest fetches, spread sources) and execution on 4 real gloo ranks."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.helpers.gloo import run_gloo
from vllm_eplb_plugin.registry import create_policy
from vllm_eplb_plugin.runtime.transfer import execute_transfers, plan_transfers


def test_hand_checked_plan():
    old = np.array([[0, 1], [2, 3]])
    new = np.array([[0, 2], [3, 1]])
    plan = plan_transfers(old, new)
    # rank 0 keeps 0 in slot 0; rank 1 has 3 in old slot 1 -> new slot 0.
    assert plan.local.tolist() == [[0, 0, 0], [1, 1, 0]]
    # (src_rank, dst_rank, expert, src_slot, dst_slot)
    assert plan.remote.tolist() == [[1, 0, 2, 0, 1], [0, 1, 1, 1, 1]]


def test_adding_a_redundant_slot_fetches_only_the_new_copy():
    old = np.array([[0, 1], [2, 3]])
    new = np.array([[0, 1, 2], [2, 3, 0]])
    plan = plan_transfers(old, new)
    assert plan.num_remote == 2 and plan.remote[:, 2].tolist() == [2, 0]
    assert len(plan.local) == 4


def _random_table(rng, ranks, slots, experts):
    """A valid [R, K] table: every expert once, then the redundant slots, no rank twice."""
    while True:
        flat = np.concatenate([rng.permutation(experts), rng.choice(experts, ranks * slots - experts)])
        table = flat.reshape(ranks, slots)
        if all(len(set(row)) == slots for row in table):
            return table


def test_remote_fetches_are_exactly_the_pairs_new_to_a_rank():
    rng = np.random.default_rng(0)
    for case in range(200):
        ranks, experts = int(rng.integers(1, 6)), int(rng.integers(2, 12))
        k0 = -(-experts // ranks)
        k1 = min(experts, k0 + int(rng.integers(0, 3)))
        old, new = _random_table(rng, ranks, k0, experts), _random_table(rng, ranks, k1, experts)
        plan = plan_transfers(old, new)
        pairs = {(r, e) for r in range(ranks) for e in new[r]} - {(r, e) for r in range(ranks) for e in old[r]}
        assert plan.num_remote == len(pairs), case
        assert {(d, e) for _, d, e, _, _ in plan.remote.tolist()} == pairs
        for s, d, e, ss, ds in plan.remote.tolist():
            assert old[s, ss] == e and new[d, ds] == e and s != d
        for r, ss, ds in plan.local.tolist():
            assert old[r, ss] == new[r, ds]
        assert len(plan.local) + plan.num_remote == new.size  # every new slot is filled once


def test_unchanged_table_moves_nothing_remotely():
    table = create_policy("random").rebalance_experts(
        np.arange(12).reshape(1, 3, 4) % 10, np.ones((1, 3, 4))
    ).new_table[0]
    plan = plan_transfers(table, table)
    assert plan.num_remote == 0 and plan.local[:, 1].tolist() == plan.local[:, 2].tolist()


def test_sources_are_spread_over_the_holders():
    # expert 0 on ranks 0 and 1; ranks 2 and 3 each need it: one fetch from each holder.
    old = np.array([[0, 1, 2, 3], [0, 4, 5, 6], [7, 8, 9, 1], [10, 11, 2, 4]])
    new = np.array([[0, 1, 2, 3], [0, 4, 5, 6], [7, 8, 9, 0], [10, 11, 0, 2]])
    remote = plan_transfers(old, new).remote
    assert remote[:, 2].tolist() == [0, 0] and sorted(remote[:, 0].tolist()) == [0, 1]


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match="a transfer keeps the ranks and experts"):
        plan_transfers(np.array([[0, 1], [2, 3]]), np.array([[0, 1, 2, 3]]))
    with pytest.raises(ValueError, match="holds logical expert 1 twice"):
        plan_transfers(np.array([[0, 1], [1, 1]]), np.array([[0, 1], [2, 3]]))
    plan = plan_transfers(np.array([[0, 1], [2, 3]]), np.array([[0, 2], [3, 1]]))
    w = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="shares storage with the source"):
        execute_transfers(plan, 0, [w], [w[:]])
    with pytest.raises(ValueError, match=r"source \[2, 3\] and target \[3, 3\] do not fit"):
        execute_transfers(plan, 0, [w], [torch.zeros(3, 3)])
    with pytest.raises(ValueError, match="1 source and 2 target tensors"):
        execute_transfers(plan, 0, [w], [torch.zeros(2, 3), torch.zeros(2, 3)])


def _content(expert: int, shape: tuple[int, ...], which: int) -> torch.Tensor:
    """Weights that say which expert (and which tensor) they belong to."""
    return torch.arange(int(np.prod(shape)), dtype=torch.float32).reshape(shape) + 1000 * expert + 0.5 * which


def _rss_kib() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4


def _execute_ranks(rank: int, world: int, cases: list[tuple[np.ndarray, np.ndarray]]) -> dict:
    shapes = ((4, 3), (3, 4))
    for old, new in cases:
        sources = [torch.stack([_content(e, s, i) for e in old[rank]]) for i, s in enumerate(shapes)]
        before = [s.clone() for s in sources]
        targets = [torch.full((new.shape[1], *s), -1.0) for s in shapes]
        execute_transfers(plan_transfers(old, new), rank, sources, targets)
        for i, s in enumerate(shapes):
            assert torch.equal(targets[i], torch.stack([_content(e, s, i) for e in new[rank]])), (rank, old, new)
            assert torch.equal(sources[i], before[i])
    # 100 updates back and forth with the same buffers: resident memory stays flat.
    a, b = cases[0]
    big = [(256, 256), (256, 256)]
    bufs = [[torch.zeros(a.shape[1], *s) for s in big], [torch.zeros(b.shape[1], *s) for s in big]]
    plans = [plan_transfers(a, b), plan_transfers(b, a)]
    rss = []
    for i in range(100):
        execute_transfers(plans[i % 2], rank, bufs[i % 2], bufs[1 - i % 2])
        rss.append(_rss_kib())
    return {"rss_growth_kib": rss[-1] - rss[9]}


def test_execution_on_4_gloo_ranks_delivers_every_slot_and_reuses_buffers():
    rng = np.random.default_rng(1)
    cases = [(_random_table(rng, 4, 3, 10), _random_table(rng, 4, 3, 10)) for _ in range(4)]
    cases.append((np.arange(8).reshape(4, 2), _random_table(rng, 4, 3, 8)))  # redundant slots added
    results = run_gloo(_execute_ranks, 4, args=(cases,))
    print("resident memory growth over 90 updates, KiB per rank:", [r["rss_growth_kib"] for r in results])
    for r in results:
        assert r["rss_growth_kib"] < 4096, f"resident memory grew {r['rss_growth_kib']} KiB over 90 updates"
