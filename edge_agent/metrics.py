"""Prometheus metrics of an edge agent (optional: off unless a metrics port is configured).

Same design as the aggregator's: the agent hands a copy of its counters to :meth:`AgentMetrics.update`
on its event loop, a scrape reads the latest immutable snapshot, and each instance has its own registry.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

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


class AgentMetrics:
    """The agent's metrics on a private registry, optionally served over HTTP (``/metrics``)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.snapshot = AgentSnapshot()
        self.registry.register(_SnapshotCollector(self))
        self._server: Any = None
        self._thread: threading.Thread | None = None

    def update(self, counters: Mapping[str, float], *, model_version: int, paused: bool) -> None:
        """Publish a new snapshot of the agent's counters and state."""
        self.snapshot = AgentSnapshot(MappingProxyType({k: float(v) for k, v in counters.items()}),
                                      int(model_version), bool(paused))

    def serve(self, host: str, port: int) -> int:
        """Serve ``/metrics`` on ``host:port`` from a daemon thread (port 0 picks one); returns the port."""
        if self._server is not None:
            raise RuntimeError("metrics are already served")
        self._server, self._thread = start_http_server(port, addr=host, registry=self.registry)
        return int(self._server.server_port)

    def close(self) -> None:
        """Stop the HTTP server, if any, and release its port."""
        if self._server is None:
            return
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._server = self._thread = None
