"""Rounds and buffers as plain state machines (no I/O, no clock of their own).

:class:`SyncRound`: a round collects updates computed from its model version, one per device. It
may close once ``min_updates`` arrived and either ``target_updates`` arrived or its deadline passed.

:class:`AsyncBuffer` (FedBuff, Nguyen et al. 2022): takes an update whose base version is at most
``max_staleness`` versions behind, scales its delta by a :class:`StalenessWeight` of that
staleness, and is ready after ``buffer_size`` updates (or ``min_updates`` at the deadline). Both
aggregate streaming; the daemon treats them alike.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fedmq.broker.errors import Reason, RejectedMessage
from fedmq.broker.messages import UpdateMessage

from .influence import RoundBounds
from .strategy import WeightedMean


@dataclass(frozen=True, slots=True)
class RoundPolicy:
    min_updates: int = 1
    target_updates: int = 10
    deadline_s: float = 60.0

    def __post_init__(self) -> None:
        if not 1 <= self.min_updates <= self.target_updates:
            raise ValueError(
                f"need 1 <= min_updates <= target_updates, got {self.min_updates} and {self.target_updates}"
            )
        if not self.deadline_s > 0:
            raise ValueError(f"deadline_s must be positive, got {self.deadline_s}")


@dataclass(frozen=True, slots=True)
class RoundResult:
    version: int                        # the model version the updates were computed from
    mean_delta: dict[str, np.ndarray]
    num_updates: int
    num_examples: int
    bytes_in: int
    metrics: dict[str, float] = field(default_factory=dict)   # example-weighted means of device metrics
    #: (example count, norm) of each accepted update as it came, in arrival order (the fleet's history)
    applied: list[tuple[float, float]] = field(default_factory=list)


class _Collector:
    """What a round and a buffer share: the strategy that folds deltas, the totals, the device
    metrics, the closing rule (``min_updates``, then ``target_updates`` or the deadline), and
    the devices that contributed (one accepted update per device and version, in both modes).

    ``bounds`` (:mod:`.influence`) gives each update's weight: its example count capped relative
    to the fleet's history, not the count it claims."""

    def __init__(self, version: int, shapes: Mapping[str, tuple[int, ...]], policy: RoundPolicy,
                 opened_at: float, accumulator: Any = None, bounds: RoundBounds | None = None) -> None:
        self.version = version
        self.bounds = bounds if bounds is not None else RoundBounds(weight_cap=None, max_norm=None)
        self._devices: set[str] = set()
        self._applied: list[tuple[float, float]] = []
        self.policy = policy
        self.opened_at = opened_at
        self.deadline = opened_at + policy.deadline_s
        # any strategy with add/result/count (aggregator/robust.py); FedAvg's streaming mean by default
        self._mean = accumulator if accumulator is not None else WeightedMean(shapes)
        self._examples = 0
        self._weight = 0.0
        self._bytes = 0
        self._metric_sums: dict[str, float] = {}

    @property
    def count(self) -> int:
        return self._mean.count

    @property
    def accumulator(self) -> Any:
        """The strategy that folds this round's deltas."""
        return self._mean

    @property
    def checks_values(self) -> bool:
        """True when the strategy checks each delta's values itself (see ``check_update``)."""
        return bool(getattr(self._mean, "checks_values", False))

    def contribution(self, update: UpdateMessage, delta: Mapping[str, np.ndarray]) -> Mapping[str, np.ndarray]:
        """The delta the strategy folds for ``update`` (the buffer scales it by staleness)."""
        return delta

    def check_delta(self, update: UpdateMessage, delta: Mapping[str, np.ndarray]) -> None:
        """Raise what the strategy would refuse (e.g. a norm bound in reject mode), changing nothing.

        It checks the same delta object that :meth:`add` will fold, so a strategy that folds as
        it checks (:class:`WeightedMean`) does the work once."""
        check = getattr(self._mean, "check", None)
        if check is not None:
            check(self.contribution(update, delta), self.weight_of(update))

    def weight_of(self, update: UpdateMessage) -> float:
        """What ``update`` weighs in this round's mean (its example count, capped)."""
        return self.bounds.weight(update.num_examples)

    def _check_repeat(self, update: UpdateMessage) -> None:
        if update.device in self._devices:
            raise RejectedMessage(Reason.REPEAT, f"device {update.device} already contributed to the round for version "
                                  f"{self.version}; one update per device and version counts")

    def release(self) -> None:
        """The round is over (closed, or replaced): its strategy may hand its buffers to the next
        round's. Nothing may be added to it afterwards."""
        release = getattr(self._mean, "release", None)
        if release is not None:
            release()

    def _fold(self, update: UpdateMessage, delta: Mapping[str, np.ndarray], payload_bytes: int) -> None:
        weight = self.weight_of(update)
        self._mean.add(self.contribution(update, delta), weight)
        self._devices.add(update.device)
        norm = getattr(self._mean, "last_raw_norm", None)
        if norm is None:  # a strategy that does not measure norms: one more pass, for the history
            norm = math.sqrt(sum(float(np.dot(a.reshape(-1), a.reshape(-1))) for a in self.contribution(update, delta).values()))
        self._applied.append((float(update.num_examples), float(norm)))
        self._examples += update.num_examples
        self._weight += weight
        self._bytes += payload_bytes
        for name, value in update.metrics.items():
            self._metric_sums[name] = self._metric_sums.get(name, 0.0) + value * weight

    def ready(self, now: float) -> bool:
        count = self.count
        if count < self.policy.min_updates:
            return False
        return count >= self.policy.target_updates or now >= self.deadline

    def result(self) -> RoundResult:
        # device metrics, example-weighted: train_* describe the local training, eval_* the devices'
        # evaluation of the model they started from (this round's version) before training on it
        metrics = {k if k.startswith("eval_") else f"train_{k}": v / self._weight for k, v in self._metric_sums.items()}
        return RoundResult(self.version, self._mean.result(), self.count, self._examples, self._bytes, metrics,
                           list(self._applied))


class SyncRound(_Collector):
    """The open round for model ``version``."""

    def check(self, update: UpdateMessage) -> None:
        """Raise :class:`RejectedMessage` if ``update`` cannot join this round."""
        if update.base_version < self.version:
            raise RejectedMessage(Reason.STALE, f"computed from version {update.base_version}; the round is for version {self.version}")
        if update.base_version > self.version:
            raise RejectedMessage(Reason.FUTURE, f"computed from version {update.base_version}, which was never published (current {self.version})")
        self._check_repeat(update)

    def add(self, update: UpdateMessage, delta: Mapping[str, np.ndarray], payload_bytes: int) -> None:
        """Fold a checked update (call :meth:`check` first)."""
        self.check(update)
        self._fold(update, delta, payload_bytes)


STALENESS_KINDS = ("polynomial", "hinge", "constant")


@dataclass(frozen=True, slots=True)
class StalenessWeight:
    """How much an update that is ``s`` versions stale counts, relative to a fresh one.

    - ``polynomial`` (the default): ``(1 + s) ** -exponent``; exponent 0.5 gives ``1/sqrt(1+s)``.
    - ``hinge`` (Xie et al. 2019, FedAsync): 1 up to ``hinge_b`` versions, then ``1 / (hinge_a * (s - hinge_b) + 1)``.
    - ``constant``: 1 whatever the staleness (plain FedBuff averaging).
    """

    kind: str = "polynomial"
    exponent: float = 0.5
    hinge_a: float = 10.0
    hinge_b: float = 4.0

    def __post_init__(self) -> None:
        if self.kind not in STALENESS_KINDS:
            raise ValueError(f"unknown staleness function {self.kind!r}; use one of {', '.join(STALENESS_KINDS)}")
        for name in ("exponent", "hinge_a", "hinge_b"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"staleness {name} must be a finite number >= 0, got {value}")

    def __call__(self, staleness: int) -> float:
        if staleness < 0:
            raise ValueError(f"staleness cannot be negative, got {staleness}")
        if self.kind == "constant":
            return 1.0
        if self.kind == "hinge":
            return 1.0 if staleness <= self.hinge_b else 1.0 / (self.hinge_a * (staleness - self.hinge_b) + 1.0)
        return float((1.0 + staleness) ** -self.exponent)

    def describe(self) -> str:
        if self.kind == "constant":
            return "1"
        if self.kind == "hinge":
            return f"1 if s <= {self.hinge_b:g} else 1/({self.hinge_a:g}*(s-{self.hinge_b:g})+1)"
        return "1/sqrt(1+s)" if self.exponent == 0.5 else f"(1+s)^-{self.exponent:g}"


class AsyncBuffer(_Collector):
    """The update buffer for model ``version`` in async mode.

    An update from base version ``b`` has staleness ``s = version - b``; it is refused as ``stale``
    when ``s > max_staleness`` and as ``future`` when ``b > version``. Its delta is scaled by
    ``weight(s)`` before the strategy folds it with its example count, so the averaged delta is
    ``sum(n_i * w(s_i) * d_i) / sum(n_i)``: stale work moves the model less (FedBuff's rule, with
    the example weighting of FedAvg). A device contributes at most one update to a buffer, as
    to a sync round: one device cannot fill a buffer and decide a version alone.
    """

    def __init__(self, version: int, shapes: Mapping[str, tuple[int, ...]], policy: RoundPolicy,
                 opened_at: float, *, max_staleness: int, weight: StalenessWeight | None = None,
                 accumulator: Any = None, bounds: RoundBounds | None = None) -> None:
        if max_staleness < 0:
            raise ValueError(f"max_staleness must be >= 0, got {max_staleness}")
        super().__init__(version, shapes, policy, opened_at, accumulator, bounds)
        self.max_staleness = max_staleness
        self.weight = weight or StalenessWeight()
        self.staleness_counts: Counter[int] = Counter()
        self._scaled: tuple[UpdateMessage, Mapping[str, np.ndarray], Mapping[str, np.ndarray]] | None = None

    def staleness(self, update: UpdateMessage) -> int:
        return self.version - update.base_version

    def check(self, update: UpdateMessage) -> None:
        """Raise :class:`RejectedMessage` if ``update`` cannot join this buffer."""
        staleness = self.staleness(update)
        if staleness < 0:
            raise RejectedMessage(Reason.FUTURE, f"computed from version {update.base_version}, which was never published (current {self.version})")
        if staleness > self.max_staleness:
            raise RejectedMessage(Reason.STALE, f"computed from version {update.base_version}, {staleness} versions behind "
                                  f"{self.version}; max_staleness is {self.max_staleness}")
        self._check_repeat(update)

    def contribution(self, update: UpdateMessage, delta: Mapping[str, np.ndarray]) -> Mapping[str, np.ndarray]:
        """``delta`` scaled by the staleness weight; the same object for the same update and delta,
        so that checking and folding it see one delta."""
        staleness = self.staleness(update)
        if not 0 <= staleness <= self.max_staleness:
            return delta  # refused by check() anyway; its values may still be checked first
        factor = self.weight(staleness)
        if factor == 1.0:
            return delta
        cached = self._scaled
        if cached is not None and cached[0] is update and cached[1] is delta:
            return cached[2]
        scaled = {name: np.multiply(value, np.float32(factor)) for name, value in delta.items()}
        self._scaled = (update, delta, scaled)
        return scaled

    def add(self, update: UpdateMessage, delta: Mapping[str, np.ndarray], payload_bytes: int) -> None:
        """Fold a checked update, scaled by its staleness weight (call :meth:`check` first)."""
        self.check(update)
        self._fold(update, delta, payload_bytes)
        self._scaled = None
        self.staleness_counts[self.staleness(update)] += 1

    def result(self) -> RoundResult:
        result = super().result()
        total = sum(self.staleness_counts.values())
        result.metrics["mean_staleness"] = sum(s * n for s, n in self.staleness_counts.items()) / total
        result.metrics["max_staleness"] = float(max(self.staleness_counts))
        return result
