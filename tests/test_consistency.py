"""Cross-rank expert-table verification on real gloo process groups (2-3 processes), and
the refusal of a group that cannot carry CPU tensors (an NCCL/HCCL-only one)."""

import os
import socket

import numpy as np
import pytest
import torch.distributed as dist
import torch.multiprocessing as mp

from tests.helpers.gloo import run_gloo
from vllm_eplb_plugin.consistency import (
    InconsistentExpertTable,
    cpu_backend_of,
    cpu_group_for,
    layer_digests,
    verify_consistency,
    verify_consistency_many,
)
from vllm_eplb_plugin.placement import default_table

WORLD = 3


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, port: int, scenario: str, results) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    table = default_table(4, 2, 5, 8)
    if scenario == "one_layer" and rank == 2:
        table[2, 0, [0, 1]] = table[2, 0, [1, 0]]  # same experts, other slots: still a different table
    if scenario == "shape" and rank == 1:
        table = default_table(4, 2, 6, 8)
    try:
        verify_consistency(table, what="expert table at start-up")
        results[rank] = "ok"
    except InconsistentExpertTable as exc:
        results[rank] = str(exc)
    finally:
        dist.destroy_process_group()


def _run(scenario: str) -> list[str]:
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_worker, args=(_free_port(), scenario, results), nprocs=WORLD, join=True)
        return [results[r] for r in range(WORLD)]


def test_agreeing_ranks_pass():
    assert _run("agree") == ["ok"] * WORLD


def test_disagreeing_rank_is_named_with_first_layer_on_every_rank():
    results = _run("one_layer")
    for msg in results:
        assert "ranks [2] disagree with ranks [0, 1]" in msg
        assert "first layer that differs: 2 (1 of 4 layers differ)" in msg
        assert msg.startswith("expert table at start-up differs")


def test_shape_mismatch_names_each_rank_shape():
    for msg in _run("shape"):
        assert "shapes [L, R, K] differ" in msg and "rank 1: [4, 2, 6]" in msg and "ranks [1] disagree" in msg


def test_layer_digests_change_with_any_slot():
    table = default_table(3, 2, 4, 8)
    base = layer_digests(table)
    table[1, 1, 3] = 0
    changed = layer_digests(table) != base
    assert changed.tolist() == [False, True, False]


@pytest.mark.parametrize("shape", [(1, 1, 1), (5, 3, 7)])
def test_digests_are_deterministic(shape):
    table = np.arange(np.prod(shape)).reshape(shape) % 5
    np.testing.assert_array_equal(layer_digests(table), layer_digests(table.copy()))


# -- the group must carry CPU tensors ---------------------------------------------------------


def register_nccl_like_backend() -> str:
    """Register (once per process) a backend that, like NCCL or HCCL, has no CPU device.

    A minimal stand-in, since this machine has no NCCL: torch's own FakeProcessGroup
    registered for ``cuda`` only. torch then refuses a CPU tensor on it exactly as it does
    on an NCCL-only group ("No backend type associated with device type cpu"), and
    ``dist.get_backend_config`` says ``cuda:nccl_like``."""
    from torch._C._distributed_c10d import FakeProcessGroup

    if not hasattr(dist.Backend, "NCCL_LIKE"):
        dist.Backend.register_backend(
            "nccl_like",
            lambda common, opts: FakeProcessGroup._create_internal(common.group_rank, common.group_size, opts),
            extended_api=True,
            devices=["cuda"],
        )
    return "nccl_like"


@pytest.mark.parametrize(
    "config, cpu",
    [
        ("cpu:gloo,cuda:gloo", "gloo"),  # what a gloo group reports
        ("cpu:gloo,cuda:nccl", "gloo"),  # init_process_group() on a CUDA machine
        ("cuda:nccl", None),
        ("npu:hccl", None),
        ("gloo", "gloo"),
        ("mpi", "mpi"),
        ("nccl", None),
    ],
)
def test_cpu_backend_of_reads_the_backend_config(config, cpu):
    assert cpu_backend_of(config) == cpu


def _group_ranks_fn(rank: int, world: int) -> dict:
    import torch

    from vllm_eplb_plugin import consistency

    backend = register_nccl_like_backend()
    device_only = dist.new_group(list(range(world)), backend=backend)
    mixed = dist.new_group(list(range(world)), backend=f"cpu:gloo,cuda:{backend}")
    out = {"config": dist.get_backend_config(device_only)}
    table = default_table(2, world, 3, 4)
    try:  # what the check did before: the collective itself refuses the CPU tensor
        local = torch.zeros(4, dtype=torch.int64)
        dist.all_gather([torch.empty_like(local) for _ in range(world)], local, group=device_only)
        out["raw"] = "gathered"
    except RuntimeError as exc:
        out["raw"] = str(exc)
    try:
        verify_consistency(table, device_only)
        out["refused"] = None
    except ValueError as exc:
        out["refused"] = str(exc)
    calls = []
    real = dist.new_group
    consistency.dist.new_group = lambda *a, **k: calls.append(k) or real(*a, **k)
    try:
        twin = cpu_group_for(device_only)
        out["twin_backend"] = dist.get_backend(twin)
        out["twin_reused"] = cpu_group_for(device_only) is twin
        out["new_groups"] = calls
        out["world_is_its_own"] = cpu_group_for(None) is None
        out["mixed_is_its_own"] = cpu_group_for(mixed) is mixed
    finally:
        consistency.dist.new_group = real
    verify_consistency(table, twin)  # passes: the gloo twin spans the same ranks
    verify_consistency(table, mixed)  # a cpu:gloo,cuda:... group carries CPU tensors too
    return out


def test_a_group_without_cpu_backend_is_refused_by_name_and_has_a_gloo_twin():
    for r in run_gloo(_group_ranks_fn, 2):
        assert r["config"] == "cuda:nccl_like"
        assert "No backend type associated with device type cpu" in r["raw"]
        assert r["refused"] == (
            "expert-table consistency check: process group backend 'nccl_like' (cuda:nccl_like) cannot carry "
            "CPU tensors, and the expert-table check all-gathers CPU int64. Pass a CPU group over the same ranks: "
            "dist.new_group(ranks, backend='gloo'), or vLLM's GroupCoordinator.cpu_group."
        )
        assert r["twin_backend"] == "gloo" and r["twin_reused"]
        assert r["new_groups"] == [{"ranks": [0, 1], "backend": "gloo"}]  # one twin, created once
        assert r["world_is_its_own"] and r["mixed_is_its_own"]


def _many_fn(rank: int, world: int) -> dict:
    tables = [default_table(2, world, 3, 4) for _ in range(4)]
    if rank == 1:
        tables[2][1, 0, [0, 1]] = tables[2][1, 0, [1, 0]]
        tables[3] = default_table(3, world, 3, 4)  # differs too, but table 2 is reported first
    names = [f"table {b}" for b in range(4)]
    gathers = []
    real = dist.all_gather
    dist.all_gather = lambda *a, **k: gathers.append(1) or real(*a, **k)
    try:
        extra = verify_consistency_many(tables[:2], whats=names[:2], extra=[rank, 7])
        out = {"extra": extra.tolist(), "gathers_agreeing": len(gathers)}
        try:
            verify_consistency_many(tables, whats=names)
        except InconsistentExpertTable as exc:
            out["error"] = str(exc)
    finally:
        dist.all_gather = real
    try:
        verify_consistency_many(tables, whats=names[:1])
    except ValueError as exc:
        out["names"] = str(exc)
    return out


def test_many_tables_take_one_gather_and_the_first_differing_one_is_named():
    for r in run_gloo(_many_fn, 2):
        assert r["extra"] == [[0, 7], [1, 7]]
        assert r["gathers_agreeing"] == 1
        assert r["error"].startswith("table 2 differs across ranks: ranks [1] disagree with ranks [0]; "
                                     "first layer that differs: 1 (1 of 2 layers differ)")
        assert r["names"] == "verify_consistency_many: 4 tables but 1 names; pass one name per table."
