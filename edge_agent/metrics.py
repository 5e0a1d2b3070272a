"""Prometheus metrics of an edge agent (optional: off unless a metrics port is configured).

Same design as the aggregator's: the agent hands a copy of its counters to :meth:`AgentMetrics.update`
on its event loop, a scrape reads the latest immutable snapshot, and each instance has its own registry.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from fedmq.broker.metrics_http import MetricsEndpoint

#: counter name -> (agent counter key, help)
COUNTERS = {
    "fedmq_agent_updates_trained": ("updates_trained", "Local training runs that produced an update"),
    "fedmq_agent_updates_sent": ("updates_sent", "Update publications (first sends and resends)"),
    "fedmq_agent_updates_accepted": ("accepted", "Updates the aggregator accepted (receipts)"),
    "fedmq_agent_bytes_sent": ("bytes_sent", "Bytes of update payloads published"),
    "fedmq_agent_training_errors": ("training_errors", "Local training runs that failed"),
    "fedmq_agent_models_installed": ("models_installed", "Model versions installed"),
}
REJECTED_PREFIX = "rejected_"


@dataclass(frozen=True, slots=True)
class AgentSnapshot:
    counters: Mapping[str, float] = field(default_factory=lambda: MappingProxyType({}))
    model_version: int = 0
    paused: bool = False


class _SnapshotCollector(Collector):
    def __init__(self, owner: AgentMetrics) -> None:
        self._owner = owner

    def collect(self) -> Iterable[Metric]:
        snap = self._owner.snapshot
        c = snap.counters
        for name, (key, text) in COUNTERS.items():
            yield CounterMetricFamily(name, text, value=c.get(key, 0.0))
        rejected = CounterMetricFamily("fedmq_agent_updates_rejected", "Updates the aggregator rejected, by reason code",
                                       labels=["reason"])
        for key, value in sorted(c.items()):
            if key.startswith(REJECTED_PREFIX):
                rejected.add_metric([key[len(REJECTED_PREFIX):]], value)
        yield rejected
        yield GaugeMetricFamily("fedmq_agent_model_version", "Version of the installed model", value=snap.model_version)
        yield GaugeMetricFamily("fedmq_agent_paused", "1 while an operator has paused training", value=int(snap.paused))


class AgentMetrics(MetricsEndpoint):
    """The agent's metrics on a private registry, optionally served over HTTP (``/metrics``)."""

    def __init__(self) -> None:
        super().__init__()
        self.snapshot = AgentSnapshot()
        self.registry.register(_SnapshotCollector(self))

    def update(self, counters: Mapping[str, float], *, model_version: int, paused: bool) -> None:
        """Publish a new snapshot of the agent's counters and state."""
        self.snapshot = AgentSnapshot(MappingProxyType({k: float(v) for k, v in counters.items()}),
                                      int(model_version), bool(paused))
