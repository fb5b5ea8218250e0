"""The plugin inside vLLM Ascend's dynamic EPLB: its real ``PolicyFactory``, ``EplbWorker``,
``EplbProcess`` and ``EplbUpdator`` (from its sdist), the plugin's hooks installed.

Stood in for (``standin/sitecustomize.py``): torch_npu, torch.npu, the build's
``_build_info``. In these tests also: the EP group's rank (``get_ep_group``), and for the
updator its NPU communication group (a gloo group here) and its model adaptor (which
needs NPU MoE layers).
"""

from __future__ import annotations

import multiprocessing as mp
import os
import queue
from contextlib import contextmanager
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.distributed as dist
from gloo import run_gloo
from vllm.config import VllmConfig, set_current_vllm_config
from vllm_ascend.eplb.core import eplb_worker
from vllm_ascend.eplb.core.eplb_worker import EplbProcess, EplbWorker
from vllm_ascend.eplb.core.policy.policy_factory import PolicyFactory

from vllm_eplb_plugin.consistency import InconsistentExpertTable
from vllm_eplb_plugin.engine.ascend_hooks import install_ascend
from vllm_eplb_plugin.engine.ascend_policy import PluginPolicy
from vllm_eplb_plugin.metrics import balancedness
from vllm_eplb_plugin.placement import default_table, expert_maps, slot_to_expert_load
from vllm_eplb_plugin.planner import PlanStatus, review_plan
from vllm_eplb_plugin.registry import create_policy

install_ascend()

POLICIES = ["swift", "optimal", "flashlb", "deepseek", "random", "example-lpt"]
ASCEND_POLICIES = {0: "RandomLoadBalance", 1: "DefaultEplb", 2: "SwiftBalanceEplb", 3: "FlashLB"}


@pytest.fixture(scope="module")
def vllm_config():
    return VllmConfig()


@contextmanager
def section(vllm_config, eplb: dict | None):
    """vLLM's config context with vLLM Ascend's eplb_config and (if given) our eplb."""
    vllm_config.additional_config = {"eplb_config": {"dynamic_eplb": True}} | ({} if eplb is None else {"eplb": eplb})
    with set_current_vllm_config(vllm_config):
        yield


@pytest.fixture(autouse=True)
def ep_rank(monkeypatch):
    monkeypatch.setattr(eplb_worker, "get_ep_group", lambda: SimpleNamespace(rank_in_group=0))


@pytest.fixture
def rejections(monkeypatch):
    """Layers vLLM Ascend's own check_expert_placement reverts, over the test."""
    seen: list[int] = []
    original = EplbWorker.check_expert_placement

    def spy(self, old, new):
        before = new.clone()
        original(self, old, new)
        seen.extend(torch.nonzero((new != before).flatten(1).any(dim=1)).flatten().tolist())

    monkeypatch.setattr(EplbWorker, "check_expert_placement", spy)
    return seen


def _case(rng: np.random.Generator):
    """A shuffled valid table [L, R, K] and a skewed per-slot load [L, R, K]."""
    L, R = int(rng.integers(1, 4)), int(rng.integers(2, 7))
    K = int(rng.integers(2, 6))
    E = int(rng.integers(max(K, R * K - R), R * K + 1))
    table = default_table(L, R, K, E)
    relabel = rng.permuted(np.broadcast_to(np.arange(E), (L, E)), axis=1)
    table = np.take_along_axis(relabel, table.reshape(L, -1), axis=1).reshape(L, R, K)
    return table, E


def _load(rng, table, E):
    popularity = 1000.0 / (1 + rng.permutation(E)) ** rng.uniform(0.3, 1.5)
    return rng.poisson(popularity[table]).astype(np.int64)


def _worker(vllm_config, eplb, table, E, load, policy_type=2):
    shared = {"expert_maps": torch.from_numpy(expert_maps(table, E)), "moe_load": torch.from_numpy(load)}
    with section(vllm_config, eplb):
        worker = EplbWorker(shared, policy_type, True, tp_size=1)
    return worker, shared


def _table_of(maps: torch.Tensor) -> np.ndarray:
    return EplbWorker.global2local(None, maps, int(maps.max()) + 1).numpy()


def test_without_an_eplb_section_vllm_ascend_picks_its_own_policies(vllm_config):
    with section(vllm_config, None):
        for policy_type, name in ASCEND_POLICIES.items():
            assert type(PolicyFactory.generate_policy(policy_type)).__name__ == name


@pytest.mark.parametrize("name", POLICIES)
def test_eplb_worker_runs_our_policy_over_successive_rebalances(vllm_config, rejections, name):
    rng = np.random.default_rng(POLICIES.index(name))
    plans = adopted = layer_plans = 0
    policy = None  # one EPLB process plans many times: its planner child is kept
    try:
        for _ in range(40):
            table, E = _case(rng)
            worker, shared = _worker(vllm_config, {"policy": name}, table, E, _load(rng, table, E))
            assert isinstance(worker.policy, PluginPolicy) and worker.policy.name == name
            policy = worker.policy = policy or worker.policy
            for _ in range(3):  # successive rebalances on fresh heat, from the last plan
                current = _table_of(shared["expert_maps"])
                shared["moe_load"] = torch.from_numpy(_load(rng, current, E))
                assert worker.do_update() is not None
                outcome = policy.last_outcome
                assert outcome.seq == plans + 1 and outcome.status is not PlanStatus.FAILED, outcome
                np.testing.assert_array_equal(_table_of(shared["expert_maps"]), outcome.new_table)
                plans += 1
                layer_plans += table.shape[0]
                adopted += outcome.status is PlanStatus.ADOPT
    finally:
        policy.close()
    assert rejections == []
    assert plans == 120 and adopted > 0
    print(f"{name}: {plans} plans ({layer_plans} layer-plans), {adopted} adopted, "
          f"{len(rejections)} layers rejected by check_expert_placement")


def test_the_plan_is_our_policys_reviewed_plan(vllm_config):
    rng = np.random.default_rng(7)
    table, E = _case(rng)
    load = _load(rng, table, E)
    worker, shared = _worker(vllm_config, {"policy": "optimal"}, table, E, load)
    try:
        worker.do_update()
    finally:
        worker.policy.close()
    heat = slot_to_expert_load(table, load.astype(float), E)
    planned = create_policy("optimal").rebalance_experts(table, load).new_table
    expected, _, _ = review_plan(table, planned, heat)
    np.testing.assert_array_equal(_table_of(shared["expert_maps"]), expected)


@pytest.mark.parametrize("method", ["fork", "spawn", "forkserver"])
def test_eplb_process_reaches_our_policy_whatever_the_start_method(vllm_config, monkeypatch, method):
    ctx = mp.get_context(method)
    monkeypatch.setattr(eplb_worker, "Process", ctx.Process)  # as set_start_method(method) would
    monkeypatch.setattr(eplb_worker, "Queue", ctx.Queue)
    table, E = default_table(2, 4, 3, 10), 10
    load = _load(np.random.default_rng(3), table, E)
    with mp.Manager() as manager:
        shared = manager.dict({"expert_map": None, "moe_load": torch.from_numpy(load),
                               "expert_maps": torch.from_numpy(expert_maps(table, E))})
        with section(vllm_config, {"policy": "deepseek"}):
            process = EplbProcess(shared_dict=shared, policy_type=2, enable_d2d=True, tp_size=1)
        assert isinstance(process.worker.policy, PluginPolicy)
        child = process._launch_process()
        try:
            process.planner_q.put(1)
            info = process.block_update_q.get(timeout=120)
            maps = shared["expert_maps"]
        finally:
            child.terminate()
            child.join()
    heat = slot_to_expert_load(table, load.astype(float), E)
    planned = create_policy("deepseek").rebalance_experts(table, load).new_table
    expected, layers, _ = review_plan(table, planned, heat)
    assert layers, "the case must change a layer to tell our policy from vLLM Ascend's"
    np.testing.assert_array_equal(_table_of(maps), expected)
    assert len(info) == table.shape[0]


@pytest.mark.parametrize(
    "eplb, statuses, message",
    [
        ({"policy": "flaky_policies:FlakyPolicy"}, ["failed", "failed", "adopt"],
         r"policy raised: .*boom from FlakyPolicy"),
        ({"policy": "flaky_policies:SleepyPolicy", "plan_timeout_s": 1.0}, ["failed"], r"timed out after 1 s"),
        ({"policy": "flaky_policies:SlotShufflePolicy"}, ["keep"], r"moves an expert between slots of a rank"),
    ],
    ids=["raises-invalid-then-plans", "hangs", "moves-within-a-rank"],
)
def test_a_failing_policy_keeps_the_placement_and_the_next_rebalance_runs(
    vllm_config, rejections, eplb, statuses, message
):
    rng = np.random.default_rng(11)
    table = default_table(2, 4, 3, 10)
    load = _load(rng, table, 10)
    worker, shared = _worker(vllm_config, eplb, table, 10, load)
    seen = []
    try:
        for _ in statuses:
            assert worker.do_update() is not None  # vLLM Ascend's process would stop on an exception
            seen.append(worker.policy.last_outcome)
    finally:
        worker.policy.close()
    assert [o.status.value for o in seen] == statuses
    import re

    assert re.search(message, seen[0].message, re.S), seen[0].message
    for outcome in seen[:-1] if statuses[-1] == "adopt" else seen:
        np.testing.assert_array_equal(outcome.new_table, table)
    assert rejections == []
    if statuses[-1] == "adopt":
        heat = slot_to_expert_load(table, load.astype(float), 10)
        assert balancedness(seen[-1].new_table, heat).mean() > balancedness(table, heat).mean()


# -- consistency of the expert maps across EP ranks, on real gloo ranks ----------------------


class _Group:
    """vLLM Ascend's dynamic-EPLB communication group, over gloo (its NPU group here)."""

    def __init__(self, world: int, rank: int) -> None:
        self.world_size, self.rank_in_group, self.ranks = world, rank, list(range(world))
        self.cpu_group = self.device_group = dist.group.WORLD

    def all_gather(self, tensor: torch.Tensor, dim: int) -> torch.Tensor:
        out = [torch.empty_like(tensor) for _ in range(self.world_size)]
        dist.all_gather(out, tensor)
        return torch.cat(out, dim=dim)


def _consistency_rank(rank: int, world: int, where: str) -> str:
    from vllm_ascend.ascend_config import EplbConfig as AscendEplbConfig
    from vllm_ascend.eplb import eplb_updator

    from vllm_eplb_plugin.config import EplbConfig

    os.environ["DYNAMIC_EPLB"] = "true"
    install_ascend()
    eplb_updator.get_dynamic_eplb_group = lambda: _Group(world, rank)
    table = default_table(3, world, 3, 2 * world)
    maps = torch.from_numpy(expert_maps(table, 2 * world))  # [L, R, E]
    if where == "start-up" and rank == 2:
        maps[1, 0] = maps[1, 0].roll(1)  # rank 2 built another map for layer 1
    # The EPLB process runs our policy: the plugin is on (its worker is built by other tests).
    worker = SimpleNamespace(policy=PluginPolicy(EplbConfig(policy="deepseek")))
    process = SimpleNamespace(shared_dict={}, planner_q=queue.Queue(), block_update_q=queue.Queue(), worker=worker)
    cfg = AscendEplbConfig(
        {"dynamic_eplb": True, "expert_heat_collection_interval": 4, "algorithm_execution_interval": 2}
    )
    updator = eplb_updator.EplbUpdator(cfg, SimpleNamespace(), process, SimpleNamespace(pid=0))
    updator.adaptor = SimpleNamespace(get_global_expert_map=lambda: maps.clone(),
                                      get_rank_expert_workload=lambda: torch.zeros(3, 3, dtype=torch.int64))
    updator.num_moe_layers, updator.world_size, updator.device = 3, world, torch.device("cpu")
    try:
        updator.warm_up_eplb()
        planned = maps.clone()
        if rank == 1:
            planned[0, 1] = planned[0, 1].roll(1)  # rank 1's EPLB process planned differently
        process.shared_dict["expert_maps"] = planned
        process.block_update_q.put([])
        updator.cur_iterations = 4 + 2 - 1  # the step that takes the plan
        updator.forward_before()
        return "ok"
    except InconsistentExpertTable as exc:
        return str(exc)


@pytest.mark.parametrize("where, rank, layer, what", [
    ("start-up", 2, 1, "vLLM Ascend's expert maps at start-up"),
    ("update", 1, 0, "vLLM Ascend's planned expert maps before the update"),
])
def test_a_rank_with_another_map_is_named(where, rank, layer, what):
    results = run_gloo(_consistency_rank, world=3, args=(where,))
    for message in results:
        assert message.startswith(f"{what} differs across ranks: ranks [{rank}] disagree"), message
        assert f"first layer that differs: {layer} " in message


@pytest.mark.parametrize("rank", [0, 1])
def test_ep_rank_0_reports_each_plan_to_prometheus_like_on_vllm(vllm_config, monkeypatch, rank):
    from prometheus_client import REGISTRY

    monkeypatch.setattr(eplb_worker, "get_ep_group", lambda: SimpleNamespace(rank_in_group=rank))
    sample = lambda name, **labels: REGISTRY.get_sample_value(name, labels) or 0.0  # noqa: E731
    applied = sample("vllm:eplb_plans_total", outcome="applied")
    table = default_table(2, 4, 3, 10)
    load = _load(np.random.default_rng(5), table, 10)
    worker, shared = _worker(vllm_config, {"policy": "deepseek"}, table, 10, load)
    try:
        worker.do_update()
    finally:
        worker.policy.close()
    outcome = worker.policy.last_outcome
    assert worker.policy.reports == (rank == 0) and outcome.status is PlanStatus.ADOPT
    assert sample("vllm:eplb_plans_total", outcome="applied") == applied + (rank == 0)
    if rank == 0:
        heat = slot_to_expert_load(table, load.astype(float), 10)
        assert sample("vllm:eplb_predicted_balancedness") == pytest.approx(balancedness(outcome.new_table, heat).mean())
        assert sample("vllm:eplb_balancedness") == pytest.approx(balancedness(table, heat).mean())


def test_eplb_policy_type_3_hands_a_per_step_series_to_our_policy(vllm_config, rejections):
    rng = np.random.default_rng(9)
    table = default_table(2, 4, 3, 10)
    series = np.stack([_load(rng, table, 10) for _ in range(5)])  # [T, L, R, K], as vLLM Ascend gathers it for type 3
    worker, shared = _worker(vllm_config, {"policy": "flashlb"}, table, 10, series, policy_type=3)
    try:
        assert worker.multi_stage and worker.do_update() is not None
    finally:
        worker.policy.close()
    heat = slot_to_expert_load(table, series.astype(float), 10)  # [T, L, E]
    planned = create_policy("flashlb").rebalance_experts(table, series).new_table
    expected, layers, _ = review_plan(table, planned, heat.sum(axis=0))
    assert layers and worker.policy.last_outcome.status is PlanStatus.ADOPT
    np.testing.assert_array_equal(_table_of(shared["expert_maps"]), expected)
    assert rejections == []
