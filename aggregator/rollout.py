"""Staged rollout: a new version goes to a cohort first and reaches the fleet only if the cohort's
own data says it is not worse than the version the fleet runs (pure logic, no I/O, no clock).

The aggregator publishes the candidate retained on the canary topic, naming its cohort. Each
cohort device evaluates the candidate *and* its installed model on its local data and reports both
in its retained status (``evaluation``). Once enough reports are in (``min_reports``, default the
whole cohort), the cohort devices' **accuracy drops** (baseline minus candidate, each device one
vote) decide:

- a strict majority of the whole cohort reported a drop of at most ``max_accuracy_drop``:
  **promote**. The candidate's weights become the next version on the model topic, for everyone.
- the reports already make that impossible, or they do not come within ``timeout_s``: **roll
  back**. The baseline's
  weights are re-published as the next version, so every device moves on to a higher version
  (rollback protection holds) and trains again from weights known to be good.

No device installs a candidate before the decision: the canary is an evaluation on real device
data, and a bad candidate never serves a prediction.

In between (the majority not yet reached, ``min_reports`` reached or not) the canary waits.
Reports are self-declared: promoting needs more than half of the cohort, so lying devices that
are fewer than half of it cannot promote a candidate, whatever they claim, nor report early to
decide before the others (``min_reports`` smaller than the cohort). An example-weighted mean
(what decided before) let one device that claimed 10^15 examples and a perfect candidate promote
anything. Accuracies outside [0, 1] are refused. The decision's
accuracies are still shown as example-weighted means, with each device's examples capped at
twice the median of the reports.
"""

from __future__ import annotations

import hashlib
import math
import statistics
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from fedmq.broker.messages import MAX_COHORT


@dataclass(frozen=True, slots=True)
class RolloutPolicy:
    cohort: tuple[str, ...] = ()         # these devices evaluate every candidate ...
    cohort_percent: float = 0.0          # ... or this share of the devices online (0 and no list: off)
    max_accuracy_drop: float = 0.02      # promote when the cohort's accuracy drops by at most this much
    min_reports: int = 0                 # evaluations needed; 0 = the whole cohort
    timeout_s: float = 300.0             # roll back when the reports do not come in time

    def __post_init__(self) -> None:
        if not 0 <= self.cohort_percent <= 100:
            raise ValueError(f"cohort_percent must be from 0 to 100, got {self.cohort_percent}")
        if not 0 <= self.max_accuracy_drop <= 1:
            raise ValueError(f"max_accuracy_drop is an accuracy difference from 0 to 1, got {self.max_accuracy_drop}")
        if self.min_reports < 0:
            raise ValueError(f"min_reports must be >= 0 (0 = the whole cohort), got {self.min_reports}")
        if not self.timeout_s > 0:
            raise ValueError(f"timeout_s must be positive, got {self.timeout_s}")
        if len(self.cohort) > MAX_COHORT:
            raise ValueError(f"a cohort lists at most {MAX_COHORT} devices, got {len(self.cohort)}")

    @property
    def enabled(self) -> bool:
        return bool(self.cohort) or self.cohort_percent > 0

    def choose_cohort(self, online: Iterable[str], version: int) -> tuple[str, ...]:
        """The configured device list, or ``cohort_percent`` of the devices online (at least one),
        picked by a hash of device and version: spread over the fleet, reproducible, and
        another subset for each candidate."""
        if self.cohort:
            return tuple(self.cohort)
        ranked = sorted(online, key=lambda d: hashlib.sha256(f"{version}/{d}".encode()).digest())
        if not ranked:
            return ()
        count = min(MAX_COHORT, max(1, math.ceil(self.cohort_percent / 100 * len(ranked))))
        return tuple(sorted(ranked[:count]))


@dataclass(frozen=True, slots=True)
class Decision:
    promote: bool
    reason: str
    candidate_accuracy: float = math.nan
    baseline_accuracy: float = math.nan
    reports: int = 0

    def info(self) -> dict[str, float | int | str]:
        out: dict[str, float | int | str] = {"reason": self.reason, "reports": self.reports}
        if self.reports:
            out.update(cohort_accuracy=round(self.candidate_accuracy, 6), baseline_accuracy=round(self.baseline_accuracy, 6))
        return out


@dataclass(slots=True)
class Canary:
    """One candidate under evaluation."""

    candidate: int                       # the candidate's version (stored, never on the model topic)
    baseline: int                        # the version the fleet runs
    cohort: tuple[str, ...]
    started: float
    reports: dict[str, dict[str, float]] = field(default_factory=dict)

    def add_report(self, device: str, evaluation: Mapping[str, float]) -> bool:
        """Keep ``device``'s evaluation if it is a cohort member's report on this candidate
        against this baseline; return whether it was kept."""
        if device not in self.cohort or evaluation.get("version") != self.candidate:
            return False
        if evaluation.get("baseline_version") != self.baseline:
            return False
        needed = ("accuracy", "baseline_accuracy", "examples")
        if not all(key in evaluation and math.isfinite(evaluation[key]) for key in needed) or evaluation["examples"] <= 0:
            return False
        if not (0.0 <= evaluation["accuracy"] <= 1.0 and 0.0 <= evaluation["baseline_accuracy"] <= 1.0):
            return False
        self.reports[device] = dict(evaluation)
        return True

    def needed(self, policy: RolloutPolicy) -> int:
        return len(self.cohort) if policy.min_reports == 0 else min(policy.min_reports, len(self.cohort))

    def decide(self, now: float, policy: RolloutPolicy) -> Decision | None:
        """Promote or roll back once the reports are in or the time is up; None while waiting."""
        needed = self.needed(policy)
        if needed and len(self.reports) >= needed:
            reports = list(self.reports.values())
            drops = [r["baseline_accuracy"] - r["accuracy"] for r in reports]
            missing = len(self.cohort) - len(reports)
            # the strict-majority drop of the whole cohort, the missing reports counted as the worst
            # and as the best they could be: decide only once both agree
            drop = statistics.median_high(drops + [math.inf] * missing)
            best_case = statistics.median_high(drops + [-math.inf] * missing)
            if drop > policy.max_accuracy_drop + 1e-12 and best_case <= policy.max_accuracy_drop + 1e-12:
                return self._timeout(now, policy, needed)
            cap = 2.0 * statistics.median_low(r["examples"] for r in reports)
            weights = [min(r["examples"], cap) for r in reports]
            total = sum(weights)
            candidate = sum(r["accuracy"] * w for r, w in zip(reports, weights, strict=True)) / total
            baseline = sum(r["baseline_accuracy"] * w for r, w in zip(reports, weights, strict=True)) / total
            counted = f"majority of {len(self.cohort)} cohort device(s), {len(reports)} reported"
            if drop <= policy.max_accuracy_drop + 1e-12:
                reason = (f"accuracy drop {drop:.4f} ({counted}); cohort accuracy {candidate:.4f} vs {baseline:.4f} "
                          f"on v{self.baseline}")
                return Decision(True, reason, candidate, baseline, len(self.reports))
            # a rollback is certain: shown is the drop even if every missing device reported the best
            reason = (f"accuracy drop {best_case:.4f} ({counted}) is over max_accuracy_drop {policy.max_accuracy_drop}; "
                      f"cohort accuracy {candidate:.4f} vs v{self.baseline}'s {baseline:.4f}")
            return Decision(False, reason, candidate, baseline, len(self.reports))
        return self._timeout(now, policy, needed)

    def _timeout(self, now: float, policy: RolloutPolicy, needed: int) -> Decision | None:
        if now - self.started >= policy.timeout_s:
            return Decision(False, f"only {len(self.reports)} of {len(self.cohort)} cohort evaluations (at least "
                            f"{needed} and a majority needed) within {policy.timeout_s:g}s", reports=len(self.reports))
        return None
