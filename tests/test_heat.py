"""HeatCounter against counts computed independently with numpy."""

import numpy as np
import pytest
import torch

from vllm_eplb_plugin.heat import HeatCounter


def _bincount(ids: np.ndarray, rows: np.ndarray, experts: int) -> np.ndarray:
    return np.bincount(ids[rows].reshape(-1), minlength=experts)


def _run(counter: HeatCounter, steps: list[tuple[np.ndarray, np.ndarray]]) -> None:
    """steps: (topk_ids [L, N, K], real rows [N] bool)."""
    for ids, rows in steps:
        counter.begin_step(len(rows), None if rows.all() else torch.from_numpy(rows))
        for layer, layer_ids in enumerate(ids):
            counter.count(layer, torch.from_numpy(layer_ids))
        counter.end_step()


def _random_steps(rng, n_steps, L=3, E=8, K=2):
    steps = []
    for _ in range(n_steps):
        n = int(rng.integers(1, 12))
        ids = np.stack([[rng.choice(E, K, replace=False) for _ in range(n)] for _ in range(L)])
        steps.append((ids, rng.random(n) < 0.8))
    return steps


@pytest.mark.parametrize("traced", [True, False])
def test_sum_window_counts_only_real_rows_and_resets_per_interval(traced):
    rng = np.random.default_rng(0)
    steps = _random_steps(rng, 7)
    counter = HeatCounter(3, 8, max_rows=16, top_k=2, traced=traced)
    _run(counter, steps[:4])
    expected = np.stack([sum(_bincount(ids[l], rows, 8) for ids, rows in steps[:4]) for l in range(3)])
    got = counter.close_interval()
    np.testing.assert_array_equal(got, expected)
    _run(counter, steps[4:])
    expected2 = np.stack([sum(_bincount(ids[l], rows, 8) for ids, rows in steps[4:]) for l in range(3)])
    np.testing.assert_array_equal(counter.close_interval(), expected2)
    np.testing.assert_array_equal(got, expected)  # the first result is a copy, not a view
    np.testing.assert_array_equal(counter.total_counts(), expected + expected2)


@pytest.mark.parametrize("traced", [True, False])
def test_forward_without_begin_step_counts_nothing(traced):
    """Profile, dummy and warm-up runs call the model without arming the counter."""
    counter = HeatCounter(1, 4, max_rows=8, top_k=2, traced=traced)
    counter.count(0, torch.tensor([[0, 1], [2, 3]]))
    counter.end_step()
    _run(counter, [(np.array([[[0, 1]]]), np.ones(1, dtype=bool))])  # an armed step in between
    counter.count(0, torch.tensor([[2, 3]], dtype=torch.int32))  # after end_step: disarmed again
    np.testing.assert_array_equal(counter.close_interval(), [[1, 1, 0, 0]])


def test_traced_counting_replays_in_a_compiled_graph():
    """The traced path arms with tensors only, so a graph compiled once counts the armed
    steps and not the unarmed ones (Python in the hook runs at trace time only)."""
    counter = HeatCounter(1, 4, max_rows=8, top_k=2, traced=True)
    hook = torch.compile(lambda ids: counter.count(0, ids), backend="eager", fullgraph=False)
    ids = torch.tensor([[0, 1], [1, 2]], dtype=torch.int32)
    hook(ids)  # unarmed (a warm-up run)
    for _ in range(3):
        counter.begin_step(2, torch.tensor([True, False]))
        hook(ids)
        counter.end_step()
    hook(ids)
    np.testing.assert_array_equal(counter.close_interval(), [[3, 3, 0, 0]])


def test_ema_window_weights_intervals():
    counter = HeatCounter(1, 2, max_rows=4, top_k=1, window="ema", ema_decay=0.25)
    ones = np.ones(2, dtype=bool)
    _run(counter, [(np.array([[[0], [0]]]), ones)])  # interval 1: expert 0 twice
    np.testing.assert_allclose(counter.close_interval(), [[2.0, 0.0]])
    _run(counter, [(np.array([[[1], [1]]]), ones)] * 2)  # interval 2: expert 1 four times
    np.testing.assert_allclose(counter.close_interval(), [[0.25 * 2, 0.75 * 4]])


@pytest.mark.parametrize("traced", [True, False])
def test_steps_window_keeps_last_steps_oldest_first(traced):
    counter = HeatCounter(1, 3, max_rows=4, top_k=1, window="steps", window_steps=2, traced=traced)
    one = np.ones(1, dtype=bool)
    for e in (0, 1, 2):
        _run(counter, [(np.array([[[e]]]), one)])
    np.testing.assert_array_equal(counter.close_interval(), [[[0, 1, 0]], [[0, 0, 1]]])


def test_unknown_window_is_rejected():
    with pytest.raises(ValueError, match="heat window 'max'"):
        HeatCounter(1, 2, max_rows=2, top_k=1, window="max")


def test_eager_counting_ignores_rows_past_the_armed_ones():
    """Eager steps arm the leading real rows; padding rows at the end are sliced off."""
    counter = HeatCounter(2, 4, max_rows=8, top_k=2, traced=False)
    ids = torch.tensor([[0, 1], [1, 2], [3, 3]])  # row 2 is padding
    counter.begin_step(2)
    counter.count(0, ids)
    counter.count(1, ids.int())
    counter.end_step()
    counter.begin_step(2, torch.tensor([False, True]))  # a stage filter on top
    counter.count(0, ids)
    counter.end_step()
    np.testing.assert_array_equal(counter.close_interval(), [[1, 3, 2, 0], [1, 2, 1, 0]])
