"""Prometheus metrics of the aggregator: what it accepted, rejected and published.

The daemon owns its counters on its event loop and hands a copy to :meth:`AggregatorMetrics.update`
whenever they change; a scrape (on the HTTP server's thread) reads the latest immutable snapshot,
so the two threads share nothing mutable. Each instance has its own registry, never the global one.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from prometheus_client import Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from fedmq.broker.errors import Reason
from fedmq.broker.metrics_http import MetricsEndpoint

#: Round durations range from seconds (a lab fleet) to hours (devices that train at night).
ROUND_BUCKETS = (1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0, 4 * 3600.0)

#: counter name -> (aggregator counter key, help)
COUNTERS = {
    "fedmq_updates_accepted": ("accepted", "Updates accepted into a round"),
    "fedmq_updates_duplicate": ("duplicates", "Updates received again after acceptance (answered, not counted twice)"),
    "fedmq_updates_late": ("late", "Updates that arrived for a round already closed"),
    "fedmq_bytes_in": ("bytes_in", "Bytes of accepted update payloads"),
    "fedmq_bytes_out": ("bytes_out", "Bytes of model payloads published"),
    "fedmq_rounds": ("rounds", "Rounds closed (model versions published)"),
}
REJECTED_PREFIX = "rejected_"


@dataclass(frozen=True, slots=True)
class AggregatorSnapshot:
    counters: Mapping[str, float] = field(default_factory=lambda: MappingProxyType({}))
    model_version: int = 0
    devices_online: int = 0
    buffered_updates: int = 0


class _SnapshotCollector(Collector):
    def __init__(self, owner: AggregatorMetrics) -> None:
        self._owner = owner

    def collect(self) -> Iterable[Metric]:
        snap = self._owner.snapshot  # one read: the scrape sees one consistent snapshot
        c = snap.counters
        for name, (key, text) in COUNTERS.items():
            yield CounterMetricFamily(name, text, value=c.get(key, 0.0))
        rejected = CounterMetricFamily("fedmq_updates_rejected", "Updates rejected, by reason code", labels=["reason"])
        # every protocol reason from the start, so rate() works on the first rejection of a kind
        reasons = {r.value: 0.0 for r in Reason}
        reasons.update({k[len(REJECTED_PREFIX):]: v for k, v in c.items() if k.startswith(REJECTED_PREFIX)})
        for reason, value in sorted(reasons.items()):
            rejected.add_metric([reason], value)
        yield rejected
        yield GaugeMetricFamily("fedmq_model_version", "Version of the current global model", value=snap.model_version)
        yield GaugeMetricFamily("fedmq_devices_online", "Devices whose retained status says online",
                                value=snap.devices_online)
        yield GaugeMetricFamily("fedmq_buffered_updates", "Accepted updates waiting in the open round",
                                value=snap.buffered_updates)


class AggregatorMetrics(MetricsEndpoint):
    """The aggregator's metrics on a private registry, optionally served over HTTP (``/metrics``)."""

    def __init__(self) -> None:
        super().__init__()
        self.snapshot = AggregatorSnapshot()
        self.registry.register(_SnapshotCollector(self))
        self.round_duration = Histogram("fedmq_round_duration_seconds", "Seconds from a round's opening to its close",
                                        buckets=ROUND_BUCKETS, registry=self.registry)

    def update(self, counters: Mapping[str, float], *, model_version: int, devices_online: int,
               buffered_updates: int) -> None:
        """Publish a new snapshot; cheap enough to call after every message."""
        self.snapshot = AggregatorSnapshot(MappingProxyType({k: float(v) for k, v in counters.items()}),
                                           int(model_version), int(devices_online), int(buffered_updates))

    def observe_round(self, seconds: float) -> None:
        """Record the duration of a closed round."""
        self.round_duration.observe(seconds)
