"""The numpy reference trainer: gradients against finite differences, schedule, learning."""

from __future__ import annotations

import numpy as np

from fedmq.broker.architecture import MLPArchitecture
from fedmq.edge_agent import training

ARCH = MLPArchitecture(5, (4, 3), 3)


def batch(seed: int = 0, n: int = 7) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, 5)).astype(np.float32), rng.integers(0, 3, n)


def mean_loss(params: dict, x: np.ndarray, y: np.ndarray) -> float:
    loss, _ = training.softmax_cross_entropy(training.logits(params, ARCH, x).astype(np.float64), y)
    return float(loss.mean())


def test_sgd_step_follows_the_true_gradient() -> None:
    """One step with lr moves every parameter by -lr * dL/dp, checked against central differences."""
    x, y = batch()
    params = {k: v.astype(np.float64) for k, v in ARCH.init_params(3).items()}
    lr = 1e-3
    stepped = {k: v.copy() for k, v in params.items()}
    training.sgd_step(stepped, ARCH, x.astype(np.float64), y, lr)
    eps = 1e-6
    for name, value in params.items():
        flat = value.reshape(-1)
        for i in range(0, flat.size, max(1, flat.size // 5)):
            plus = {k: v.copy() for k, v in params.items()}
            minus = {k: v.copy() for k, v in params.items()}
            plus[name].reshape(-1)[i] += eps
            minus[name].reshape(-1)[i] -= eps
            numeric = (mean_loss(plus, x, y) - mean_loss(minus, x, y)) / (2 * eps)
            analytic = (flat[i] - stepped[name].reshape(-1)[i]) / lr
            assert abs(numeric - analytic) < 1e-5 + 1e-4 * abs(numeric), (name, i, numeric, analytic)


def test_epoch_batches_cover_every_example_once_per_epoch() -> None:
    seen: dict[int, list[int]] = {}
    for epoch, idx in training.epoch_batches(23, 5, 3, seed=9):
        assert len(idx) <= 5
        seen.setdefault(epoch, []).extend(idx.tolist())
    assert sorted(seen) == [0, 1, 2]
    for order in seen.values():
        assert sorted(order) == list(range(23))
    assert seen[0] != seen[1], "each epoch reshuffles"


def test_train_is_deterministic_and_leaves_input_untouched() -> None:
    x, y = batch(n=40)
    params = ARCH.init_params(0)
    original = {k: v.copy() for k, v in params.items()}
    a = training.train(params, ARCH, x, y, epochs=2, batch_size=8, lr=0.1, seed=5)
    b = training.train(params, ARCH, x, y, epochs=2, batch_size=8, lr=0.1, seed=5)
    c = training.train(params, ARCH, x, y, epochs=2, batch_size=8, lr=0.1, seed=6)
    for name in params:
        np.testing.assert_array_equal(params[name], original[name])
        np.testing.assert_array_equal(a.params[name], b.params[name])
    assert any(not np.array_equal(a.params[k], c.params[k]) for k in params)
    assert a.num_examples == 40


def test_training_learns_a_separable_problem() -> None:
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 300)
    centers = np.eye(3, 5, dtype=np.float32) * 4
    x = centers[y] + rng.standard_normal((300, 5)).astype(np.float32) * 0.5
    params = ARCH.init_params(1)
    acc_before, loss_before = training.evaluate(params, ARCH, x, y)
    result = training.train(params, ARCH, x, y, epochs=10, batch_size=16, lr=0.1, seed=0)
    acc_after, loss_after = training.evaluate(result.params, ARCH, x, y)
    assert loss_after < loss_before / 4
    assert acc_after > 0.95 > acc_before
    assert 0.0 < result.loss < loss_before
