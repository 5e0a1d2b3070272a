"""Synchronous FedAvg rounds as a plain state machine (no I/O, no clock of its own).

A round collects updates computed from its model version. It may close once ``min_updates``
arrived and either ``target_updates`` arrived or its deadline passed.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fedmq.broker.errors import Reason, RejectedMessage
from fedmq.broker.messages import UpdateMessage

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


class SyncRound:
    """The open round for model ``version``."""

    def __init__(self, version: int, shapes: Mapping[str, tuple[int, ...]], policy: RoundPolicy,
                 opened_at: float, accumulator: Any = None) -> None:
        self.version = version
        self.policy = policy
        self.opened_at = opened_at
        self.deadline = opened_at + policy.deadline_s
        # any strategy with add/result/count (aggregator/robust.py); FedAvg's streaming mean by default
        self._mean = accumulator if accumulator is not None else WeightedMean(shapes)
        self._devices: set[str] = set()
        self._examples = 0
        self._bytes = 0
        self._metric_sums: dict[str, float] = {}

    @property
    def count(self) -> int:
        return self._mean.count

    def check(self, update: UpdateMessage) -> None:
        """Raise :class:`RejectedMessage` if ``update`` cannot join this round."""
        if update.base_version < self.version:
            raise RejectedMessage(Reason.STALE, f"computed from version {update.base_version}; the round is for version {self.version}")
        if update.base_version > self.version:
            raise RejectedMessage(Reason.FUTURE, f"computed from version {update.base_version}, which was never published (current {self.version})")
        if update.device in self._devices:
            raise RejectedMessage(Reason.REPEAT, f"device {update.device} already contributed to the round for version {self.version}")

    def check_delta(self, delta: Mapping[str, np.ndarray], weight: float) -> None:
        """Raise what the strategy would refuse (e.g. a norm bound in reject mode), changing nothing."""
        check = getattr(self._mean, "check", None)
        if check is not None:
            check(delta, weight)

    def add(self, update: UpdateMessage, delta: Mapping[str, np.ndarray], payload_bytes: int) -> None:
        """Fold a checked update (call :meth:`check` first)."""
        self.check(update)
        self._mean.add(delta, update.num_examples)
        self._devices.add(update.device)
        self._examples += update.num_examples
        self._bytes += payload_bytes
        for name, value in update.metrics.items():
            self._metric_sums[name] = self._metric_sums.get(name, 0.0) + value * update.num_examples

    def ready(self, now: float) -> bool:
        count = self.count
        if count < self.policy.min_updates:
            return False
        return count >= self.policy.target_updates or now >= self.deadline

    def result(self) -> RoundResult:
        metrics = {f"train_{k}": v / self._examples for k, v in self._metric_sums.items()}
        return RoundResult(self.version, self._mean.result(), self.count, self._examples, self._bytes, metrics)
