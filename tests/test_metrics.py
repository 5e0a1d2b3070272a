"""Prometheus endpoints of the aggregator and the agent, scraped over real HTTP on 127.0.0.1."""

from __future__ import annotations

import threading
import urllib.request
from collections import Counter
from collections.abc import Iterator

import pytest
from prometheus_client.parser import text_string_to_metric_families

from fedmq.aggregator.metrics import AggregatorMetrics
from fedmq.edge_agent.metrics import AgentMetrics

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(port: int) -> tuple[Samples, dict[str, str]]:
    """(sample name, sorted labels) -> value, and family name -> type."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        assert response.status == 200
        text = response.read().decode()
    samples: Samples = {}
    types: dict[str, str] = {}
    for family in text_string_to_metric_families(text):
        types[family.name] = family.type
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples, types


@pytest.fixture
def aggregator_metrics() -> Iterator[tuple[AggregatorMetrics, int]]:
    metrics = AggregatorMetrics()
    port = metrics.serve("127.0.0.1", 0)
    yield metrics, port
    metrics.close()


def test_aggregator_exposes_counters_gauges_and_reasons(aggregator_metrics: tuple[AggregatorMetrics, int]) -> None:
    metrics, port = aggregator_metrics
    assert port > 0
    counters: Counter[str] = Counter(accepted=7, rejected=3, rejected_oversize=2, rejected_shape=1, duplicates=4,
                                     late=1, replayed=2, bytes_in=7000, bytes_out=12345, rounds=2)
    metrics.update(counters, model_version=3, devices_online=5, buffered_updates=1)
    samples, types = scrape(port)
    assert samples[("fedmq_updates_accepted_total", ())] == 7
    assert samples[("fedmq_updates_rejected_total", (("reason", "oversize"),))] == 2
    assert samples[("fedmq_updates_rejected_total", (("reason", "shape"),))] == 1
    assert samples[("fedmq_updates_rejected_total", (("reason", "norm"),))] == 0, "known reasons start at zero"
    assert samples[("fedmq_updates_duplicate_total", ())] == 4
    assert samples[("fedmq_updates_late_total", ())] == 1
    assert samples[("fedmq_bytes_in_total", ())] == 7000
    assert samples[("fedmq_bytes_out_total", ())] == 12345
    assert samples[("fedmq_rounds_total", ())] == 2
    assert samples[("fedmq_model_version", ())] == 3
    assert samples[("fedmq_devices_online", ())] == 5
    assert samples[("fedmq_buffered_updates", ())] == 1
    assert types["fedmq_updates_accepted"] == "counter" and types["fedmq_model_version"] == "gauge"

    counters.update(accepted=1, rejected_malformed=1)  # the daemon keeps counting in its own Counter
    assert scrape(port)[0][("fedmq_updates_accepted_total", ())] == 7, "a scrape sees the last snapshot, not live state"
    metrics.update(counters, model_version=4, devices_online=4, buffered_updates=0)
    samples, _ = scrape(port)
    assert samples[("fedmq_updates_accepted_total", ())] == 8
    assert samples[("fedmq_updates_rejected_total", (("reason", "malformed"),))] == 1
    assert samples[("fedmq_model_version", ())] == 4


def test_aggregator_round_histogram(aggregator_metrics: tuple[AggregatorMetrics, int]) -> None:
    metrics, port = aggregator_metrics
    for seconds in (0.5, 4.0, 45.0):
        metrics.observe_round(seconds)
    samples, types = scrape(port)
    assert types["fedmq_round_duration_seconds"] == "histogram"
    assert samples[("fedmq_round_duration_seconds_count", ())] == 3
    assert samples[("fedmq_round_duration_seconds_sum", ())] == pytest.approx(49.5)
    assert samples[("fedmq_round_duration_seconds_bucket", (("le", "5.0"),))] == 2
    assert samples[("fedmq_round_duration_seconds_bucket", (("le", "+Inf"),))] == 3


def test_before_the_first_update_everything_is_zero(aggregator_metrics: tuple[AggregatorMetrics, int]) -> None:
    _, port = aggregator_metrics
    samples, _ = scrape(port)
    assert samples[("fedmq_updates_accepted_total", ())] == 0
    assert samples[("fedmq_model_version", ())] == 0


def test_instances_are_independent_and_ports_are_released() -> None:
    first, second = AggregatorMetrics(), AggregatorMetrics()
    try:
        port1, port2 = first.serve("127.0.0.1", 0), second.serve("127.0.0.1", 0)
        assert port1 != port2
        first.update({"accepted": 1}, model_version=1, devices_online=0, buffered_updates=0)
        second.update({"accepted": 9}, model_version=2, devices_online=0, buffered_updates=0)
        assert scrape(port1)[0][("fedmq_updates_accepted_total", ())] == 1
        assert scrape(port2)[0][("fedmq_updates_accepted_total", ())] == 9
        with pytest.raises(RuntimeError, match="already"):
            first.serve("127.0.0.1", 0)
    finally:
        first.close()
        second.close()
    second.close()  # twice is fine
    reused = AggregatorMetrics()
    try:
        assert reused.serve("127.0.0.1", port1) == port1, "close() releases the port"
    finally:
        reused.close()


def test_updates_from_another_thread_during_scrapes(aggregator_metrics: tuple[AggregatorMetrics, int]) -> None:
    metrics, port = aggregator_metrics
    done = threading.Event()

    def writer() -> None:
        n = 0
        while not done.is_set():
            n += 1
            # accepted and bytes_in move together: a torn read would show them out of step
            metrics.update({"accepted": n, "bytes_in": 10 * n}, model_version=n, devices_online=1, buffered_updates=0)

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        for _ in range(20):
            samples, _ = scrape(port)
            accepted = samples[("fedmq_updates_accepted_total", ())]
            assert samples[("fedmq_bytes_in_total", ())] == 10 * accepted
            assert samples[("fedmq_model_version", ())] == accepted
    finally:
        done.set()
        thread.join()


def test_agent_metrics() -> None:
    metrics = AgentMetrics()
    try:
        port = metrics.serve("127.0.0.1", 0)
        counters = Counter(updates_trained=4, updates_sent=5, accepted=3, rejected=1, rejected_stale=1,
                           bytes_sent=4096, training_errors=1, models_installed=2, models_rejected_version=1)
        metrics.update(counters, model_version=6, paused=True)
        samples, types = scrape(port)
        assert samples[("fedmq_agent_updates_trained_total", ())] == 4
        assert samples[("fedmq_agent_updates_sent_total", ())] == 5
        assert samples[("fedmq_agent_updates_accepted_total", ())] == 3
        assert samples[("fedmq_agent_updates_rejected_total", (("reason", "stale"),))] == 1
        assert samples[("fedmq_agent_bytes_sent_total", ())] == 4096
        assert samples[("fedmq_agent_training_errors_total", ())] == 1
        assert samples[("fedmq_agent_models_installed_total", ())] == 2
        assert samples[("fedmq_agent_model_version", ())] == 6
        assert samples[("fedmq_agent_paused", ())] == 1
        assert types["fedmq_agent_paused"] == "gauge"
        assert not any(name.startswith("fedmq_updates") for name, _ in samples), "no aggregator metrics on an agent"
        metrics.update(counters, model_version=6, paused=False)
        assert scrape(port)[0][("fedmq_agent_paused", ())] == 0
    finally:
        metrics.close()
