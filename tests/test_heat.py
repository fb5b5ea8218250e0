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
        counter.begin_step(torch.from_numpy(rows))
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


def test_sum_window_counts_only_real_rows_and_resets_per_interval():
    rng = np.random.default_rng(0)
    steps = _random_steps(rng, 7)
    counter = HeatCounter(3, 8, max_rows=16)
    _run(counter, steps[:4])
    expected = np.stack([sum(_bincount(ids[l], rows, 8) for ids, rows in steps[:4]) for l in range(3)])
    got = counter.close_interval()
    np.testing.assert_array_equal(got, expected)
    _run(counter, steps[4:])
    expected2 = np.stack([sum(_bincount(ids[l], rows, 8) for ids, rows in steps[4:]) for l in range(3)])
    np.testing.assert_array_equal(counter.close_interval(), expected2)
    np.testing.assert_array_equal(got, expected)  # the first result is a copy, not a view
    np.testing.assert_array_equal(counter.total_counts(), expected + expected2)


def test_forward_without_begin_step_counts_nothing():
    """Profile, dummy and warm-up runs call the model without arming the counter."""
    counter = HeatCounter(1, 4, max_rows=8)
    counter.count(0, torch.tensor([[0, 1], [2, 3]]))
    counter.end_step()
    assert counter.close_interval().sum() == 0


def test_ema_window_weights_intervals():
    counter = HeatCounter(1, 2, max_rows=4, window="ema", ema_decay=0.25)
    ones = np.ones(2, dtype=bool)
    _run(counter, [(np.array([[[0], [0]]]), ones)])  # interval 1: expert 0 twice
    np.testing.assert_allclose(counter.close_interval(), [[2.0, 0.0]])
    _run(counter, [(np.array([[[1], [1]]]), ones)] * 2)  # interval 2: expert 1 four times
    np.testing.assert_allclose(counter.close_interval(), [[0.25 * 2, 0.75 * 4]])


def test_steps_window_keeps_last_steps_oldest_first():
    counter = HeatCounter(1, 3, max_rows=4, window="steps", window_steps=2)
    one = np.ones(1, dtype=bool)
    for e in (0, 1, 2):
        _run(counter, [(np.array([[[e]]]), one)])
    np.testing.assert_array_equal(counter.close_interval(), [[[0, 1, 0]], [[0, 0, 1]]])


def test_unknown_window_is_rejected():
    with pytest.raises(ValueError, match="heat window 'max'"):
        HeatCounter(1, 2, max_rows=2, window="max")
