"""Robust aggregation and norm clipping against hand-computed arrays, then a Byzantine run on digits."""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
import pytest

from fedmq.aggregator.optimizers import ServerOptimizer
from fedmq.aggregator.robust import (
    Accumulator,
    CoordinateMedian,
    NormClipping,
    TooManyUpdates,
    TrimmedMean,
    make_accumulator,
)
from fedmq.aggregator.strategy import WeightedMean
from fedmq.broker.architecture import MLPArchitecture
from fedmq.broker.errors import Reason, RejectedMessage
from fedmq.demo import dirichlet_partition, load_digits_split
from fedmq.edge_agent.training import evaluate, train

SHAPES = {"w": (2, 2), "b": (2,)}


def d(w: list[list[float]], b: list[float]) -> dict[str, np.ndarray]:
    return {"w": np.array(w, np.float32), "b": np.array(b, np.float32)}


def norm(delta: Mapping[str, np.ndarray]) -> float:
    return math.sqrt(sum(float(np.sum(np.asarray(v, np.float64) ** 2)) for v in delta.values()))


class Recorder:
    """An accumulator that keeps what it was given, to see exactly what a wrapper passes on."""

    def __init__(self) -> None:
        self.seen: list[tuple[dict[str, np.ndarray], float]] = []
        self.total_weight = 0.0

    @property
    def count(self) -> int:
        return len(self.seen)

    def add(self, delta: Mapping[str, np.ndarray], weight: float) -> None:
        self.seen.append(({k: np.array(v) for k, v in delta.items()}, weight))
        self.total_weight += weight

    def result(self) -> dict[str, np.ndarray]:
        raise NotImplementedError


# -- coordinate median ---------------------------------------------------------------------------

THREE = [
    d([[1, 5], [-2, 0]], [1, 10]),
    d([[3, 1], [4, 0]], [2, -10]),
    d([[2, 9], [-8, 7]], [30, 0]),
]
FOURTH = d([[10, -1], [0, 1]], [4, 4])


def test_median_of_an_odd_count_is_the_middle_value() -> None:
    median = CoordinateMedian(SHAPES)
    for delta in THREE:
        median.add(delta, 1)
    out = median.result()
    # per coordinate: sorted (1,2,3) (1,5,9) (-8,-2,4) (0,0,7) | b: (1,2,30) (-10,0,10)
    np.testing.assert_array_equal(out["w"], np.array([[2, 5], [-2, 0]], np.float32))
    np.testing.assert_array_equal(out["b"], np.array([2, 0], np.float32))
    assert out["w"].dtype == np.float32 and out["w"].shape == (2, 2)
    assert median.count == 3 and median.total_weight == 3


def test_median_of_an_even_count_averages_the_two_middle_values() -> None:
    median = CoordinateMedian(SHAPES)
    for delta in [*THREE, FOURTH]:
        median.add(delta, 1)
    out = median.result()
    # (1,2,3,10) -> 2.5; (-1,1,5,9) -> 3; (-8,-2,0,4) -> -1; (0,0,1,7) -> 0.5 | (1,2,4,30) -> 3; (-10,0,4,10) -> 2
    np.testing.assert_array_equal(out["w"], np.array([[2.5, 3], [-1, 0.5]], np.float32))
    np.testing.assert_array_equal(out["b"], np.array([3, 2], np.float32))


def test_median_with_ties() -> None:
    median = CoordinateMedian({"x": (3,)})
    for row in ([5, 1, 2], [5, 1, 2], [5, 3, 2], [1, 3, 9]):
        median.add({"x": np.array(row, np.float32)}, 1)
    # (1,5,5,5) -> 5; (1,1,3,3) -> 2; (2,2,2,9) -> 2
    np.testing.assert_array_equal(median.result()["x"], np.array([5, 2, 2], np.float32))


def test_median_is_unweighted_and_ignores_one_huge_outlier() -> None:
    median = CoordinateMedian({"x": (1,)})
    for value, weight in ((1.0, 1), (2.0, 1000), (3.0, 1), (1e30, 5)):
        median.add({"x": np.array([value], np.float32)}, weight)
    # weights do not matter: (1, 2, 3, 1e30) -> (2 + 3) / 2
    np.testing.assert_array_equal(median.result()["x"], np.array([2.5], np.float32))
    assert median.total_weight == 1007


def test_median_copies_the_deltas() -> None:
    """Deltas are views into payloads in the daemon; the median must not depend on them later."""
    median = CoordinateMedian({"x": (2,)})
    buffer = np.array([1, 2], np.float32)
    median.add({"x": buffer}, 1)
    buffer[:] = 100
    np.testing.assert_array_equal(median.result()["x"], np.array([1, 2], np.float32))


def test_median_cap_is_a_clear_value_error_and_keeps_the_state() -> None:
    median = CoordinateMedian(SHAPES, max_updates=2)
    median.add(THREE[0], 1)
    median.add(THREE[1], 1)
    with pytest.raises(TooManyUpdates, match="max_updates=2") as info:
        median.add(THREE[2], 1)
    assert isinstance(info.value, ValueError) and info.value.max_updates == 2
    with pytest.raises(TooManyUpdates):
        median.check(THREE[2], 1)
    assert median.count == 2 and median.total_weight == 2
    np.testing.assert_array_equal(median.result()["b"], np.array([1.5, 0], np.float32))


def test_buffered_strategies_refuse_empty_bad_weight_and_bad_shapes() -> None:
    for accumulator in (CoordinateMedian(SHAPES), TrimmedMean(SHAPES)):
        with pytest.raises(ValueError, match="no update"):
            accumulator.result()
        with pytest.raises(ValueError, match="weight"):
            accumulator.add(THREE[0], 0)
        with pytest.raises(ValueError, match="shape"):
            accumulator.add({"w": np.zeros(4, np.float32), "b": np.zeros(2, np.float32)}, 1)
        with pytest.raises(ValueError, match="tensors"):
            accumulator.add({"w": np.zeros((2, 2), np.float32)}, 1)
        assert accumulator.count == 0 and accumulator.total_weight == 0
    with pytest.raises(ValueError, match="max_updates"):
        CoordinateMedian(SHAPES, max_updates=0)


# -- trimmed mean ---------------------------------------------------------------------------------

def test_trimmed_mean_drops_the_extremes_per_coordinate() -> None:
    trimmed = TrimmedMean({"x": (2,)}, trim_fraction=0.2)
    for row in ([1, -7], [2, 3], [3, 0], [4, 1], [100, 2]):
        trimmed.add({"x": np.array(row, np.float32)}, 1)
    # 5 values, floor(0.2 * 5) = 1 dropped at each end: (2,3,4) -> 3; (0,1,2) -> 1
    np.testing.assert_array_equal(trimmed.result()["x"], np.array([3, 1], np.float32))


def test_trimmed_mean_even_count() -> None:
    trimmed = TrimmedMean({"x": (1,)}, trim_fraction=0.25)
    for value in (0, 1, 2, 3, 4, -50):
        trimmed.add({"x": np.array([value], np.float32)}, 1)
    # 6 values, floor(0.25 * 6) = 1 dropped at each end: (-50 | 0,1,2,3 | 4) -> 1.5
    np.testing.assert_array_equal(trimmed.result()["x"], np.array([1.5], np.float32))


def test_trimmed_mean_with_ties_and_too_few_updates_to_trim() -> None:
    trimmed = TrimmedMean({"x": (1,)}, trim_fraction=0.2)
    for value in (7, 7, 1, 7, 7):
        trimmed.add({"x": np.array([value], np.float32)}, 1)
    # (1 | 7,7,7 | 7) -> 7
    np.testing.assert_array_equal(trimmed.result()["x"], np.array([7], np.float32))
    few = TrimmedMean({"x": (1,)}, trim_fraction=0.2)
    for value in (1, 2, 3, 10):
        few.add({"x": np.array([value], np.float32)}, 5)
    # floor(0.2 * 4) = 0: nothing is trimmed, the plain (unweighted) mean 16 / 4
    np.testing.assert_array_equal(few.result()["x"], np.array([4], np.float32))


def test_trimmed_mean_is_unweighted_and_zero_trim_is_the_plain_mean() -> None:
    plain = TrimmedMean(SHAPES, trim_fraction=0.0)
    for delta, weight in zip([*THREE, FOURTH], (1, 10, 100, 1000), strict=True):
        plain.add(delta, weight)
    out = plain.result()
    # column sums / 4: w (16/4, 14/4, -6/4, 8/4), b (37/4, 4/4)
    np.testing.assert_array_equal(out["w"], np.array([[4, 3.5], [-1.5, 2]], np.float32))
    np.testing.assert_array_equal(out["b"], np.array([9.25, 1], np.float32))
    assert plain.total_weight == 1111


@pytest.mark.parametrize("fraction", [-0.1, 0.5, 0.7, float("nan")])
def test_trimmed_mean_refuses_bad_fractions(fraction: float) -> None:
    with pytest.raises(ValueError, match="trim_fraction"):
        TrimmedMean(SHAPES, trim_fraction=fraction)


def test_trimmed_mean_cap() -> None:
    trimmed = TrimmedMean(SHAPES, max_updates=1)
    trimmed.add(THREE[0], 1)
    with pytest.raises(TooManyUpdates, match="max_updates=1"):
        trimmed.add(THREE[1], 1)


# -- weighted forms -------------------------------------------------------------------------------

def weighted_median_of(rows: list[list[float]], weights: list[float]) -> np.ndarray:
    median = CoordinateMedian({"x": (len(rows[0]),)}, weighted=True)
    for row, weight in zip(rows, weights, strict=True):
        median.add({"x": np.array(row, np.float32)}, weight)
    return median.result()["x"]


def test_weighted_median_of_an_odd_count() -> None:
    out = weighted_median_of([[10, 5], [20, 4], [30, 3], [40, 2], [50, 1]], [1, 2, 1, 1, 4])
    # total 9, half 4.5; x0 sorted 10,20,30,40,50 cum 1,3,4,5,9 -> 40; x1 sorted 1,2,3,4,5 cum 4,5,6,8,9 -> 2
    # (unweighted: 30 and 3)
    np.testing.assert_array_equal(out, np.array([40, 2], np.float32))


def test_weighted_median_of_an_even_count_takes_one_value_when_no_cumulative_weight_is_half() -> None:
    out = weighted_median_of([[4, -1], [1, 3], [3, 2], [2, 0]], [1, 2, 3, 1])
    # total 7, half 3.5; x0 sorted 1,2,3,4 cum 2,3,6,7 -> 3; x1 sorted -1,0,2,3 cum 1,2,5,7 -> 2
    # (unweighted: 2.5 and 1)
    np.testing.assert_array_equal(out, np.array([3, 2], np.float32))


def test_weighted_median_averages_across_a_cumulative_weight_of_exactly_half() -> None:
    out = weighted_median_of([[1, 7], [2, 5], [5, 6], [9, 8]], [1, 3, 2, 2])
    # total 8, half 4; x0 sorted 1,2,5,9 cum 1,4,6,8: half at 2 -> (2 + 5) / 2; x1 sorted 5,6,7,8 cum 3,5,6,8 -> 6
    np.testing.assert_array_equal(out, np.array([3.5, 6], np.float32))


def test_weighted_median_finds_a_half_that_float_sums_miss() -> None:
    # 0.1 + 0.3 + 0.7 is exactly half of 2.2, but not in floating point: the tolerance finds the tie
    out = weighted_median_of([[1], [2], [3], [4]], [0.1, 0.3, 0.7, 1.1])
    np.testing.assert_array_equal(out, np.array([3.5], np.float32))


@pytest.mark.parametrize("outlier_weight, expected", [
    (1, 2.5),       # total 4, half 2: the cumulative weight of 2 is exactly half -> (2 + 3) / 2
    (2.9, 3),       # total 5.9, half 2.95: reached at 3 (cum 3), the outlier holds less than half
    (3, 501.5),     # total 6, half 3: exactly half at 3 -> (3 + 1000) / 2, the outlier now counts
    (3.5, 1000),    # total 6.5, half 3.25: the outlier holds more than half the mass and is the median
])
def test_a_heavy_outlier_moves_the_weighted_median_only_with_half_the_weight_mass(outlier_weight: float,
                                                                                 expected: float) -> None:
    out = weighted_median_of([[1], [2], [3], [1000]], [1, 1, 1, outlier_weight])
    np.testing.assert_array_equal(out, np.array([expected], np.float32))


def test_weighted_trimmed_mean_keeps_part_of_a_value_straddling_the_cut() -> None:
    trimmed = TrimmedMean({"x": (2,)}, trim_fraction=0.25, weighted=True)
    for row, weight in (([0, 50], 1), ([1, -4], 2), ([2, 0], 2), ([7, 1], 2), ([100, -100], 1)):
        trimmed.add({"x": np.array(row, np.float32)}, weight)
    # total 8, a mass of 2 trimmed from each end: x0 sorted 0,1,2,7,100 cover [0,1) [1,3) [3,5) [5,7) [7,8);
    # kept [2,6): 1 with 1 of its 2, 2 with 2, 7 with 1 -> (1 + 4 + 7) / 4 = 3
    # x1 sorted -100,-4,0,1,50: -4 with 1, 0 with 2, 1 with 1 -> (-4 + 0 + 1) / 4 = -0.75
    # (unweighted, one value trimmed at each end: 10 / 3 and -1)
    np.testing.assert_array_equal(trimmed.result()["x"], np.array([3, -0.75], np.float32))
    assert trimmed.total_weight == 8


def test_weighted_trimmed_mean_trims_a_heavy_outlier_only_as_far_as_the_trimmed_mass() -> None:
    trimmed = TrimmedMean({"x": (1,)}, trim_fraction=0.2, weighted=True)
    for value, weight in ((1, 1), (2, 1), (3, 1), (100, 2)):
        trimmed.add({"x": np.array([value], np.float32)}, weight)
    # total 5, mass 1 trimmed at each end: 1 goes, 100 keeps 1 of its 2 -> (2 + 3 + 100) / 3 = 35
    np.testing.assert_array_equal(trimmed.result()["x"], np.array([35], np.float32))


def test_weighted_trimmed_mean_with_zero_trim_is_the_weighted_mean() -> None:
    trimmed = TrimmedMean({"x": (1,)}, trim_fraction=0.0, weighted=True)
    trimmed.add({"x": np.array([1], np.float32)}, 3)
    trimmed.add({"x": np.array([5], np.float32)}, 1)
    # (3 * 1 + 1 * 5) / 4
    np.testing.assert_array_equal(trimmed.result()["x"], np.array([2], np.float32))


def test_equal_weights_reproduce_the_unweighted_median() -> None:
    for deltas, w, b in ((THREE, [[2, 5], [-2, 0]], [2, 0]), ([*THREE, FOURTH], [[2.5, 3], [-1, 0.5]], [3, 2])):
        median = CoordinateMedian(SHAPES, weighted=True)
        for delta in deltas:
            median.add(delta, 2.5)
        out = median.result()
        np.testing.assert_array_equal(out["w"], np.array(w, np.float32))
        np.testing.assert_array_equal(out["b"], np.array(b, np.float32))
        assert out["w"].dtype == np.float32 and out["w"].shape == (2, 2)


def test_equal_weights_reproduce_the_unweighted_trimmed_mean() -> None:
    trimmed = TrimmedMean({"x": (2,)}, trim_fraction=0.2, weighted=True)
    for row in ([1, -7], [2, 3], [3, 0], [4, 1], [100, 2]):
        trimmed.add({"x": np.array(row, np.float32)}, 0.3)
    # 0.2 x 5 = 1 value's mass trimmed at each end, as unweighted: (2,3,4) -> 3; (0,1,2) -> 1
    np.testing.assert_array_equal(trimmed.result()["x"], np.array([3, 1], np.float32))


@pytest.mark.parametrize("count, trim_fraction", [(4, 0.25), (5, 0.2), (10, 0.3), (11, 0.0)])
@pytest.mark.parametrize("weight", [1, 0.1, 3.7])
def test_equal_weights_match_the_unweighted_forms_bit_for_bit(count: int, trim_fraction: float,
                                                             weight: float) -> None:
    rng = np.random.default_rng(count)
    deltas = [{"w": rng.standard_normal((2, 2)).astype(np.float32), "b": rng.standard_normal(2).astype(np.float32)}
              for _ in range(count)]
    pairs = [(CoordinateMedian(SHAPES), CoordinateMedian(SHAPES, weighted=True)),
             (TrimmedMean(SHAPES, trim_fraction=trim_fraction),
              TrimmedMean(SHAPES, trim_fraction=trim_fraction, weighted=True))]
    for plain, weighted in pairs:
        for delta in deltas:
            plain.add(delta, weight)
            weighted.add(delta, weight)
        expected, got = plain.result(), weighted.result()
        for name in SHAPES:
            np.testing.assert_array_equal(got[name], expected[name])


def test_weighted_strategies_keep_no_weight_of_a_refused_update() -> None:
    median = CoordinateMedian({"x": (1,)}, weighted=True, max_updates=2)
    median.add({"x": np.array([1], np.float32)}, 1)
    with pytest.raises(ValueError, match="shape"):
        median.add({"x": np.zeros(2, np.float32)}, 100)
    median.add({"x": np.array([5], np.float32)}, 1)
    with pytest.raises(TooManyUpdates):
        median.add({"x": np.array([9], np.float32)}, 100)
    # only the weights 1 and 1 remain: half exactly at 1 -> (1 + 5) / 2
    np.testing.assert_array_equal(median.result()["x"], np.array([3], np.float32))
    assert median.count == 2 and median.total_weight == 2


@pytest.mark.parametrize("build", [CoordinateMedian, TrimmedMean])
def test_weighted_must_be_a_bool(build: type) -> None:
    for bad in ("yes", 1, None):
        with pytest.raises(ValueError, match="weighted"):
            build(SHAPES, weighted=bad)
    assert build(SHAPES).weighted is False and build(SHAPES, weighted=True).weighted is True


# -- norm clipping --------------------------------------------------------------------------------

NORM_5 = d([[3, 0], [0, 0]], [0, 4])   # global L2 norm over both tensors: sqrt(9 + 16) = 5


def test_clip_leaves_a_delta_of_exactly_max_norm_untouched() -> None:
    inner = Recorder()
    clip = NormClipping(inner, max_norm=5.0)
    clip.add(NORM_5, 3)
    (seen, weight), = inner.seen
    assert weight == 3 and clip.clipped == 0
    for name in SHAPES:
        np.testing.assert_array_equal(seen[name], NORM_5[name])


def test_clip_scales_a_larger_delta_down_to_max_norm_keeping_its_direction() -> None:
    inner = Recorder()
    clip = NormClipping(inner, max_norm=2.5)
    clip.add(NORM_5, 7)
    (seen, weight), = inner.seen
    # factor 2.5 / 5 = 0.5, exact in float32
    np.testing.assert_array_equal(seen["w"], np.array([[1.5, 0], [0, 0]], np.float32))
    np.testing.assert_array_equal(seen["b"], np.array([0, 2], np.float32))
    assert norm(seen) == 2.5 and weight == 7 and clip.clipped == 1
    assert NORM_5["w"][0, 0] == 3, "the caller's delta is not modified"


def test_clip_preserves_direction_for_random_deltas() -> None:
    rng = np.random.default_rng(3)
    inner = Recorder()
    clip = NormClipping(inner, max_norm=0.75)
    original = {"w": rng.standard_normal((2, 2)).astype(np.float32), "b": rng.standard_normal(2).astype(np.float32)}
    clip.add(original, 1)
    seen = inner.seen[0][0]
    assert norm(seen) == pytest.approx(0.75, rel=1e-6)
    flat_in = np.concatenate([original[k].ravel() for k in SHAPES]).astype(np.float64)
    flat_out = np.concatenate([seen[k].ravel() for k in SHAPES]).astype(np.float64)
    cosine = flat_in @ flat_out / (np.linalg.norm(flat_in) * np.linalg.norm(flat_out))
    assert cosine == pytest.approx(1.0, abs=1e-6)


def test_clip_leaves_small_deltas_bit_identical_so_the_inner_maths_is_untouched() -> None:
    rng = np.random.default_rng(4)
    deltas = [{"w": rng.uniform(-0.1, 0.1, (2, 2)).astype(np.float32), "b": rng.uniform(-0.1, 0.1, 2).astype(np.float32)}
              for _ in range(6)]
    plain, wrapped = WeightedMean(SHAPES), NormClipping(WeightedMean(SHAPES), max_norm=1.0)
    for i, delta in enumerate(deltas):
        plain.add(delta, i + 1)
        wrapped.add(delta, i + 1)
    expected, got = plain.result(), wrapped.result()
    for name in SHAPES:
        np.testing.assert_array_equal(got[name], expected[name])
    assert wrapped.count == 6 and wrapped.total_weight == 21 and wrapped.clipped == 0


def test_clip_around_a_weighted_mean_hand_computed() -> None:
    clip = NormClipping(WeightedMean(SHAPES), max_norm=2.5)
    clip.add(NORM_5, 1)                            # clipped to w [[1.5,0],[0,0]], b [0,2]
    clip.add(d([[0.5, 0], [0, 0]], [0, 0]), 3)     # norm 0.5: untouched
    out = clip.result()
    # (1 * 1.5 + 3 * 0.5) / 4 = 0.75 ; b (1 * 2 + 0) / 4 = 0.5
    np.testing.assert_array_equal(out["w"], np.array([[0.75, 0], [0, 0]], np.float32))
    np.testing.assert_array_equal(out["b"], np.array([0, 0.5], np.float32))


@pytest.mark.parametrize("inner_type", [CoordinateMedian, TrimmedMean])
def test_clip_wraps_the_buffered_strategies(inner_type: type) -> None:
    clip = NormClipping(inner_type({"x": (1,)}), max_norm=2.0)
    for value in (1.0, -1.5, 1e6):
        clip.add({"x": np.array([value], np.float32)}, 1)
    # the huge one is clipped to 2.0 first; median of (-1.5, 1, 2) is 1; trimmed (k = 0) mean is 0.5
    expected = 1.0 if inner_type is CoordinateMedian else 0.5
    np.testing.assert_array_equal(clip.result()["x"], np.array([expected], np.float32))
    assert clip.count == 3 and clip.clipped == 1


@pytest.mark.parametrize("inner, expected", [
    # the huge one is clipped to 2.0 and keeps its weight 3: total 5, sorted -1.5, 1, 2 cum 1, 2, 5 -> 2
    (CoordinateMedian({"x": (1,)}, weighted=True), 2.0),
    # trim a mass of 0.5 at each end: -1.5 keeps 0.5, 1 keeps 1, 2 keeps 2.5 -> (-0.75 + 1 + 5) / 4
    (TrimmedMean({"x": (1,)}, trim_fraction=0.1, weighted=True), 1.3125),
])
def test_clip_wraps_the_weighted_strategies_and_passes_the_weights_on(inner: Accumulator, expected: float) -> None:
    clip = NormClipping(inner, max_norm=2.0)
    for value, weight in ((1.0, 1), (-1.5, 1), (1e6, 3)):
        clip.add({"x": np.array([value], np.float32)}, weight)
    np.testing.assert_array_equal(clip.result()["x"], np.array([expected], np.float32))
    assert clip.count == 3 and clip.clipped == 1 and clip.total_weight == 5


def test_reject_mode_refuses_above_max_norm_and_keeps_exactly_max_norm() -> None:
    inner = WeightedMean(SHAPES)
    guard = NormClipping(inner, max_norm=2.5, mode="reject")
    with pytest.raises(RejectedMessage) as info:
        guard.add(NORM_5, 1)
    assert info.value.reason is Reason.NORM
    assert "norm 5" in info.value.detail and "2.5" in info.value.detail
    with pytest.raises(RejectedMessage):
        guard.check(NORM_5, 1)
    assert inner.count == 0 and guard.rejected == 1
    exact = NormClipping(WeightedMean(SHAPES), max_norm=5.0, mode="reject")
    exact.add(NORM_5, 2)
    np.testing.assert_array_equal(exact.result()["b"], NORM_5["b"])
    assert exact.count == 1 and exact.total_weight == 2


@pytest.mark.parametrize("mode", ["clip", "reject"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_deltas_are_refused_in_both_modes(mode: str, bad: float) -> None:
    inner = WeightedMean(SHAPES)
    guard = NormClipping(inner, max_norm=1.0, mode=mode)  # type: ignore[arg-type]
    with pytest.raises(RejectedMessage) as info:
        guard.add(d([[0, 0], [0, bad]], [0, 0]), 1)
    assert info.value.reason is Reason.NON_FINITE
    assert inner.count == 0


def test_norm_is_computed_without_float32_overflow() -> None:
    # 3e38 is a finite float32 whose square is not: the norm is taken in float64
    huge = {"w": np.full((2, 2), 3e38, np.float32), "b": np.zeros(2, np.float32)}
    assert NormClipping.norm(huge) == pytest.approx(6e38)
    inner = Recorder()
    NormClipping(inner, max_norm=1.0).add(huge, 1)
    assert norm(inner.seen[0][0]) == pytest.approx(1.0, rel=1e-6)


def test_norm_clipping_refuses_bad_settings() -> None:
    for bad in (0, -1.0, float("inf"), float("nan"), "1"):
        with pytest.raises(ValueError, match="max_norm"):
            NormClipping(WeightedMean(SHAPES), max_norm=bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="mode"):
        NormClipping(WeightedMean(SHAPES), max_norm=1.0, mode="scale")  # type: ignore[arg-type]


# -- factory --------------------------------------------------------------------------------------

def test_make_accumulator_builds_each_strategy() -> None:
    assert type(make_accumulator("fedavg", SHAPES)) is WeightedMean
    median = make_accumulator("median", SHAPES, max_updates=3)
    assert type(median) is CoordinateMedian and median.max_updates == 3
    trimmed = make_accumulator("trimmed_mean", SHAPES, trim_fraction=0.1)
    assert type(trimmed) is TrimmedMean and trimmed.trim_fraction == 0.1
    clipped = make_accumulator("median", SHAPES, max_norm=2.0, norm_mode="reject")
    assert type(clipped) is NormClipping and type(clipped.inner) is CoordinateMedian
    assert clipped.max_norm == 2.0 and clipped.mode == "reject"
    assert make_accumulator("fedavg", SHAPES, max_norm=1.0).mode == "clip"


def test_make_accumulator_passes_weighted_to_the_robust_strategies() -> None:
    median = make_accumulator("median", SHAPES, weighted=True, max_updates=4)
    assert type(median) is CoordinateMedian and median.weighted is True and median.max_updates == 4
    trimmed = make_accumulator("trimmed_mean", SHAPES, weighted=True, trim_fraction=0.1)
    assert type(trimmed) is TrimmedMean and trimmed.weighted is True and trimmed.trim_fraction == 0.1
    assert make_accumulator("median", SHAPES).weighted is False
    assert make_accumulator("trimmed_mean", SHAPES, weighted=False).weighted is False
    clipped = make_accumulator("median", SHAPES, weighted=True, max_norm=1.0)
    assert type(clipped) is NormClipping and type(clipped.inner) is CoordinateMedian and clipped.inner.weighted
    with pytest.raises(ValueError, match=r"'fedavg' takes no option\(s\) \['weighted'\]"):
        make_accumulator("fedavg", SHAPES, weighted=True)
    with pytest.raises(ValueError, match="weighted"):
        make_accumulator("median", SHAPES, weighted="yes")


def test_make_accumulator_names_what_is_wrong() -> None:
    with pytest.raises(ValueError, match="unknown aggregation 'krum'"):
        make_accumulator("krum", SHAPES)
    with pytest.raises(ValueError, match="trim_fraction"):
        make_accumulator("median", SHAPES, trim_fraction=0.1)
    with pytest.raises(ValueError, match="max_updates"):
        make_accumulator("fedavg", SHAPES, max_updates=5)
    with pytest.raises(ValueError, match="norm_mode needs max_norm"):
        make_accumulator("fedavg", SHAPES, norm_mode="reject")


# -- Byzantine clients on digits ------------------------------------------------------------------

ARCH = MLPArchitecture(64, (32,), 10)
CLIENTS = 10
ATTACKERS = frozenset({0, 1})    # 20% of the clients
ALPHA = 1.0
SEED = 2                         # partition and initial weights
ROUNDS = 20


@pytest.fixture(scope="module")
def digits() -> tuple[list[tuple[np.ndarray, np.ndarray]], np.ndarray, np.ndarray]:
    x_train, y_train, x_test, y_test = load_digits_split(0, 0.2)
    shards = dirichlet_partition(y_train, CLIENTS, ALPHA, SEED)
    return [(x_train[s], y_train[s]) for s in shards], x_test, y_test


def federated_accuracy(digits: tuple, strategy: str, attackers: frozenset[int], **options: object) -> float:
    """Test accuracy after ``ROUNDS`` synchronous rounds; ``attackers`` send ``-10 x`` their honest delta."""
    shards, x_test, y_test = digits
    params = ARCH.init_params(SEED)
    server = ServerOptimizer("sgd", lr=1.0)
    for rnd in range(ROUNDS):
        accumulator = make_accumulator(strategy, ARCH.param_shapes(), **options)
        for client, (x, y) in enumerate(shards):
            trained = train(params, ARCH, x, y, epochs=5, batch_size=16, lr=0.1, seed=1000 * rnd + client).params
            delta = {name: trained[name] - params[name] for name in params}
            if client in attackers:
                delta = {name: np.float32(-10) * value for name, value in delta.items()}
            try:
                accumulator.add(delta, len(y))
            except RejectedMessage:
                pass  # as the daemon does: refused (e.g. over the hard norm bound), not counted
        params = server.step(params, accumulator.result())
    return evaluate(params, ARCH, x_test, y_test)[0]


@pytest.fixture(scope="module")
def clean_fedavg(digits: tuple) -> float:
    return federated_accuracy(digits, "fedavg", frozenset())


def test_sign_flipping_clients_break_fedavg(digits: tuple, clean_fedavg: float) -> None:
    attacked = federated_accuracy(digits, "fedavg", ATTACKERS)
    print(f"clean FedAvg {clean_fedavg:.4f}; attacked FedAvg {attacked:.4f}")
    assert clean_fedavg > 0.9
    assert attacked < 0.5, f"2 of 10 clients sending -10 x their delta should ruin FedAvg, got {attacked:.4f}"


@pytest.mark.parametrize("strategy, options", [("median", {}), ("trimmed_mean", {"trim_fraction": 0.2})])
def test_robust_aggregation_resists_sign_flipping_clients(digits: tuple, clean_fedavg: float, strategy: str,
                                                          options: dict) -> None:
    attacked = federated_accuracy(digits, strategy, ATTACKERS, **options)
    print(f"clean FedAvg {clean_fedavg:.4f}; attacked {strategy} {attacked:.4f}")
    assert attacked >= clean_fedavg - 0.03, (
        f"attacked {strategy} reached {attacked:.4f}, more than 3 points below clean FedAvg ({clean_fedavg:.4f})"
    )


def test_norm_clipping_releases_the_mean_it_wraps_and_buffering_strategies_have_nothing_to_release() -> None:
    shapes = {"w": (5, 3)}
    inner = WeightedMean(shapes)
    clip = NormClipping(inner, max_norm=5.0)
    clip.add({"w": np.ones((5, 3), np.float32)}, 1.0)
    clip.release()
    with pytest.raises(RuntimeError, match="released"):
        clip.add({"w": np.ones((5, 3), np.float32)}, 1.0)
    median = NormClipping(CoordinateMedian(shapes), max_norm=5.0)
    median.add({"w": np.ones((5, 3), np.float32)}, 1.0)
    median.release()  # no buffers to hand over: it keeps working
    np.testing.assert_array_equal(median.result()["w"], np.ones((5, 3), np.float32))
