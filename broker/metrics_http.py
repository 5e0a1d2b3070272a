"""The ``/metrics`` HTTP endpoint shared by the aggregator's and the agent's Prometheus metrics."""

from __future__ import annotations

import logging
import threading
from typing import Any

from prometheus_client import CollectorRegistry, start_http_server

log = logging.getLogger(__name__)


class MetricsEndpoint:
    """A private registry (never the global one, so several instances can live in one process)
    and, on request, the HTTP server that exposes it from a daemon thread."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self._server: Any = None
        self._thread: threading.Thread | None = None

    def serve(self, host: str, port: int) -> int:
        """Serve ``/metrics`` on ``host:port`` from a daemon thread (port 0 picks one); returns the port."""
        if self._server is not None:
            raise RuntimeError("metrics are already served")
        self._server, self._thread = start_http_server(port, addr=host, registry=self.registry)
        return int(self._server.server_port)

    def serve_or_log(self, host: str, port: int, who: str) -> int | None:
        """:meth:`serve` unless ``port`` is 0; a port that is taken is logged, not fatal: the
        daemon's job is the fleet, but the operator must see why there are no metrics."""
        if not port:
            return None
        try:
            bound = self.serve(host, port)
        except OSError as exc:
            log.error("%s: no Prometheus metrics: cannot listen on %s:%d (%s); set [metrics] port to a free port or 0",
                      who, host, port, exc)
            return None
        log.info("%s: Prometheus metrics on http://%s:%d/metrics", who, host, bound)
        return bound

    def close(self) -> None:
        """Stop the HTTP server, if any, and release its port."""
        if self._server is None:
            return
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._server = self._thread = None
