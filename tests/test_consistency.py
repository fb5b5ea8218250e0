"""Cross-rank expert-table verification on a real gloo process group (3 processes)."""

import os
import socket

import numpy as np
import pytest
import torch.distributed as dist
import torch.multiprocessing as mp

from vllm_eplb_plugin.consistency import InconsistentExpertTable, layer_digests, verify_consistency
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
