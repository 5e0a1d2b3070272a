"""Byzantine-robust aggregation and norm clipping with the accumulator interface of
:class:`~.strategy.WeightedMean`: ``add(delta, weight)``, ``result()``, ``count``, ``total_weight``.

A round can therefore use any of them. :class:`CoordinateMedian` and :class:`TrimmedMean` need every
delta of the round at once (an order statistic cannot be streamed), so they keep float32 copies up
to a cap, with the weight of each. They are unweighted unless built with ``weighted=True``, which
is meant for weights the caller has already capped. :class:`NormClipping` wraps any accumulator, as
Flower's ``dp_fixed_clipping`` wraps a strategy: it bounds or refuses each delta by its global L2
norm and leaves the wrapped maths alone.

Every accumulator also has ``check(delta, weight)``, which raises what ``add`` would raise without
changing any state, so that a caller can refuse an update before making it durable.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, Literal, Protocol

import numpy as np

from fedmq.broker.errors import FedmqError, Reason, RejectedMessage

from .strategy import WeightedMean

#: Default cap on the deltas a buffering strategy keeps for one round.
DEFAULT_MAX_UPDATES = 1000

#: The names :func:`make_accumulator` knows.
ACCUMULATORS = ("fedavg", "median", "trimmed_mean")


class Accumulator(Protocol):
    """What a round needs from an aggregation strategy."""

    @property
    def count(self) -> int: ...

    @property
    def total_weight(self) -> float: ...

    def add(self, delta: Mapping[str, np.ndarray], weight: float) -> None: ...

    def result(self) -> dict[str, np.ndarray]: ...


class TooManyUpdates(FedmqError, ValueError):
    """A buffering strategy already holds ``max_updates`` deltas."""

    def __init__(self, strategy: str, max_updates: int) -> None:
        self.max_updates = max_updates
        super().__init__(f"{strategy} keeps at most max_updates={max_updates} updates per round; refusing one more")


def _check_weight(weight: float) -> None:
    if not weight > 0:
        raise ValueError(f"weight must be positive, got {weight}")


#: Relative tolerance for "the cumulative weight is exactly half the total" in :func:`weighted_median`;
#: it absorbs the rounding of a float cumulative sum (0.1 + 0.3 + 0.7 is not quite half of 2.2).
HALF_TOLERANCE = 1e-9


def _sort_with_weights(stack: np.ndarray, weights: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``stack`` (count x n) sorted per column in float64, the weights in the same order, and their
    cumulative sums down each column."""
    order = np.argsort(stack, axis=0, kind="stable")
    values = np.take_along_axis(stack, order, axis=0).astype(np.float64)
    # scaling changes neither statistic, and makes equal weights exactly 1 so that they reproduce
    # the unweighted arithmetic bit for bit
    sorted_weights = (weights / weights.max())[order]
    return values, sorted_weights, np.cumsum(sorted_weights, axis=0)


def weighted_median(stack: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Per column of ``stack`` (count x n), the weighted median with ``weights`` (count, positive).

    The first sorted value whose cumulative weight reaches half the column's total; where the
    cumulative weight is exactly half (within :data:`HALF_TOLERANCE`, relative) the mean of that
    value and the next one. With equal weights this is :func:`numpy.median`.
    """
    values, _, cumulative = _sort_with_weights(stack, weights)
    half = cumulative[-1] / 2
    tolerance = HALF_TOLERANCE * half
    first = np.argmax(cumulative >= half - tolerance, axis=0)[np.newaxis]
    at_first = np.take_along_axis(values, first, axis=0)[0]
    tied = np.abs(np.take_along_axis(cumulative, first, axis=0)[0] - half) <= tolerance
    # a tie leaves the other half of the mass above, so ``first`` is never the last row there
    following = np.take_along_axis(values, np.minimum(first + 1, len(values) - 1), axis=0)[0]
    return np.where(tied, (at_first + following) / 2, at_first)


def weighted_trimmed_mean(stack: np.ndarray, weights: np.ndarray, trim_fraction: float) -> np.ndarray:
    """Per column of ``stack`` (count x n), the weighted mean after trimming a weight mass of
    ``trim_fraction`` x total from each end; a value straddling a cut keeps the part of its weight
    inside. ``trim_fraction`` must be below 0.5 so that some weight remains."""
    values, sorted_weights, upper = _sort_with_weights(stack, weights)
    lower = np.zeros_like(upper)
    lower[1:] = upper[:-1]
    total = upper[-1]
    cut = trim_fraction * total
    # each value covers [lower, upper) of the column's weight mass; keep its overlap with [cut, total - cut)
    kept = np.clip(np.minimum(upper, total - cut) - np.maximum(lower, cut), 0.0, sorted_weights)
    remaining = kept.sum(axis=0)
    if not np.all(remaining > 0):
        # only reachable by rounding, with trim_fraction a hair below 0.5
        raise ValueError(f"trim_fraction={trim_fraction!r} leaves no weight to average")
    return (kept * values).sum(axis=0) / remaining


class _BufferedUpdates:
    """Keeps one flat float32 copy of every delta, and its weight; subclasses reduce the stack per
    coordinate, using the weights only when ``weighted``.

    The copies are taken because decoded deltas are views into MQTT payloads that the caller
    would otherwise have to keep alive for the whole round.
    """

    name = "buffered"

    def __init__(self, shapes: Mapping[str, tuple[int, ...]], *, max_updates: int, weighted: bool) -> None:
        if type(max_updates) is not int or max_updates < 1:
            raise ValueError(f"max_updates must be a positive integer, got {max_updates!r}")
        if type(weighted) is not bool:
            raise ValueError(f"weighted must be True or False, got {weighted!r}")
        self.max_updates = max_updates
        self.weighted = weighted
        self._shapes = {name: tuple(shape) for name, shape in shapes.items()}
        self._slices: dict[str, slice] = {}
        start = 0
        for name, shape in self._shapes.items():
            size = math.prod(shape)
            self._slices[name] = slice(start, start + size)
            start += size
        self._size = start
        self._updates: list[np.ndarray] = []
        self._weights: list[float] = []
        self.total_weight = 0.0

    @property
    def count(self) -> int:
        return len(self._updates)

    def check(self, delta: Mapping[str, np.ndarray], weight: float) -> None:
        """Raise what :meth:`add` would raise, without changing anything."""
        _check_weight(weight)
        if len(self._updates) >= self.max_updates:
            raise TooManyUpdates(self.name, self.max_updates)
        if delta.keys() != self._shapes.keys():
            raise ValueError(f"delta has tensors {sorted(delta)}, expected {sorted(self._shapes)}")
        for name, shape in self._shapes.items():
            if np.shape(delta[name]) != shape:
                raise ValueError(f"delta tensor {name!r} has shape {np.shape(delta[name])}, expected {shape}")

    def add(self, delta: Mapping[str, np.ndarray], weight: float) -> None:
        """Keep a float32 copy of ``delta`` and its ``weight``; the weight counts towards
        :attr:`total_weight`, and towards the statistic only when ``weighted``."""
        self.check(delta, weight)
        flat = np.empty(self._size, dtype=np.float32)
        for name, piece in self._slices.items():
            flat[piece] = np.asarray(delta[name]).reshape(-1)
        self._updates.append(flat)
        self._weights.append(float(weight))
        self.total_weight += float(weight)

    def result(self) -> dict[str, np.ndarray]:
        """The per-coordinate statistic of every delta added; raises if nothing was added."""
        if not self._updates:
            raise ValueError("no update was added")
        weights = np.array(self._weights, dtype=np.float64)
        out: dict[str, np.ndarray] = {}
        for name, shape in self._shapes.items():
            piece = self._slices[name]
            # one tensor at a time: the transient stack is count x largest tensor, not count x model
            stack = np.stack([flat[piece] for flat in self._updates])
            out[name] = self._reduce(stack, weights).astype(np.float32).reshape(shape)
        return out

    def _reduce(self, stack: np.ndarray, weights: np.ndarray) -> np.ndarray:
        raise NotImplementedError


class CoordinateMedian(_BufferedUpdates):
    """Coordinate-wise median of the deltas (Yin et al. 2018), unweighted unless ``weighted=True``.

    By default every delta counts once whatever its ``weight`` (number of examples): an uncapped
    weighted median would let one device that claims many examples move the result on its own,
    which is what a robust statistic is meant to prevent. With an even count the median is the
    mean of the two middle values. It tolerates fewer than half of the deltas being arbitrary.

    With ``weighted=True`` it is the weighted median (:func:`weighted_median`): per coordinate the
    first sorted value whose cumulative weight reaches half the total, or the mean of that value
    and the next where the cumulative weight is exactly half; equal weights give the unweighted
    median. Each delta then counts with its ``weight``, which is only safe once the caller caps the
    weights: if no weight exceeds c times the median weight, attackers sending a fraction f of the
    deltas hold at most about f*c / (f*c + (1 - f)) of the weight mass in the worst case (their
    deltas at the cap, the honest ones at the median weight). A weighted median is moved
    arbitrarily only once the attackers hold half of the weight mass, so it tolerates f below
    about 1 / (c + 1) (a fifth at c = 4), against a half unweighted.

    Memory: the deltas are kept as float32 copies until :meth:`result`, so a round holds up to
    ``max_updates`` x model size x 4 bytes (plus a few count x largest tensor arrays while
    :meth:`result` runs). Beyond ``max_updates`` deltas :meth:`add` raises :class:`TooManyUpdates`.
    """

    name = "median"

    def __init__(self, shapes: Mapping[str, tuple[int, ...]], *, max_updates: int = DEFAULT_MAX_UPDATES,
                 weighted: bool = False) -> None:
        super().__init__(shapes, max_updates=max_updates, weighted=weighted)

    def _reduce(self, stack: np.ndarray, weights: np.ndarray) -> np.ndarray:
        if self.weighted:
            return weighted_median(stack, weights)
        return np.median(stack.astype(np.float64), axis=0)


class TrimmedMean(_BufferedUpdates):
    """Coordinate-wise trimmed mean, unweighted unless ``weighted=True``: per coordinate, drop the
    ``floor(trim_fraction * count)`` largest and as many smallest values and average the rest.

    ``trim_fraction`` is in [0, 0.5): 0 is the plain mean, and at least one value (some weight)
    per coordinate always remains. Unweighted, it tolerates up to ``trim_fraction`` of the deltas
    being arbitrary; it is unweighted by default for the same reason as :class:`CoordinateMedian`.

    With ``weighted=True`` (:func:`weighted_trimmed_mean`) it trims a weight mass of
    ``trim_fraction`` x total weight from each end, a value straddling a cut counting with the part
    of its weight that remains, and takes the weighted mean of the rest; with equal weights and
    ``trim_fraction * count`` an integer that is the unweighted trimmed mean. With weights capped
    at c times the median weight, attackers sending a fraction f of the deltas hold at most about
    f*c / (f*c + (1 - f)) of the weight mass in the worst case. They are trimmed away entirely
    while they hold at most ``trim_fraction`` of the mass at either end; beyond that, what remains
    of their mass moves the mean arbitrarily. So with t = ``trim_fraction`` it tolerates f below
    about t / (c * (1 - t) + t) (1 in 17 at t = 0.2, c = 4), against t unweighted.

    Memory as for :class:`CoordinateMedian`: up to ``max_updates`` x model size x 4 bytes,
    :class:`TooManyUpdates` beyond.
    """

    name = "trimmed_mean"

    def __init__(self, shapes: Mapping[str, tuple[int, ...]], *, trim_fraction: float = 0.2,
                 max_updates: int = DEFAULT_MAX_UPDATES, weighted: bool = False) -> None:
        if not (type(trim_fraction) in (int, float) and 0 <= trim_fraction < 0.5):
            raise ValueError(f"trim_fraction must be in [0, 0.5), got {trim_fraction!r}")
        super().__init__(shapes, max_updates=max_updates, weighted=weighted)
        self.trim_fraction = float(trim_fraction)

    def _reduce(self, stack: np.ndarray, weights: np.ndarray) -> np.ndarray:
        if self.weighted:
            return weighted_trimmed_mean(stack, weights, self.trim_fraction)
        n = stack.shape[0]
        k = math.floor(self.trim_fraction * n)
        ordered = np.sort(stack, axis=0)
        return ordered[k:n - k].mean(axis=0, dtype=np.float64)


ClipMode = Literal["clip", "reject"]


class NormClipping:
    """Bounds the global L2 norm (over all tensors) of every delta before the wrapped accumulator
    sees it; works around any accumulator (:class:`~.strategy.WeightedMean`,
    :class:`CoordinateMedian`, :class:`TrimmedMean`).

    ``mode="clip"`` scales a delta whose norm exceeds ``max_norm`` down to norm ``max_norm`` (to
    float32 precision; direction kept); ``mode="reject"`` refuses it with :class:`RejectedMessage`. A delta with a
    norm of at most ``max_norm`` is passed on untouched, and a non-finite one is always refused.

    Clipping bounds each delta, not the weight it carries: around a weighted mean a device can
    still gain influence by claiming many examples.
    """

    def __init__(self, inner: Accumulator, *, max_norm: float, mode: ClipMode = "clip") -> None:
        if not (type(max_norm) in (int, float) and math.isfinite(max_norm) and max_norm > 0):
            raise ValueError(f"max_norm must be a positive finite number, got {max_norm!r}")
        if mode not in ("clip", "reject"):
            raise ValueError(f"clipping mode must be 'clip' or 'reject', got {mode!r}")
        self.inner = inner
        self.max_norm = float(max_norm)
        self.mode = mode
        self.clipped = 0     # deltas scaled down (clip mode)
        self.last_norm = math.nan  # the norm the last added delta was passed on with
        self.last_raw_norm = math.nan  # ... and the one it came with
        self.rejected = 0    # deltas refused (reject mode, or non-finite)

    @property
    def count(self) -> int:
        return self.inner.count

    @property
    def total_weight(self) -> float:
        return self.inner.total_weight

    @staticmethod
    def norm(delta: Mapping[str, np.ndarray]) -> float:
        """The L2 norm of all of ``delta``'s tensors taken as one vector (float64 sums)."""
        total = 0.0
        for array in delta.values():
            flat = np.asarray(array, dtype=np.float64).reshape(-1)
            total += float(np.dot(flat, flat))
        return math.sqrt(total)

    def _refusal(self, norm: float) -> RejectedMessage | None:
        if not math.isfinite(norm):
            return RejectedMessage(Reason.NON_FINITE, f"update norm is {norm}")
        if self.mode == "reject" and norm > self.max_norm:
            return RejectedMessage(Reason.NORM, f"update norm {norm:.6g} exceeds max_norm {self.max_norm:.6g}")
        return None

    def check(self, delta: Mapping[str, np.ndarray], weight: float) -> None:
        """Raise what :meth:`add` would raise (as far as the wrapped accumulator can tell),
        without changing anything."""
        refusal = self._refusal(self.norm(delta))
        if refusal is not None:
            raise refusal
        inner_check = getattr(self.inner, "check", None)
        if inner_check is not None:
            inner_check(delta, weight)
        else:
            _check_weight(weight)

    def add(self, delta: Mapping[str, np.ndarray], weight: float) -> None:
        """Clip (or refuse) ``delta`` by its norm, then pass it to the wrapped accumulator."""
        norm = self.norm(delta)
        refusal = self._refusal(norm)
        if refusal is not None:
            self.rejected += 1
            raise refusal
        self.last_norm = min(norm, self.max_norm)
        self.last_raw_norm = norm
        if norm > self.max_norm:
            scale = self.max_norm / norm
            delta = {name: (np.asarray(array, dtype=np.float64) * scale).astype(np.float32)
                     for name, array in delta.items()}
            self.inner.add(delta, weight)
            self.clipped += 1
        else:
            self.inner.add(delta, weight)

    def result(self) -> dict[str, np.ndarray]:
        return self.inner.result()

    def release(self) -> None:
        release = getattr(self.inner, "release", None)
        if release is not None:
            release()


def make_accumulator(name: str, shapes: Mapping[str, tuple[int, ...]], **options: Any) -> Accumulator:
    """Build an accumulator from configuration.

    ``name`` is ``"fedavg"`` (:class:`~.strategy.WeightedMean`), ``"median"``
    (:class:`CoordinateMedian`, options ``max_updates``, ``weighted``) or ``"trimmed_mean"``
    (:class:`TrimmedMean`, options ``trim_fraction``, ``max_updates``, ``weighted``). With
    ``max_norm`` the accumulator is wrapped in :class:`NormClipping` (option ``norm_mode``:
    ``"clip"``, the default, or ``"reject"``).
    Unknown names and options raise ``ValueError``.
    """
    max_norm = options.pop("max_norm", None)
    if max_norm is None and "norm_mode" in options:
        raise ValueError("norm_mode needs max_norm")
    norm_mode = options.pop("norm_mode", "clip")
    allowed = {"fedavg": set(), "median": {"max_updates", "weighted"},
               "trimmed_mean": {"trim_fraction", "max_updates", "weighted"}}
    if name not in allowed:
        raise ValueError(f"unknown aggregation {name!r}; known: {list(ACCUMULATORS)}")
    unknown = set(options) - allowed[name]
    if unknown:
        raise ValueError(f"aggregation {name!r} takes no option(s) {sorted(unknown)}; "
                         f"it takes {sorted(allowed[name] | {'max_norm', 'norm_mode'})}")
    accumulator: Accumulator
    if name == "fedavg":
        accumulator = WeightedMean(shapes)
    elif name == "median":
        accumulator = CoordinateMedian(shapes, **options)
    else:
        accumulator = TrimmedMean(shapes, **options)
    if max_norm is not None:
        return NormClipping(accumulator, max_norm=max_norm, mode=norm_mode)
    return accumulator
