"""Streaming weighted mean and the server step, against hand-computed arrays."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import tracemalloc

import numpy as np
import pytest

from fedmq.aggregator import fold, strategy
from fedmq.aggregator.optimizers import ServerOptimizer
from fedmq.aggregator.strategy import WeightedMean
from fedmq.broker.errors import Reason, RejectedMessage

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


def test_weighted_mean_depends_on_arrival_order_only_in_the_last_bits() -> None:
    """float32 sums: another order moves the result by rounding only; the same order (a journal
    replay) reproduces it bit for bit."""
    rng = np.random.default_rng(1)
    deltas = [{"w": rng.standard_normal((2, 2)).astype(np.float32), "b": rng.standard_normal(2).astype(np.float32)}
              for _ in range(20)]
    weights = rng.integers(1, 500, 20)
    expected = {name: sum(float(weights[i]) * deltas[i][name].astype(np.float64) for i in range(20)) / float(weights.sum())
                for name in SHAPES}
    results = []
    for order in (range(20), reversed(range(20)), rng.permutation(20), range(20)):
        mean = WeightedMean(SHAPES)
        for i in order:
            mean.add(deltas[i], float(weights[i]))
        results.append(mean.result())
    for result in results:
        for name in SHAPES:
            np.testing.assert_allclose(result[name], expected[name], rtol=0, atol=1e-6)
    for name in SHAPES:
        np.testing.assert_array_equal(results[3][name], results[0][name])


def test_weighted_mean_memory_is_flat_in_the_number_of_updates() -> None:
    """Memory is O(model), not O(devices x model): it keeps at most SNAPSHOT_EVERY recent deltas
    (to rewind a refusal), so 51 or 499 updates retain the same."""
    shapes = {"w": (256, 256)}  # 256 KiB of float32 per delta
    delta_bytes = 256 * 256 * 4
    mean = WeightedMean(shapes)
    delta = {"w": np.ones((256, 256), np.float32)}
    mean.add(delta, 1.0)
    tracemalloc.start()
    before, _ = tracemalloc.get_traced_memory()
    retained = []
    for count in (50, 448):  # 51 and 499 added: the same place in the snapshot cycle
        for _ in range(count):
            mean.add({"w": delta["w"] * 1.0}, 1.0)  # a fresh array each time, as decoding gives
        retained.append(tracemalloc.get_traced_memory()[0] - before)
    tracemalloc.stop()
    assert max(retained) <= WeightedMean.SNAPSHOT_EVERY * delta_bytes + 64 * 1024, retained
    assert abs(retained[1] - retained[0]) <= 2 * delta_bytes, f"memory grew from {retained[0]} to {retained[1]} bytes"
    np.testing.assert_allclose(mean.result()["w"], 1.0)


def test_new_sums_are_written_at_once_so_folding_into_them_takes_no_page_faults() -> None:
    # np.zeros would leave fresh pages to the first fold: a read fault then a write fault per page
    import resource

    size = 1 << 23  # 32 MB of float32: glibc mmaps it fresh (its largest threshold); no snapshot yet
    delta = {"w": np.ones(size, np.float32)}
    fold.kernel()  # compiled before counting
    faults = lambda: resource.getrusage(resource.RUSAGE_THREAD).ru_minflt  # noqa: E731
    before = faults()
    mean = WeightedMean({"w": (size,)})
    created = faults()
    mean.add(delta, 1.0)
    folded = faults()
    # how many faults 64 MB takes depends on transparent huge pages (numpy asks for them), so the
    # first fold is compared with the making of the sums, which must have taken the faults
    assert created - before >= 16, f"the sums were not written when made ({created - before} faults)"
    assert folded - created <= (created - before) // 10, (
        f"the first fold took {folded - created} page faults, making the sums {created - before}")
    assert float(mean.result()["w"][-1]) == 1.0


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


# -- the fold kernel and the check-then-fold contract ------------------------------------------------


def test_fold_kernels_are_bit_identical_and_numba_is_the_default() -> None:
    fn, name = fold.kernel()
    assert name == "numba", "the test environment installs fedmq[fast]; without numba the fold runs as numpy passes"
    rng = np.random.default_rng(7)
    start = rng.standard_normal(100_003).astype(np.float32)
    x = (rng.standard_normal(100_003) * 1e-3).astype(np.float32)
    x_readonly = np.frombuffer(x.tobytes(), np.float32)  # as decoded from a payload
    acc_numba, acc_numpy = start.copy(), start.copy()
    squares = fn(acc_numba, x_readonly, np.float32(37.0))
    reference = fold.fold_numpy(acc_numpy, x, np.float32(37.0))
    np.testing.assert_array_equal(acc_numba, acc_numpy)
    np.testing.assert_array_equal(acc_numpy, start + np.float32(37.0) * x)  # one rounding per operation, no FMA
    assert squares == pytest.approx(reference, rel=1e-5)
    assert squares == pytest.approx(float(np.dot(x.astype(np.float64), x.astype(np.float64))), rel=1e-5)


@pytest.mark.parametrize("size", [1, 3, 4, 5, 8, 11, 4097])
def test_the_kernel_folds_every_quarter_and_the_tail(size: int) -> None:
    # the kernel walks four quarters of the tensor at once, then the last size % 4 elements: each
    # element is folded once, and a bad value in any of them reaches the sum of squares
    fn, _ = fold.kernel()
    rng = np.random.default_rng(size)
    x = rng.standard_normal(size).astype(np.float32)
    acc = rng.standard_normal(size).astype(np.float32)
    expected = acc + np.float32(3.0) * x
    squares = fn(acc, x, np.float32(3.0))
    np.testing.assert_array_equal(acc, expected)
    assert squares == pytest.approx(float(np.dot(x.astype(np.float64), x.astype(np.float64))), rel=1e-5)
    q = size // 4
    for position in sorted({0, q - 1, q, 2 * q, 3 * q, 4 * q - 1, size - 1} - {-1}):
        poisoned = x.copy()
        poisoned[position] = np.nan
        assert math.isnan(fn(np.zeros(size, np.float32), poisoned, np.float32(1.0))), position


@pytest.mark.parametrize("bad, reason", [(np.nan, Reason.NON_FINITE), (np.inf, Reason.NON_FINITE),
                                         (-np.inf, Reason.NON_FINITE), (8e5, Reason.NORM), (1e30, Reason.NORM)])
def test_a_refused_delta_leaves_the_sums_untouched(bad: float, reason: Reason) -> None:
    mean = WeightedMean(SHAPES)
    good = {"w": np.full((2, 2), 0.5, np.float32), "b": np.array([1, 2], np.float32)}
    mean.add(good, 2.0)
    before = mean.result()
    poisoned = {"w": np.array([[0.1, bad], [bad, 0.2]], np.float32), "b": np.zeros(2, np.float32)}
    for step in (mean.check, mean.add):
        with pytest.raises(RejectedMessage) as refused:
            step(poisoned, 1.0)
        assert refused.value.reason is reason
    assert mean.count == 1 and mean.total_weight == 2.0
    for name, value in mean.result().items():
        np.testing.assert_array_equal(value, before[name])
    mean.add(good, 2.0)  # and it goes on folding normally
    np.testing.assert_array_equal(mean.result()["w"], before["w"])


@pytest.mark.parametrize("position", [0, 1, 15, 16, 17, 31, 40])
def test_refused_and_unadded_deltas_leave_bit_identical_sums(position: int) -> None:
    """Wherever a refusal (or a checked delta whose journal write failed) falls against the
    snapshots, the sums equal, bit for bit, those of a mean that only ever saw the added deltas."""
    rng = np.random.default_rng(position)
    deltas = [{"w": rng.standard_normal((2, 2)).astype(np.float32), "b": rng.standard_normal(2).astype(np.float32)}
              for _ in range(45)]
    weights = [float(w) for w in rng.integers(1, 300, 45)]
    clean, disturbed = WeightedMean(SHAPES), WeightedMean(SHAPES)
    for i, (delta, weight) in enumerate(zip(deltas, weights, strict=True)):
        if i == position:
            with pytest.raises(RejectedMessage):
                disturbed.check({"w": np.full((2, 2), np.nan, np.float32), "b": np.zeros(2, np.float32)}, 5.0)
            disturbed.check({"w": np.full((2, 2), 9, np.float32), "b": np.ones(2, np.float32)}, 7.0)  # never added
        clean.add(delta, weight)
        disturbed.check(delta, weight)
        disturbed.add(delta, weight)
    disturbed.check({"w": np.full((2, 2), 3, np.float32), "b": np.ones(2, np.float32)}, 1.0)  # pending at the end
    assert disturbed.count == clean.count == 45 and disturbed.total_weight == clean.total_weight
    for name, value in disturbed.result().items():
        np.testing.assert_array_equal(value, clean.result()[name])


# -- a round's buffers go to the next round ----------------------------------------------------------

RECYCLED = {"w": (64, 32), "b": (32,)}  # shapes no other test uses, so no other mean takes the spare


def _delta(seed: int, shapes: dict[str, tuple[int, ...]] = RECYCLED) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {name: rng.standard_normal(shape).astype(np.float32) for name, shape in shapes.items()}


def _fresh_mean(shapes: dict[str, tuple[int, ...]]) -> WeightedMean:
    strategy._take_spare(strategy._shapes_key(shapes))  # drop any spare: buffers of its own
    return WeightedMean(shapes)


def test_a_released_mean_hands_its_buffers_to_the_next_and_results_stay_exact() -> None:
    first = _fresh_mean(RECYCLED)
    for seed in range(20):  # past a snapshot: both buffers hold data
        first.add(_delta(seed), 1.0 + seed)
    kept = first.result()
    kept_copy = {name: array.copy() for name, array in kept.items()}
    buffers = [*first._sums.values(), *first._snapshot.values()]
    first.release()

    second = WeightedMean(RECYCLED)
    assert all(any(np.shares_memory(mine, old) for old in buffers)
               for mine in [*second._sums.values(), *second._snapshot.values()]), "fresh memory instead of the spare"
    reference = _fresh_mean(RECYCLED)
    assert not any(np.shares_memory(mine, old) for old in buffers for mine in reference._sums.values())
    for mean in (second, reference):
        mean.add(_delta(100), 3.0)
    for name in RECYCLED:  # the recycled sums started from zeros
        np.testing.assert_array_equal(second.result()[name], reference.result()[name])
    for mean in (second, reference):
        # refused after one add: the rewind must start from zeros, not from the recycled snapshot's data
        poisoned = _delta(101)
        poisoned["w"][3, 3] = np.nan
        with pytest.raises(RejectedMessage):
            mean.check(poisoned, 1.0)
        mean.add(_delta(102), 2.0)
    for name in RECYCLED:
        np.testing.assert_array_equal(second.result()[name], reference.result()[name])
        np.testing.assert_array_equal(kept[name], kept_copy[name])  # the old result is the caller's own
    np.testing.assert_array_equal(second.result()["b"], (3 * _delta(100)["b"] + 2 * _delta(102)["b"]) / np.float32(5))


def test_a_released_mean_refuses_any_further_use() -> None:
    mean = _fresh_mean(RECYCLED)
    mean.add(_delta(1), 1.0)
    mean.check(_delta(2), 1.0)  # pending: released anyway
    mean.release()
    mean.release()  # twice is harmless, and gives nothing away twice
    for use in (lambda: mean.check(_delta(3), 1.0), lambda: mean.add(_delta(3), 1.0), mean.result):
        with pytest.raises(RuntimeError, match="released"):
            use()
    one = WeightedMean(RECYCLED)
    other = WeightedMean(RECYCLED)  # only one of them gets the spare
    assert not any(np.shares_memory(a, b) for a in one._sums.values() for b in other._sums.values())
    assert one.count == other.count == 0
    assert {n: a.shape for n, a in one._sums.items()} == {n: a.shape for n, a in other._sums.items()} == RECYCLED


def test_a_spare_of_other_shapes_is_not_taken() -> None:
    first = _fresh_mean(RECYCLED)
    first.add(_delta(1), 1.0)
    buffers = list(first._sums.values())
    first.release()
    other_shapes = {"w": (32, 64), "b": (32,)}  # same sizes, another shape
    other = WeightedMean(other_shapes)
    assert {n: a.shape for n, a in other._sums.items()} == other_shapes
    assert not any(np.shares_memory(a, b) for a in other._sums.values() for b in buffers)
    assert WeightedMean(RECYCLED)._sums["w"] is buffers[0]  # still there for a mean of its shapes


def test_check_then_add_folds_the_checked_delta_once() -> None:
    mean = WeightedMean(SHAPES)
    first = {"w": np.ones((2, 2), np.float32), "b": np.ones(2, np.float32)}
    other = {"w": np.full((2, 2), 3, np.float32), "b": np.full(2, 3, np.float32)}
    mean.check(first, 1.0)
    mean.add(other, 1.0)  # not what was checked: checked and folded on its own
    np.testing.assert_array_equal(mean.result()["w"], np.full((2, 2), 3, np.float32))
    mean.check(first, 1.0)
    mean.add(first, 3.0)  # same delta, another weight: folded with the weight it is added with
    np.testing.assert_array_equal(mean.result()["b"], np.full(2, 1.5, np.float32))  # (3 + 3) / 4
    mean.check(other, 2.0)
    mean.add(other, 2.0)
    np.testing.assert_array_equal(mean.result()["b"], np.full(2, 2.0, np.float32))  # (3 + 3 + 6) / 6
    assert mean.count == 3 and mean.total_weight == 6.0


def test_numpy_fallback_is_chosen_by_environment() -> None:
    code = ("from fedmq.aggregator import fold; import numpy as np; from fedmq.aggregator.strategy import WeightedMean;"
            "m = WeightedMean({'w': (3,)}); m.add({'w': np.array([1, 2, 3], np.float32)}, 2.0);"
            "print(fold.kernel()[1], m.result()['w'].tolist())")
    for env, name in (({"FEDMQ_FOLD": "numpy"}, "numpy"), ({"FEDMQ_FOLD": ""}, "numba")):
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                             env={**os.environ, **env}).stdout.split(None, 1)
        assert out[0] == name and out[1].strip() == "[1.0, 2.0, 3.0]"


def test_small_models_never_import_numba_and_large_tensors_use_the_kernel() -> None:
    code = ("import sys, numpy as np; from fedmq.aggregator import fold; from fedmq.aggregator.strategy import WeightedMean;"
            "m = WeightedMean({'w': (64, 64)}); m.add({'w': np.ones((64, 64), np.float32)}, 1.0);"
            "small = 'numba' in sys.modules; print(fold.warm_up(64 * 64), small);"
            "big = WeightedMean({'w': (fold.SMALL,)}); big.add({'w': np.ones(fold.SMALL, np.float32)}, 2.0);"
            "print(fold.warm_up(fold.SMALL), 'numba' in sys.modules, float(big.result()['w'][0]))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "FEDMQ_FOLD": ""}).stdout.split()
    assert out == ["numpy", "False", "numba", "True", "1.0"]


def test_once_compiled_the_kernel_folds_small_tensors_too(monkeypatch: pytest.MonkeyPatch) -> None:
    assert fold.kernel()[1] == "numba"
    monkeypatch.setattr(fold, "fold_numpy", lambda *_: pytest.fail("numpy passes (a BLAS dot) with the kernel compiled"))
    acc = np.zeros(10, np.float32)
    assert fold.fold(acc, np.full(10, 2.0, np.float32), 0.5) == pytest.approx(40.0)
    np.testing.assert_array_equal(acc, np.ones(10, np.float32))
