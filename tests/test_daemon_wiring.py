"""The daemons as systemd and Prometheus see them: the real CLI process sends sd_notify READY,
WATCHDOG and STOPPING to a test socket, logs JSON lines, and serves live metrics on 127.0.0.1."""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from fedmq.aggregator.config import AggregatorConfig
from fedmq.aggregator.daemon import Aggregator
from fedmq.aggregator.rounds import RoundPolicy
from fedmq.broker.architecture import MLPArchitecture
from fedmq.broker.settings import BrokerSettings
from fedmq.edge_agent.agent import Agent
from fedmq.edge_agent.config import AgentConfig

pytestmark = pytest.mark.broker


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def scrape(port: int) -> dict[str, float]:
    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    values: dict[str, float] = {}
    for family in text_string_to_metric_families(body):
        for sample in family.samples:
            label = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
            values[sample.name + (f"{{{label}}}" if label else "")] = sample.value
    return values


def test_aggregator_process_speaks_sd_notify_logs_json_and_serves_metrics(mqtt_broker: BrokerSettings, fleet: str,
                                                                          tmp_path: Path) -> None:
    notify_path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(notify_path))
    sock.settimeout(30)
    port = free_port()
    config = tmp_path / "aggregator.toml"
    config.write_text(
        f'fleet = "{fleet}"\nstate_dir = "{tmp_path / "state"}"\nclient_id = "{fleet}-agg"\n'
        f'[broker]\nurl = "mqtt://{mqtt_broker.host}:{mqtt_broker.port}"\n[model]\ninputs = 4\nhidden = [3]\nclasses = 2\n'
        f'[metrics]\nport = {port}\n'
    )
    env = {"NOTIFY_SOCKET": str(notify_path), "WATCHDOG_USEC": "400000", "PATH": "/usr/bin:/bin"}
    proc = subprocess.Popen([sys.executable, "-m", "fedmq.cli", "--log-level", "info", "--log-format", "json",
                             "aggregator", "--config", str(config)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={**env, "PYTHONPATH": ":".join(sys.path)})
    try:
        messages = []
        while not any("WATCHDOG=1" in m for m in messages) or len([m for m in messages if "WATCHDOG=1" in m]) < 2:
            messages.append(sock.recv(4096).decode())
        assert messages[0].splitlines()[0] == "READY=1" and "STATUS=serving model v1" in messages[0]
        metrics = scrape(port)
        assert metrics["fedmq_model_version"] == 1.0
        assert metrics["fedmq_updates_accepted_total"] == 0.0
        proc.send_signal(signal.SIGTERM)
        while "STOPPING=1" not in messages[-1]:
            messages.append(sock.recv(4096).decode())
        assert proc.wait(timeout=30) == 0
    finally:
        proc.kill()
        _, stderr = proc.communicate(timeout=30)
        sock.close()
    records = [json.loads(line) for line in stderr.decode().splitlines() if line.strip()]
    assert records, "the daemon logged nothing"
    assert {"ts", "level", "logger", "message"} <= set(records[0])
    assert any("Prometheus metrics on http://127.0.0.1" in r["message"] for r in records)


@pytest.mark.asyncio
async def test_aggregator_metrics_count_updates_and_online_devices(mqtt_broker: BrokerSettings, fleet: str,
                                                                   tmp_path: Path) -> None:
    arch = MLPArchitecture(4, (3,), 2)
    port, agent_port = free_port(), free_port()
    aggregator = Aggregator(AggregatorConfig(fleet=fleet, state_dir=tmp_path / "agg", broker=mqtt_broker,
                                             client_id=f"{fleet}-agg", arch=arch, policy=RoundPolicy(1, 1),
                                             metrics_port=port))
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "d.npz", x=rng.standard_normal((30, 4)).astype(np.float32), y=rng.integers(0, 2, 30))
    agent = Agent(AgentConfig(device_id=f"{fleet}-d1", fleet=fleet, state_dir=tmp_path / "d1", data=tmp_path / "d.npz",
                              broker=mqtt_broker, backend="numpy", metrics_port=agent_port))
    stop = asyncio.Event()
    agent_task = asyncio.create_task(agent.run(stop))
    aggregator_task = asyncio.create_task(aggregator.run(stop))
    try:
        async with asyncio.timeout(30):
            while True:
                await asyncio.sleep(0.2)
                values = await asyncio.to_thread(scrape, port)
                if values["fedmq_devices_online"] == 1.0 and values["fedmq_model_version"] >= 2.0:
                    break
            agent_values = await asyncio.to_thread(scrape, agent_port)
    finally:
        stop.set()
        await asyncio.wait([agent_task, aggregator_task], timeout=30)
    assert values["fedmq_updates_accepted_total"] >= 1.0
    assert values["fedmq_bytes_in_total"] > 0 and values["fedmq_bytes_out_total"] > 0
    assert values["fedmq_round_duration_seconds_count"] >= 1.0
    assert agent_values["fedmq_agent_updates_trained_total"] >= 1.0
    assert agent_values["fedmq_agent_model_version"] >= 2.0
    assert agent_task.exception() is None and aggregator_task.exception() is None
