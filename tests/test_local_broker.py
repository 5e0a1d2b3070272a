"""Real brokers on 127.0.0.1: Mosquitto subprocess, embedded amqtt, and the LocalBroker choice."""

from __future__ import annotations

import asyncio
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import aiomqtt
import paho.mqtt.client as paho
import pytest

from fedmq.broker import local
from fedmq.broker.local import (
    BrokerStartError,
    EmbeddedBroker,
    LocalBroker,
    MosquittoProcess,
    find_free_port,
)

HOST = "127.0.0.1"
WAIT = 5.0  # seconds: upper bound on every network wait

needs_mosquitto = pytest.mark.usefixtures("require_mosquitto")  # fails, never skips, without it

V5 = aiomqtt.ProtocolVersion.V5
V311 = aiomqtt.ProtocolVersion.V311


def client(port: int, protocol: aiomqtt.ProtocolVersion, identifier: str, **kwargs: object) -> aiomqtt.Client:
    return aiomqtt.Client(HOST, port, identifier=identifier, protocol=protocol, timeout=WAIT, **kwargs)  # type: ignore[arg-type]


async def next_message(c: aiomqtt.Client, within: float = WAIT) -> aiomqtt.Message:
    async with asyncio.timeout(within):
        async for message in c.messages:
            return message
    raise AssertionError("message iterator ended")


async def publish_retained_then_read(port: int, protocol: aiomqtt.ProtocolVersion, topic: str) -> aiomqtt.Message:
    async with client(port, protocol, "retain-pub") as pub:
        await pub.publish(topic, b"kept", qos=1, retain=True)
    async with client(port, protocol, "retain-sub") as sub:
        await sub.subscribe(topic, qos=1)
        return await next_message(sub)


@pytest.fixture
def mosquitto(tmp_path: Path) -> Iterator[MosquittoProcess]:
    with MosquittoProcess(workdir=tmp_path, persistence=True) as broker:
        yield broker


def test_find_free_port_is_bindable() -> None:
    port = find_free_port()
    assert 0 < port < 65536
    with socket.socket() as sock:
        sock.bind((HOST, port))


@needs_mosquitto
@pytest.mark.asyncio
@pytest.mark.parametrize("protocol", [V5, V311], ids=["v5", "v311"])
async def test_mosquitto_delivers_retained_message(
    mosquitto: MosquittoProcess, protocol: aiomqtt.ProtocolVersion
) -> None:
    assert mosquitto.is_running()
    assert mosquitto.url == f"mqtt://127.0.0.1:{mosquitto.port}"
    message = await publish_retained_then_read(mosquitto.port, protocol, "fedmq/test/retained")
    assert message.payload == b"kept"
    assert message.retain is True
    assert "mosquitto version" in mosquitto.log_text()


@needs_mosquitto
@pytest.mark.asyncio
async def test_mosquitto_kill_restart_keeps_retained_with_persistence(mosquitto: MosquittoProcess) -> None:
    port = mosquitto.port
    async with client(port, V5, "persist-pub") as pub:
        await pub.publish("fedmq/test/persist", b"survives", qos=1, retain=True)
    await asyncio.to_thread(mosquitto.save_database)
    first_pid = mosquitto.pid

    mosquitto.kill()
    assert not mosquitto.is_running()
    await asyncio.to_thread(mosquitto.restart)

    assert mosquitto.is_running()
    assert mosquitto.port == port
    assert mosquitto.pid != first_pid
    async with client(port, V5, "persist-sub") as sub:
        await sub.subscribe("fedmq/test/persist", qos=1)
        message = await next_message(sub)
    assert message.payload == b"survives"
    assert message.retain is True


@needs_mosquitto
@pytest.mark.asyncio
async def test_mosquitto_without_persistence_forgets_retained_after_kill(tmp_path: Path) -> None:
    with MosquittoProcess(workdir=tmp_path, persistence=False) as broker:
        async with client(broker.port, V311, "volatile-pub") as pub:
            await pub.publish("fedmq/test/volatile", b"lost", qos=1, retain=True)
        broker.kill()
        await asyncio.to_thread(broker.restart)
        async with client(broker.port, V311, "volatile-sub") as sub:
            await sub.subscribe("fedmq/test/volatile", qos=1)
            with pytest.raises(TimeoutError):
                await next_message(sub, within=0.5)


@needs_mosquitto
def test_mosquitto_stop_is_idempotent_and_frees_the_port(tmp_path: Path) -> None:
    broker = MosquittoProcess(workdir=tmp_path)
    broker.start()
    assert broker.is_running()
    broker.stop()
    broker.stop()
    assert not broker.is_running()
    # The port is free again: a second broker can take it.
    with MosquittoProcess(port=broker.port, workdir=tmp_path / "second") as other:
        assert other.is_running()


@needs_mosquitto
def test_mosquitto_bad_config_raises_with_log_tail(tmp_path: Path) -> None:
    broker = MosquittoProcess(workdir=tmp_path, extra_conf="no_such_option 1")
    started = time.monotonic()
    with pytest.raises(BrokerStartError, match="no_such_option"):
        broker.start(timeout=WAIT)
    assert time.monotonic() - started < WAIT
    assert not broker.is_running()


@needs_mosquitto
def test_mosquitto_port_in_use_raises(mosquitto: MosquittoProcess, tmp_path: Path) -> None:
    with pytest.raises(BrokerStartError, match="Address already in use"):
        MosquittoProcess(port=mosquitto.port, workdir=tmp_path / "clash").start(timeout=WAIT)


@needs_mosquitto
@pytest.mark.asyncio
async def test_mosquitto_reads_private_acl_file_under_private_dir(tmp_path: Path) -> None:
    # As root, Mosquitto would drop to user `mosquitto` and fail on this 0600 file in a 0700
    # directory; the generated `user root` keeps it working.
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    acl = private / "acl"
    acl.write_text("topic readwrite fedmq/allowed/#\n")
    acl.chmod(0o600)
    with MosquittoProcess(workdir=private, persistence=True, extra_conf=f"acl_file {acl}") as broker:
        if os.geteuid() == 0:
            assert "user root" in broker.config_text()
        async with client(broker.port, V5, "acl-sub") as sub:
            await sub.subscribe("fedmq/#", qos=1)
            async with client(broker.port, V5, "acl-pub") as pub:
                await pub.publish("fedmq/denied/x", b"no", qos=1)
                await pub.publish("fedmq/allowed/x", b"yes", qos=1)
            message = await next_message(sub)
        assert message.topic.value == "fedmq/allowed/x"
        await asyncio.to_thread(broker.save_database)
        assert (private / "data" / "mosquitto.db").is_file()


@pytest.mark.asyncio
async def test_embedded_broker_carries_4mb_payload_over_v311() -> None:
    payload = os.urandom(4 * 1024 * 1024)
    async with EmbeddedBroker() as broker:
        assert broker.url == f"mqtt://127.0.0.1:{broker.port}"
        async with client(broker.port, V311, "big-sub") as sub, client(broker.port, V311, "big-pub") as pub:
            await sub.subscribe("fedmq/test/big", qos=1)
            await pub.publish("fedmq/test/big", payload, qos=1)
            message = await next_message(sub)
    assert message.payload == payload


@pytest.mark.asyncio
async def test_embedded_broker_delivers_retained_message() -> None:
    async with EmbeddedBroker() as broker:
        message = await publish_retained_then_read(broker.port, V311, "fedmq/test/retained")
    assert message.payload == b"kept"
    assert message.retain is True


def connect_then_drop(port: int, will_topic: str) -> None:
    """Connect with a Last Will, then close the TCP socket without sending DISCONNECT."""
    dropper = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id="dropper", protocol=paho.MQTTv311)
    dropper.will_set(will_topic, b"gone", qos=1)
    dropper.connect(HOST, port, keepalive=60)
    deadline = time.monotonic() + WAIT
    while not dropper.is_connected():
        assert time.monotonic() < deadline, "no CONNACK from broker"
        dropper.loop(timeout=0.05)
    sock = dropper.socket()
    assert sock is not None
    sock.close()


@pytest.mark.asyncio
async def test_embedded_broker_sends_last_will_on_unclean_disconnect() -> None:
    async with EmbeddedBroker() as broker, client(broker.port, V311, "will-watcher") as watcher:
        await watcher.subscribe("fedmq/test/will", qos=1)
        # Blocking paho calls run in a thread: the broker lives on this event loop.
        await asyncio.to_thread(connect_then_drop, broker.port, "fedmq/test/will")
        message = await next_message(watcher)
    assert message.topic.value == "fedmq/test/will"
    assert message.payload == b"gone"


@pytest.mark.asyncio
async def test_embedded_broker_disconnects_client_over_size_limit() -> None:
    will = aiomqtt.Will("fedmq/test/will", b"dropped", qos=1)
    async with EmbeddedBroker(max_message_bytes=1024 * 1024) as broker, client(broker.port, V311, "limit-sub") as sub:
        await sub.subscribe("fedmq/test/#", qos=1)
        async with client(broker.port, V311, "limit-pub", will=will) as pub:
            await pub.publish("fedmq/test/small", b"ok", qos=1)
            # QoS 0 returns once written; the broker answers by closing the connection.
            await pub.publish("fedmq/test/huge", b"x" * (2 * 1024 * 1024), qos=0)
            first = await next_message(sub)
            second = await next_message(sub)
            # The publisher sees the broker close its connection.
            with pytest.raises(aiomqtt.MqttError):
                await next_message(pub)
    assert (first.topic.value, first.payload) == ("fedmq/test/small", b"ok")
    assert (second.topic.value, second.payload) == ("fedmq/test/will", b"dropped")


@pytest.mark.asyncio
async def test_embedded_broker_rejects_mqtt5() -> None:
    async with LocalBroker(prefer="amqtt") as broker:
        assert broker.kind == "amqtt"
        assert broker.protocols == ("3.1.1",)
        with pytest.raises(aiomqtt.MqttError):
            async with client(broker.port, V5, "v5-client"):
                pass


@needs_mosquitto
@pytest.mark.asyncio
async def test_local_broker_auto_picks_mosquitto(tmp_path: Path) -> None:
    async with LocalBroker(prefer="auto", workdir=tmp_path) as broker:
        assert broker.kind == "mosquitto"
        assert broker.protocols == ("5", "3.1.1")
        assert isinstance(broker.backend, MosquittoProcess)
        process = broker.backend
        message = await publish_retained_then_read(broker.port, V5, "fedmq/test/auto")
        assert message.payload == b"kept"
    assert not process.is_running()


@pytest.mark.asyncio
async def test_local_broker_auto_falls_back_to_amqtt(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(local, "mosquitto_binary", lambda: None)
    async with LocalBroker(prefer="auto") as broker:
        assert broker.kind == "amqtt"
        message = await publish_retained_then_read(broker.port, V311, "fedmq/test/fallback")
    assert message.payload == b"kept"


@pytest.mark.asyncio
@pytest.mark.parametrize("found", [None, "/nonexistent/sbin/mosquitto"], ids=["not-found", "bad-path"])
async def test_prefer_mosquitto_without_binary_names_the_fix(
    monkeypatch: pytest.MonkeyPatch, found: str | None
) -> None:
    monkeypatch.setattr(local, "mosquitto_binary", lambda: found)
    broker = LocalBroker(prefer="mosquitto")
    with pytest.raises(BrokerStartError, match="apt-get install mosquitto") as excinfo:
        await broker.start()
    assert 'prefer="amqtt"' in str(excinfo.value)
    with pytest.raises(RuntimeError):
        _ = broker.url
