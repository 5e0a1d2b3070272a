"""How much one update may move the model: weight caps and norm bounds from the fleet's history.

A device states its own example count, and that count is its update's weight in a weighted mean;
its delta may be as long as it likes. Left alone, one stolen device claiming 2^31-1 examples
decides the next version by itself, and a sign-flipped delta 100 times an honest step drags the
model wherever it points. So every round gets two bounds, fixed when the round opens from the
updates the fleet had accepted before (pure logic, no I/O):

- **weight cap**: an update counts ``min(num_examples, weight_factor x median)`` where the median
  (the lower middle value) is that of the recent accepted updates' weights (and never more than ``max_examples`` when that
  is configured). Before the fleet has :data:`MIN_HISTORY` accepted updates there is no median to
  trust, and every update counts the same (weight 1), as in an unweighted mean.
- **norm bound** (``max_norm = "auto"``, the default): ``norm_factor x median`` of the recent
  accepted updates' L2 norms; before there is a history, :data:`BOOTSTRAP_NORM_RATIO` times the
  norm of the model itself. A configured number replaces it; ``"off"`` removes it.

The history keeps what the updates came with (the example count claimed, the norm before
clipping), and the bounds take its *lower* median: updates that are fewer than half of the recent
ones cannot move it at all, and exactly half can only lower it (which costs training while they
are there, not control of it). Recording what came, not what was applied, lets the bounds recover
as soon as such updates stop: a clipped norm recorded as the bound would keep a lowered bound
low for thousands of updates. What it still allows: a minority of devices that each stay within
the bounds moves the model by at most their share of the weight times ``norm_factor`` honest
steps per round (slow, coordinated drift is out of reach of any per-update bound: see SECURITY.md).
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

#: Accepted updates remembered (the window of both medians).
HISTORY_WINDOW = 200
#: Accepted updates needed before the medians are trusted.
MIN_HISTORY = 5
#: Without a history, a delta may be at most this many times as long as the model it improves.
BOOTSTRAP_NORM_RATIO = 1.0
#: The smallest norm bound a history gives (a history of zero updates must not mean "no bound").
MIN_NORM_BOUND = 1e-12


@dataclass(frozen=True, slots=True)
class InfluenceSettings:
    """The configured side of the bounds (``[rounds]`` in the aggregator's config)."""

    max_norm: float | None = None       # a fixed norm bound; None with auto_norm = no bound
    auto_norm: bool = True              # derive the norm bound from the history
    norm_factor: float = 2.0
    weight_factor: float = 2.0          # 0 = no cap relative to the history
    max_examples: int = 0               # 0 = no fixed cap

    def __post_init__(self) -> None:
        if self.max_norm is not None and not (math.isfinite(self.max_norm) and self.max_norm > 0):
            raise ValueError(f"max_norm must be a positive number, 'auto' or 'off', got {self.max_norm!r}")
        if not (math.isfinite(self.norm_factor) and self.norm_factor >= 1):
            raise ValueError(f"norm_factor must be a number >= 1, got {self.norm_factor!r}")
        if not (math.isfinite(self.weight_factor) and (self.weight_factor == 0 or self.weight_factor >= 1)):
            raise ValueError(f"weight_factor must be 0 (off) or a number >= 1, got {self.weight_factor!r}")
        if self.max_examples < 0:
            raise ValueError(f"max_examples must be 0 (off) or more, got {self.max_examples!r}")

    def describe(self) -> str:
        norm = ("auto" if self.auto_norm else "off") if self.max_norm is None else f"{self.max_norm:g}"
        return (f"norm bound {norm} (factor {self.norm_factor:g}), weight cap {self.weight_factor:g} x median"
                + (f", max_examples {self.max_examples}" if self.max_examples else ""))


@dataclass(frozen=True, slots=True)
class RoundBounds:
    """The bounds of one round: ``weight(num_examples)`` and ``max_norm`` (None: unbounded)."""

    weight_cap: float | None            # None: every update weighs 1 (no history yet)
    max_norm: float | None
    equal_weights: bool = False

    def weight(self, num_examples: int) -> float:
        if self.equal_weights:
            return 1.0
        if self.weight_cap is None:
            return float(num_examples)
        return float(min(num_examples, self.weight_cap))

    def to_info(self) -> dict[str, Any]:
        out: dict[str, Any] = {"weights": "equal" if self.equal_weights else "examples"}
        if self.weight_cap is not None and not self.equal_weights:
            out["weight_cap"] = round(self.weight_cap, 6)
        if self.max_norm is not None:
            out["norm_bound"] = round(self.max_norm, 6)
        return out


class InfluenceHistory:
    """The example counts and norms the fleet's recent accepted updates came with."""

    def __init__(self, window: int = HISTORY_WINDOW) -> None:
        self.weights: deque[float] = deque(maxlen=window)
        self.norms: deque[float] = deque(maxlen=window)

    def __len__(self) -> int:
        return len(self.weights)

    def record(self, applied: Iterable[tuple[float, float]]) -> None:
        """Add the (weight, norm) of a closed round's accepted updates, in arrival order."""
        for weight, norm in applied:
            if math.isfinite(weight) and math.isfinite(norm):
                self.weights.append(float(weight))
                self.norms.append(float(norm))

    def with_round(self, applied: Iterable[tuple[float, float]]) -> InfluenceHistory:
        """A copy with a closed round's updates added (the daemon keeps it once the version is stored)."""
        history = InfluenceHistory(self.weights.maxlen or HISTORY_WINDOW)
        history.record(zip(self.weights, self.norms, strict=True))
        history.record(applied)
        return history

    def bounds(self, settings: InfluenceSettings, model: Mapping[str, np.ndarray]) -> RoundBounds:
        """The bounds of the next round."""
        known = len(self) >= MIN_HISTORY
        caps = []
        if settings.max_examples:
            caps.append(float(settings.max_examples))
        # median_low: with an even history, the lower of the two middle values, so that a
        # device that holds exactly half of it cannot raise the median either
        if known and settings.weight_factor:
            caps.append(settings.weight_factor * statistics.median_low(self.weights))
        equal = not known and bool(settings.weight_factor)
        if settings.max_norm is not None:
            norm: float | None = settings.max_norm
        elif not settings.auto_norm:
            norm = None
        elif known:
            # at least half of the recent updates were zero: so is (nearly) what the bound lets through
            norm = max(settings.norm_factor * statistics.median_low(self.norms), MIN_NORM_BOUND)
        else:
            norm = BOOTSTRAP_NORM_RATIO * model_norm(model)
            if not norm > 0:
                norm = None  # an all-zero initial model: nothing to scale a first bound by
        return RoundBounds(min(caps) if caps else None, norm, equal_weights=equal)

    def to_json(self) -> dict[str, Any]:
        return {"weights": list(self.weights), "norms": list(self.norms)}

    @classmethod
    def from_json(cls, data: Mapping[str, Any], window: int = HISTORY_WINDOW) -> InfluenceHistory:
        history = cls(window)
        history.record(zip(data.get("weights", []), data.get("norms", []), strict=False))
        return history


def model_norm(params: Mapping[str, np.ndarray]) -> float:
    return math.sqrt(sum(float(np.dot(a.reshape(-1).astype(np.float64), a.reshape(-1).astype(np.float64)))
                         for a in params.values()))
