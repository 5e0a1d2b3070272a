"""Aggregation maths as plain numpy over named arrays, separate from orchestration.

:class:`WeightedMean` folds one delta at a time into a running sum, so memory stays O(model size)
whatever the number of devices. Server optimizers (:mod:`.optimizers`) turn the averaged delta into
the next weights.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Mapping

import numpy as np

from fedmq.broker.errors import Reason, RejectedMessage

from . import fold

#: Hard sanity bound on an update's L2 norm, whatever the strategy: far above any real delta,
#: low enough that summing many such updates can never overflow float32 parameters.
MAX_DELTA_NORM = 1e6


def value_refusal(delta: Mapping[str, np.ndarray]) -> RejectedMessage:
    """Why ``delta``'s values are refused, once a fast check found them bad: a non-finite value,
    else an L2 norm (computed exactly, in float64) over :data:`MAX_DELTA_NORM`."""
    for name, array in delta.items():
        if not np.isfinite(array).all():
            return RejectedMessage(Reason.NON_FINITE, f"tensor {name!r} contains NaN or infinity")
    exact = sum(float(np.dot(a.reshape(-1).astype(np.float64), a.reshape(-1).astype(np.float64))) for a in delta.values())
    # finite but absurd: a few of these would overflow the float32 model itself
    return RejectedMessage(Reason.NORM, f"update L2 norm {exact ** 0.5:.3g} is over the hard limit {MAX_DELTA_NORM:g}")


Buffers = dict[str, np.ndarray]

#: The sums and snapshot buffers of the last released :class:`WeightedMean`, by its shapes: the
#: next round's mean takes them instead of fresh memory. One set is kept, never more.
_spare: tuple[tuple[tuple[str, tuple[int, ...]], ...], Buffers, Buffers] | None = None
_spare_lock = threading.Lock()


def _shapes_key(shapes: Mapping[str, tuple[int, ...]]) -> tuple[tuple[str, tuple[int, ...]], ...]:
    return tuple((name, tuple(int(d) for d in shape)) for name, shape in shapes.items())


def _take_spare(key: tuple[tuple[str, tuple[int, ...]], ...]) -> tuple[Buffers, Buffers] | None:
    global _spare
    with _spare_lock:
        if _spare is None or _spare[0] != key:
            return None
        _, sums, snapshot = _spare
        _spare = None
        return sums, snapshot


def _give_spare(key: tuple[tuple[str, tuple[int, ...]], ...], sums: Buffers, snapshot: Buffers) -> None:
    global _spare
    with _spare_lock:
        _spare = (key, sums, snapshot)


def _written_zeros(shape: tuple[int, ...]) -> np.ndarray:
    """float32 zeros whose memory is written now.

    ``np.zeros`` of a large array maps pages that are first read (the kernel maps the shared zero
    page) and then written (a second fault to get a page of its own): two faults per page where
    one write does. Fresh memory is what a new round's sums get, and a fault costs microseconds on
    a virtual machine (bench/PERFORMANCE.md).
    """
    array = np.empty(shape, dtype=np.float32)
    array.fill(0.0)
    return array


class WeightedMean:
    """Streaming weighted mean of deltas: ``sum(w_i * d_i) / sum(w_i)``.

    Holds float32 sums, never all the deltas. :meth:`check` folds a delta into the sums in the
    same pass that checks its values (finite, L2 norm at most :data:`MAX_DELTA_NORM`), so an
    update is read from memory once. A refused delta must leave no trace, and neither may a
    checked one that is never added (the daemon checks, makes the update durable, then adds it,
    and the journal may fail in between). So the sums can be rewound: a snapshot of them, taken
    every :attr:`SNAPSHOT_EVERY` added deltas (or :attr:`SNAPSHOT_BYTES` of them), and the deltas
    added since, which are folded again in the same order, bit for bit. Memory is two copies of
    the model plus at most ``SNAPSHOT_BYTES`` of recent deltas, whatever the number of updates.
    A refusal costs at most ``SNAPSHOT_EVERY`` folds.

    When its round is over, :meth:`release` hands the two buffers to the next mean of the same
    shapes (the daemon's next round): fresh memory costs a page fault per page, which on a virtual
    machine is more than folding a few updates (bench/PERFORMANCE.md). A released mean refuses
    any further use.

    The sums are float32: the arrival order changes the last bits of the result (a restart replays
    the journal in arrival order, so it reproduces them exactly). Deltas must not change after
    they are added.

    With ``max_norm``, a delta whose L2 norm is over it is scaled down to that norm
    (``norm_mode="clip"``: a second fold with ``weight * (max_norm / norm - 1)`` takes the excess
    back, one more pass for such a delta only) or refused with reason ``norm`` (``"reject"``); its
    weight still counts in full in the total, so a clipped update moves the mean by at most its
    share of the weight times ``max_norm``. :attr:`last_norm` is the norm the last added delta was
    folded with, :attr:`last_raw_norm` the one it came with.
    """

    #: The delta's values are checked here; the intake can skip its own pass over them.
    checks_values = True
    SNAPSHOT_EVERY = 16
    SNAPSHOT_BYTES = 64 * 1024 * 1024

    def __init__(self, shapes: Mapping[str, tuple[int, ...]], *, max_norm: float | None = None,
                 norm_mode: str = "clip") -> None:
        if max_norm is not None and not (math.isfinite(max_norm) and max_norm > 0):
            raise ValueError(f"max_norm must be a positive finite number, got {max_norm!r}")
        if norm_mode not in ("clip", "reject"):
            raise ValueError(f"norm mode must be 'clip' or 'reject', got {norm_mode!r}")
        self.max_norm = max_norm
        self.norm_mode = norm_mode
        self.clipped = 0
        self.clipped_now = False  # whether the pending (checked, not added) delta was clipped
        self.last_norm = math.nan
        self.last_raw_norm = math.nan  # ... and the norm it was sent with
        self._key = _shapes_key(shapes)
        spare = _take_spare(self._key)
        if spare is None:
            self._sums = {name: _written_zeros(shape) for name, shape in shapes.items()}
            # not read before the first snapshot is taken (until then a rewind starts from zeros)
            self._snapshot = {name: np.empty(shape, dtype=np.float32) for name, shape in shapes.items()}
        else:
            self._sums, self._snapshot = spare
            for acc in self._sums.values():
                acc.fill(0.0)
        self._snapshot_taken = False
        self._released = False
        self._since: list[tuple[Mapping[str, np.ndarray], float]] = []  # added after the snapshot, in order
        self._since_bytes = 0
        # in the sums, not added: (delta, weight, the weights it was folded with, its norm as folded,
        # its norm as sent)
        self._pending: tuple[Mapping[str, np.ndarray], float, tuple[float, ...], float, float] | None = None
        self.total_weight = 0.0
        self.count = 0

    def _fold(self, delta: Mapping[str, np.ndarray], weight: float) -> float:
        return sum(fold.fold(acc, delta[name], weight) for name, acc in self._sums.items())

    def _rewind(self) -> None:
        """Make the sums those of the added deltas again, bit for bit."""
        for name, acc in self._sums.items():
            if self._snapshot_taken:
                np.copyto(acc, self._snapshot[name])
            else:  # every delta added so far is in _since
                acc.fill(0.0)
        for delta, weight in self._since:
            self._fold(delta, weight)
        self._pending = None

    def check(self, delta: Mapping[str, np.ndarray], weight: float) -> None:
        """Raise :class:`RejectedMessage` if ``delta`` has non-finite values or an absurd norm.

        Changes nothing visible. A following :meth:`add` of the same ``delta`` and ``weight``
        reuses the work.
        """
        if not weight > 0:
            raise ValueError(f"weight must be positive, got {weight}")
        if self._released:
            raise RuntimeError("this mean was released when its round ended; its buffers belong to another round")
        if self._pending is not None:
            self._rewind()
        self.clipped_now = False
        squared = self._fold(delta, weight)
        if not squared <= MAX_DELTA_NORM ** 2:
            self._rewind()
            raise value_refusal(delta)
        folds, norm = (float(weight),), math.sqrt(squared)
        raw_norm = norm
        if self.max_norm is not None and norm > self.max_norm:
            if self.norm_mode == "reject":
                self._rewind()
                raise RejectedMessage(Reason.NORM, f"update norm {norm:.6g} exceeds the round's bound {self.max_norm:.6g}")
            scale = self.max_norm / norm
            if scale >= self.CORRECTION_MIN_SCALE:
                # clip: take back the part of the delta beyond the bound with a second, negative
                # fold (a pass only for a clipped delta; a rewind would refold up to SNAPSHOT_EVERY)
                correction = float(weight) * (scale - 1.0)
                self._fold(delta, correction)
                folds = (float(weight), correction)
            else:
                # far over the bound, w*x and its correction would cancel in float32 and take the
                # bits of the updates folded before with them: fold it again, scaled, from the
                # snapshot (a rewind, at most SNAPSHOT_EVERY folds, only for such a delta)
                self._rewind()
                self._fold(delta, float(weight) * scale)
                folds = (float(weight) * scale,)
            norm = self.max_norm
            self.clipped_now = True
        self._pending = (delta, float(weight), folds, norm, raw_norm)

    #: A clip whose scale is below this refolds the delta scaled instead of correcting the fold:
    #: ``w*x - w*(1-s)*x`` loses about ``eps32 / s`` of the sums' bits to cancellation.
    CORRECTION_MIN_SCALE = 1.0 / 64

    def add(self, delta: Mapping[str, np.ndarray], weight: float) -> None:
        """Fold ``delta`` (names and shapes already checked) with ``weight`` > 0.

        Raises :class:`RejectedMessage`, changing nothing, if its values fail :meth:`check`.
        """
        if self._pending is None or self._pending[0] is not delta or self._pending[1] != float(weight):
            self.check(delta, weight)
        assert self._pending is not None
        _, _, folds, self.last_norm, self.last_raw_norm = self._pending
        if self.clipped_now:
            self.clipped += 1
        self._pending = None
        self._since.extend((delta, folded_with) for folded_with in folds)  # a rewind repeats each fold
        self._since_bytes += sum(array.nbytes for array in delta.values())
        self.total_weight += float(weight)
        self.count += 1
        if len(self._since) >= self.SNAPSHOT_EVERY or self._since_bytes >= self.SNAPSHOT_BYTES:
            for name, acc in self._sums.items():
                np.copyto(self._snapshot[name], acc)
            self._snapshot_taken = True
            self._since.clear()
            self._since_bytes = 0

    def result(self) -> dict[str, np.ndarray]:
        """The weighted mean; raises if nothing was added."""
        if self._released:
            raise RuntimeError("this mean was released when its round ended; take its result before release()")
        if self.count == 0:
            raise ValueError("no update was added")
        if self._pending is not None:
            self._rewind()
        return {name: np.divide(acc, np.float32(self.total_weight), dtype=np.float32) for name, acc in self._sums.items()}

    def release(self) -> None:
        """End of the round: give the buffers to the next mean of the same shapes.

        Nothing may use this mean afterwards (it raises ``RuntimeError``); arrays returned by
        :meth:`result` are the caller's own and stay valid.
        """
        if self._released:
            return
        self._released = True
        self._since.clear()
        self._pending = None
        _give_spare(self._key, self._sums, self._snapshot)
        self._sums, self._snapshot = {}, {}
