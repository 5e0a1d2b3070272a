"""Shared fixtures: a real MQTT broker on 127.0.0.1 and unique fleet names.

The broker is, in order: the one named by ``FEDMQ_TEST_BROKER`` (an ``mqtt://`` URL), Mosquitto
in Docker through testcontainers when a Docker daemon answers, else the local ``mosquitto``
binary. With none of these the broker tests fail (they are never skipped): install Mosquitto
(``apt-get install -y mosquitto``) or set ``FEDMQ_TEST_BROKER``.
"""

from __future__ import annotations

import logging
import os
import uuid
from collections.abc import Iterator

import pytest

from fedmq.broker.local import MosquittoProcess, mosquitto_binary
from fedmq.broker.settings import BrokerSettings

log = logging.getLogger(__name__)

NO_BROKER = (
    "no MQTT broker for the tests: install Mosquitto (apt-get install -y mosquitto), "
    "start a Docker daemon, or set FEDMQ_TEST_BROKER=mqtt://127.0.0.1:PORT"
)


def _docker_mosquitto() -> Iterator[BrokerSettings] | None:
    if not os.environ.get("DOCKER_HOST") and not os.path.exists("/var/run/docker.sock"):
        return None
    try:
        import docker  # testcontainers' own dependency
        from testcontainers.core.container import DockerContainer

        client = docker.from_env(timeout=3)
        try:
            client.ping()
        finally:
            client.close()
    except Exception as exc:  # no daemon: the usual case on CI and dev machines here
        log.info("no Docker daemon (%s); using the local mosquitto binary", exc)
        return None

    def generate() -> Iterator[BrokerSettings]:
        container = DockerContainer("eclipse-mosquitto:2").with_exposed_ports(1883)
        container.with_command("mosquitto -c /mosquitto-no-auth.conf")
        with container:
            host = container.get_container_host_ip()
            yield BrokerSettings(host=host, port=int(container.get_exposed_port(1883)), protocol="5")

    return generate()


@pytest.fixture(scope="session")
def mqtt_broker() -> Iterator[BrokerSettings]:
    """Connection settings of a real Mosquitto shared by the whole session."""
    url = os.environ.get("FEDMQ_TEST_BROKER")
    if url:
        yield BrokerSettings.from_url(url)
        return
    docker_broker = _docker_mosquitto()
    if docker_broker is not None:
        yield from docker_broker
        return
    if mosquitto_binary() is None:
        pytest.fail(NO_BROKER)
    with MosquittoProcess() as broker:
        yield BrokerSettings(host=broker.host, port=broker.port, protocol="5")


@pytest.fixture
def require_mosquitto() -> str:
    """The local mosquitto binary, for tests that start, kill and restart their own broker."""
    binary = mosquitto_binary()
    if binary is None:
        pytest.fail(NO_BROKER)
    return binary


@pytest.fixture
def umask_0() -> Iterator[None]:
    """No umask for the test: file modes are exactly what the code asks for."""
    old = os.umask(0)
    try:
        yield
    finally:
        os.umask(old)


@pytest.fixture
def fleet() -> str:
    """A fleet name no other test uses, so retained messages never leak between tests."""
    return f"t{uuid.uuid4().hex[:10]}"


async def aggregator_online(broker: BrokerSettings, fleet: str, within: float = 30.0) -> None:
    """Wait until the fleet's aggregator says it is online (it has subscribed to the updates)."""
    import asyncio

    from fedmq.broker import topics
    from fedmq.broker.messages import AggregatorStatus, decode_message

    async with broker.client(identifier=f"{fleet}-probe") as probe, asyncio.timeout(within):
        await probe.subscribe(topics.aggregator_status_topic(fleet), qos=1)
        async for message in probe.messages:
            if decode_message(bytes(message.payload), max_bytes=1 << 16, expect=AggregatorStatus).state == "online":
                return


def shard_agents(fleet: str, shards: list, x: object, y: object, directory: object, broker: BrokerSettings,
                 **config: object) -> list:
    """One in-process agent per data shard, each with its own .npz file and state directory."""
    import numpy as np

    from fedmq.edge_agent.agent import Agent
    from fedmq.edge_agent.config import AgentConfig

    agents = []
    for i, shard in enumerate(shards):
        path = directory / f"data{i}.npz"  # type: ignore[operator]
        np.savez(path, x=x[shard], y=y[shard])  # type: ignore[index]
        agents.append(Agent(AgentConfig(device_id=f"{fleet}-a{i}", fleet=fleet, state_dir=directory / f"agent{i}",  # type: ignore[operator]
                                        data=path, broker=broker, **config)))  # type: ignore[arg-type]
    return agents


def unbounded() -> dict:
    """AggregatorConfig fields that switch off the per-device bounds (norm bound, weight cap,
    rate limit): for tests that pin the aggregation maths or the intake with hand-computed
    values, and flood from one device on purpose. The bounds have tests of their own."""
    from fedmq.aggregator.config import UpdateLimits
    from fedmq.aggregator.influence import InfluenceSettings

    return {"influence": InfluenceSettings(auto_norm=False, weight_factor=0), "limits": UpdateLimits(per_second=0)}
