"""Aggregator and agents through a real Mosquitto: rounds complete, accuracy rises, statuses and
Last Will behave. The daemons run in this process; the broker is real."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import shard_agents

from fedmq.aggregator.config import AggregatorConfig
from fedmq.aggregator.daemon import Aggregator
from fedmq.aggregator.registry import ModelRegistry
from fedmq.aggregator.rounds import RoundPolicy
from fedmq.broker import topics
from fedmq.broker.architecture import MLPArchitecture
from fedmq.broker.messages import AggregatorStatus, DeviceStatus, ModelMessage, Task, decode_message
from fedmq.broker.settings import BrokerSettings
from fedmq.demo import dirichlet_partition, load_digits_split
from fedmq.edge_agent.training import evaluate

pytestmark = pytest.mark.broker
WAIT = 10.0


async def retained(settings: BrokerSettings, topic: str, within: float = WAIT) -> bytes:
    async with settings.client(identifier=f"probe-{time.monotonic_ns()}") as c:
        await c.subscribe(topic, qos=1)
        async with asyncio.timeout(within):
            async for message in c.messages:
                return bytes(message.payload)  # type: ignore[arg-type]
    raise AssertionError("no message")


async def wait_online(settings: BrokerSettings, topic: str, kind: type, within: float = 20) -> None:
    """Poll the retained status on ``topic`` until it says online."""
    async with asyncio.timeout(within):
        while decode_message(await retained(settings, topic), max_bytes=1 << 16, expect=kind).state != "online":
            await asyncio.sleep(0.1)


@pytest.mark.asyncio
async def test_five_agents_three_rounds_accuracy_rises(mqtt_broker: BrokerSettings, fleet: str, tmp_path: Path,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)  # whatever level an earlier test left: a lost session says why
    x_train, y_train, x_test, y_test = load_digits_split(seed=1, test_fraction=0.2)
    shards = dirichlet_partition(y_train, 5, alpha=0.5, seed=1)
    arch = MLPArchitecture(64, (32,), 10)
    aggregator = Aggregator(AggregatorConfig(
        fleet=fleet, state_dir=tmp_path / "agg", broker=mqtt_broker, client_id=f"{fleet}-agg", arch=arch, seed=1,
        task=Task(epochs=2, batch_size=16, lr=0.1, deadline_s=30), policy=RoundPolicy(5, 5, 30), max_rounds=3,
    ))
    initial = {k: np.array(v) for k, v in aggregator.model.params.items()}
    agents = shard_agents(fleet, shards, x_train, y_train, tmp_path, mqtt_broker)
    stop_agents = asyncio.Event()
    agent_tasks = [asyncio.create_task(a.run(stop_agents)) for a in agents]
    try:
        async with asyncio.timeout(60):
            await aggregator.run()  # returns after max_rounds rounds
        # the last model reaches the agents
        async with asyncio.timeout(WAIT):
            while any(a.model_version < 4 for a in agents):
                await asyncio.sleep(0.05)
        async with asyncio.timeout(WAIT):  # the status follows the install asynchronously
            while True:
                online = decode_message(await retained(mqtt_broker, topics.status_topic(fleet, agents[0].device)),
                                        max_bytes=1 << 16, expect=DeviceStatus)
                if online.model_version == 4:
                    break
                await asyncio.sleep(0.1)
        assert online.state == "online" and online.model_version == 4 and online.backend == "onnx"  # auto: the fastest installed
        assert online.platform and online.software
    finally:
        stop_agents.set()
        await asyncio.wait(agent_tasks, timeout=WAIT)
    assert all(t.done() and t.exception() is None for t in agent_tasks)

    registry = ModelRegistry(tmp_path / "agg")  # run() closed the aggregator's own handle
    records = registry.versions()
    assert [r.version for r in records] == [1, 2, 3, 4]
    assert [r.parent for r in records] == [0, 1, 2, 3]
    assert all(r.info["updates"] == 5 for r in records[1:])
    assert all(r.info["examples"] == len(y_train) for r in records[1:])
    final: ModelMessage = decode_message(registry.load_payload(records[-1]), max_bytes=1 << 22, expect=ModelMessage)
    acc0, loss0 = evaluate(initial, arch, x_test, y_test)
    acc3, loss3 = evaluate(final.params, arch, x_test, y_test)
    assert acc3 > acc0 + 0.3 and loss3 < loss0 / 2, (acc0, acc3, loss0, loss3)
    for agent in agents:
        assert agent.counters["accepted"] == 3
        assert agent.counters["rejected"] == 0
        # every agent trained on the final v4 too; with the aggregator gone that update waits on disk
        assert [e.base_version for e in agent.outbox.entries()] in ([], [4])
    assert aggregator.counters["accepted"] == 15 and aggregator.counters["rejected"] == 0
    # the aggregator said goodbye: its retained status is offline with its counters
    gone = decode_message(await retained(mqtt_broker, topics.aggregator_status_topic(fleet)), max_bytes=1 << 16,
                          expect=AggregatorStatus)
    # (the Will's payload instead, version 0 and no counters, means a session ended on an error:
    # the goodbye is published only by a graceful one; the warnings say what happened)
    assert gone.state == "offline" and gone.model_version == 4 and gone.counters["accepted"] == 15, (gone, caplog.text)


def write_agent_config(path: Path, fleet: str, device: str, settings: BrokerSettings, state: Path) -> None:
    path.write_text(
        f'device_id = "{device}"\nfleet = "{fleet}"\nstate_dir = "{state}"\n'
        f'[broker]\nurl = "mqtt://{settings.host}:{settings.port}"\nkeepalive = 5\n'
    )


def start_agent(config: Path, log: Path) -> subprocess.Popen[bytes]:
    with log.open("wb") as out:
        return subprocess.Popen([sys.executable, "-m", "fedmq.cli", "--log-level", "info", "agent", "--config", str(config)],
                                stdout=out, stderr=subprocess.STDOUT)


@pytest.mark.asyncio
async def test_agent_killed_with_sigkill_shows_offline(mqtt_broker: BrokerSettings, fleet: str, tmp_path: Path) -> None:
    """The real CLI agent process: online while it runs, offline (its Last Will) once SIGKILLed."""
    config = tmp_path / "agent.toml"
    device = f"{fleet}-pi"
    write_agent_config(config, fleet, device, mqtt_broker, tmp_path / "state")
    async with mqtt_broker.client(identifier=f"{fleet}-watch") as watcher:
        await watcher.subscribe(topics.status_topic(fleet, device), qos=1)
        proc = start_agent(config, tmp_path / "agent.log")
        try:
            states = []
            async with asyncio.timeout(20):
                async for message in watcher.messages:
                    status = decode_message(bytes(message.payload), max_bytes=1 << 16, expect=DeviceStatus)  # type: ignore[arg-type]
                    states.append(status.state)
                    if status.state == "online":
                        os.kill(proc.pid, signal.SIGKILL)
                    elif states[:1] == ["online"]:
                        break
            assert states == ["online", "offline"]
        finally:
            proc.kill()
            proc.wait(timeout=WAIT)


@pytest.mark.asyncio
async def test_agent_sigterm_is_graceful(mqtt_broker: BrokerSettings, fleet: str, tmp_path: Path) -> None:
    config = tmp_path / "agent.toml"
    device = f"{fleet}-pi"
    write_agent_config(config, fleet, device, mqtt_broker, tmp_path / "state")
    proc = start_agent(config, tmp_path / "agent.log")
    try:
        await wait_online(mqtt_broker, topics.status_topic(fleet, device), DeviceStatus)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=WAIT) == 0
        status = decode_message(await retained(mqtt_broker, topics.status_topic(fleet, device)),
                                max_bytes=1 << 16, expect=DeviceStatus)
        assert status.state == "offline"
    finally:
        proc.kill()
        proc.wait(timeout=WAIT)


@pytest.mark.asyncio
async def test_aggregator_sigterm_is_graceful(mqtt_broker: BrokerSettings, fleet: str, tmp_path: Path) -> None:
    """SIGTERM: the aggregator publishes its offline status with its counters and exits 0."""
    config = tmp_path / "aggregator.toml"
    config.write_text(
        f'fleet = "{fleet}"\nstate_dir = "{tmp_path / "state"}"\nclient_id = "{fleet}-agg"\n'
        f'[broker]\nurl = "mqtt://{mqtt_broker.host}:{mqtt_broker.port}"\n[model]\ninputs = 4\nhidden = [3]\nclasses = 2\n'
    )
    with (tmp_path / "aggregator.log").open("wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "fedmq.cli", "--log-level", "info", "aggregator", "--config",
                                 str(config)], stdout=out, stderr=subprocess.STDOUT)
    try:
        await wait_online(mqtt_broker, topics.aggregator_status_topic(fleet), AggregatorStatus)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=WAIT) == 0
        status = decode_message(await retained(mqtt_broker, topics.aggregator_status_topic(fleet)),
                                max_bytes=1 << 16, expect=AggregatorStatus)
        assert status.state == "offline" and status.model_version == 1
        assert "shutting down" in (tmp_path / "aggregator.log").read_text()
    finally:
        proc.kill()
        proc.wait(timeout=WAIT)


@pytest.mark.asyncio
async def test_restart_after_the_last_round_publishes_it_and_stops(mqtt_broker: BrokerSettings, fleet: str,
                                                                   tmp_path: Path) -> None:
    """A crash between storing the last version and publishing it: the restarted aggregator
    publishes that version, takes no more updates, and stops."""
    arch = MLPArchitecture(4, (3,), 2)
    config = AggregatorConfig(fleet=fleet, state_dir=tmp_path, broker=mqtt_broker, client_id=f"{fleet}-agg", arch=arch,
                              policy=RoundPolicy(1, 1), max_rounds=1)
    crashed = Aggregator(config)
    delta = {k: np.full(s, 0.25, np.float32) for k, s in arch.param_shapes().items()}
    from fedmq.broker.messages import UpdateMessage
    crashed.ingest("d1", UpdateMessage("d1", "u1", 1, 5, "fp32", delta).encode())
    crashed.close_round()  # stored as v2, never published: the process "dies" here
    crashed.registry.close()

    restarted = Aggregator(config)
    async with asyncio.timeout(20):
        await restarted.run()
    model = decode_message(await retained(mqtt_broker, topics.model_topic(fleet)), max_bytes=1 << 20, expect=ModelMessage)
    assert model.version == 2
    status = decode_message(await retained(mqtt_broker, topics.aggregator_status_topic(fleet)), max_bytes=1 << 16,
                            expect=AggregatorStatus)
    assert status.state == "offline" and status.model_version == 2
    assert [r.version for r in ModelRegistry(tmp_path).versions()] == [1, 2]
