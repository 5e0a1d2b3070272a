"""Streaming weighted mean and the server step, against hand-computed arrays."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest

from fedmq.aggregator.optimizers import ServerOptimizer
from fedmq.aggregator.strategy import WeightedMean

SHAPES = {"w": (2, 2), "b": (2,)}


def test_weighted_mean_matches_hand_computation() -> None:
    mean = WeightedMean(SHAPES)
    mean.add({"w": np.array([[1, 2], [3, 4]], np.float32), "b": np.array([1, -1], np.float32)}, 1)
    mean.add({"w": np.array([[5, 6], [7, 8]], np.float32), "b": np.array([3, 3], np.float32)}, 3)
    out = mean.result()
    # (1*[[1,2],[3,4]] + 3*[[5,6],[7,8]]) / 4 = [[16,20],[24,28]] / 4
    np.testing.assert_array_equal(out["w"], np.array([[4, 5], [6, 7]], np.float32))
    # (1*[1,-1] + 3*[3,3]) / 4 = [10, 8] / 4
    np.testing.assert_array_equal(out["b"], np.array([2.5, 2.0], np.float32))
    assert out["w"].dtype == np.float32
    assert mean.count == 2 and mean.total_weight == 4


def test_weighted_mean_is_independent_of_arrival_order() -> None:
    rng = np.random.default_rng(1)
    deltas = [{"w": rng.standard_normal((2, 2)).astype(np.float32), "b": rng.standard_normal(2).astype(np.float32)}
              for _ in range(20)]
    weights = rng.integers(1, 500, 20)
    results = []
    for order in (range(20), reversed(range(20)), rng.permutation(20)):
        mean = WeightedMean(SHAPES)
        for i in order:
            mean.add(deltas[i], float(weights[i]))
        results.append(mean.result())
    for other in results[1:]:
        for name in SHAPES:
            np.testing.assert_array_equal(other[name], results[0][name])


def test_weighted_mean_does_not_keep_the_deltas() -> None:
    """Memory is O(model), not O(devices x model): folding many updates allocates nothing lasting."""
    shapes = {"w": (256, 256)}  # 256 KiB of float32 per delta
    mean = WeightedMean(shapes)
    delta = {"w": np.ones((256, 256), np.float32)}
    mean.add(delta, 1.0)
    tracemalloc.start()
    before, _ = tracemalloc.get_traced_memory()
    for _ in range(50):
        mean.add({"w": delta["w"] * 1.0}, 1.0)  # a fresh array each time, as decoding gives
    after, _ = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert after - before < 64 * 1024, f"memory grew by {after - before} bytes over 50 updates"
    np.testing.assert_allclose(mean.result()["w"], 1.0)


def test_weighted_mean_refuses_empty_and_non_positive_weight() -> None:
    mean = WeightedMean(SHAPES)
    with pytest.raises(ValueError, match="no update"):
        mean.result()
    with pytest.raises(ValueError, match="positive"):
        mean.add({"w": np.zeros((2, 2), np.float32), "b": np.zeros(2, np.float32)}, 0)


def test_server_sgd_applies_learning_rate() -> None:
    params = {"w": np.array([1.0, 2.0], np.float32)}
    delta = {"w": np.array([0.5, -1.0], np.float32)}
    np.testing.assert_array_equal(ServerOptimizer("sgd", lr=1.0).step(params, delta)["w"], [1.5, 1.0])
    np.testing.assert_array_equal(ServerOptimizer("sgd", lr=0.5).step(params, delta)["w"], [1.25, 1.5])
    with pytest.raises(ValueError):
        ServerOptimizer("sgd", lr=0)
