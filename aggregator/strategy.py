"""Aggregation maths as plain numpy over named arrays, separate from orchestration.

:class:`WeightedMean` folds one delta at a time into a running sum, so memory stays O(model size)
whatever the number of devices. Server optimizers (:mod:`.optimizers`) turn the averaged delta into
the next weights.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np


class WeightedMean:
    """Streaming weighted mean of deltas: ``sum(w_i * d_i) / sum(w_i)``.

    Holds one float64 accumulator per tensor plus one scratch buffer of the largest tensor, never
    the deltas themselves. Float64 sums make the result independent of arrival order to float32
    precision, so a run is reproducible although updates arrive in any order.
    """

    def __init__(self, shapes: Mapping[str, tuple[int, ...]]) -> None:
        self._sums = {name: np.zeros(shape, dtype=np.float64) for name, shape in shapes.items()}
        largest = max((int(np.prod(s)) for s in shapes.values()), default=0)
        self._scratch = np.empty(largest, dtype=np.float64)
        self.total_weight = 0.0
        self.count = 0

    def add(self, delta: Mapping[str, np.ndarray], weight: float) -> None:
        """Fold ``delta`` (names and shapes already checked) with ``weight`` > 0."""
        if not weight > 0:
            raise ValueError(f"weight must be positive, got {weight}")
        w = np.float64(weight)
        for name, acc in self._sums.items():
            scratch = self._scratch[: acc.size].reshape(acc.shape)
            np.multiply(delta[name], w, out=scratch)
            np.add(acc, scratch, out=acc)
        self.total_weight += float(weight)
        self.count += 1

    def result(self) -> dict[str, np.ndarray]:
        """The weighted mean; raises if nothing was added."""
        if self.count == 0:
            raise ValueError("no update was added")
        return {name: (acc / self.total_weight).astype(np.float32) for name, acc in self._sums.items()}
