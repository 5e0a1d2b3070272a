"""Receipts through paho directly (aggregator/receipts.py), on a real Mosquitto: every one is
followed to its PUBACK, at most ``limit`` wait, a broker that stops acknowledging is noticed
within the timeout, and the order with other publishes is kept."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path

import aiomqtt
import pytest

from fedmq.aggregator.receipts import ReceiptSender
from fedmq.broker.local import MosquittoProcess
from fedmq.broker.settings import BrokerSettings

pytestmark = pytest.mark.broker


@pytest.mark.asyncio
async def test_receipts_arrive_in_order_with_later_publishes_and_are_all_acknowledged(mqtt_broker: BrokerSettings,
                                                                                      fleet: str) -> None:
    async with mqtt_broker.client(identifier=f"{fleet}-sub") as sub, mqtt_broker.client(identifier=f"{fleet}-agg") as agg:
        await sub.subscribe(f"{fleet}/#", qos=1)
        sender = ReceiptSender(agg, limit=8, timeout=10.0)
        try:
            for i in range(50):
                sender.send(f"{fleet}/receipt/d{i % 5}", f"r{i}".encode())
                await sender.room()
                assert sender.unacknowledged() <= 8
            # an aiomqtt publish after them (the next model) still works and comes after them
            await asyncio.wait_for(agg.publish(f"{fleet}/model", b"model", qos=1), timeout=10)
            assert await sender.settle(10.0) == 0
        finally:
            sender.close()
        got = []
        async with asyncio.timeout(10):
            async for message in sub.messages:
                got.append(bytes(message.payload))
                if len(got) == 51:
                    break
    assert got == [f"r{i}".encode() for i in range(50)] + [b"model"]


@pytest.mark.asyncio
async def test_a_broker_that_stops_acknowledging_is_noticed_within_the_timeout(require_mosquitto: str, fleet: str,
                                                                              tmp_path: Path) -> None:
    with MosquittoProcess(workdir=tmp_path / "broker") as broker:
        settings = BrokerSettings(host=broker.host, port=broker.port, protocol="5")
        async with settings.client(identifier=f"{fleet}-agg") as agg:
            sender = ReceiptSender(agg, limit=4, timeout=0.5)
            os.kill(broker.pid, signal.SIGSTOP)
            try:
                for i in range(4):
                    sender.send(f"{fleet}/receipt/d{i}", b"r")
                await sender.room()  # 4 <= limit: no waiting, nothing overdue yet
                sender.send(f"{fleet}/receipt/d4", b"r")
                started = time.monotonic()
                with pytest.raises(aiomqtt.MqttError, match="no PUBACK within 0.5 s"):
                    await sender.room()  # 5 > limit: waits, then the oldest is overdue
                assert 0.3 < time.monotonic() - started < 3.0
                with pytest.raises(aiomqtt.MqttError):
                    sender.check()
                assert await sender.settle(5.0) == 5  # nobody waits past a receipt's timeout
            finally:
                os.kill(broker.pid, signal.SIGCONT)
                sender.close()


@pytest.mark.asyncio
async def test_watch_ends_a_session_whose_broker_went_silent_without_anything_else_happening(
        require_mosquitto: str, fleet: str, tmp_path: Path) -> None:
    with MosquittoProcess(workdir=tmp_path / "broker") as broker:
        settings = BrokerSettings(host=broker.host, port=broker.port, protocol="5")
        async with settings.client(identifier=f"{fleet}-agg") as agg:
            sender = ReceiptSender(agg, limit=4, timeout=0.4)
            watch = asyncio.create_task(sender.watch())
            try:
                await asyncio.sleep(1.0)  # nothing waits for a PUBACK: nothing to say
                assert not watch.done()
                os.kill(broker.pid, signal.SIGSTOP)
                sender.send(f"{fleet}/receipt/d0", b"r")
                started = time.monotonic()
                with pytest.raises(aiomqtt.MqttError, match="no PUBACK within 0.4 s"):
                    await asyncio.wait_for(watch, timeout=5)
                assert 0.3 < time.monotonic() - started < 2.0
            finally:
                os.kill(broker.pid, signal.SIGCONT)
                watch.cancel()
                sender.close()


@pytest.mark.asyncio
async def test_a_broker_that_keeps_sending_is_not_taken_for_dead(require_mosquitto: str, fleet: str,
                                                                  tmp_path: Path) -> None:
    """A PUBACK can queue behind a backlog of updates on a slow link: while bytes keep coming from
    the broker (paho's own record of them is set here, the broker being stopped), a receipt waits
    past ``timeout`` without ending the session, and only ``give_up`` ends it."""
    import paho.mqtt.client as paho

    with MosquittoProcess(workdir=tmp_path / "broker") as broker:
        settings = BrokerSettings(host=broker.host, port=broker.port, protocol="5")
        async with settings.client(identifier=f"{fleet}-agg") as agg:
            sender = ReceiptSender(agg, limit=4, timeout=0.3, give_up=1.5)
            os.kill(broker.pid, signal.SIGSTOP)
            try:
                sender.send(f"{fleet}/receipt/d0", b"r")
                started = time.monotonic()
                while time.monotonic() - started < 1.0:  # over three times the timeout
                    agg._client._last_bytes_received = paho.time_func()  # as a backlog arriving
                    sender.check()
                    await asyncio.sleep(0.05)
                assert sender.unacknowledged() == 1
                while time.monotonic() - started < 1.4:  # still sending, still under give_up
                    agg._client._last_bytes_received = paho.time_func()
                    await asyncio.sleep(0.05)
                sender.check()
                await asyncio.sleep(0.2)  # past give_up
                agg._client._last_bytes_received = paho.time_func()
                with pytest.raises(aiomqtt.MqttError, match="no PUBACK within 1.5 s"):
                    sender.check()
            finally:
                os.kill(broker.pid, signal.SIGCONT)
                sender.close()


@pytest.mark.asyncio
async def test_close_gives_aiomqtt_its_callback_back(mqtt_broker: BrokerSettings, fleet: str) -> None:
    async with mqtt_broker.client(identifier=f"{fleet}-agg") as agg:
        own = agg._client.on_publish
        sender = ReceiptSender(agg, limit=4, timeout=5.0)
        assert agg._client.on_publish is not own
        sender.send(f"{fleet}/receipt/d0", b"r")
        assert await sender.settle(5.0) == 0
        sender.close()
        assert agg._client.on_publish == own
        await asyncio.wait_for(agg.publish(f"{fleet}/x", b"still works", qos=1), timeout=5)


@pytest.mark.asyncio
async def test_sending_on_a_closed_connection_raises(mqtt_broker: BrokerSettings, fleet: str) -> None:
    async with mqtt_broker.client(identifier=f"{fleet}-agg") as agg:
        sender = ReceiptSender(agg, limit=4, timeout=5.0)
    try:
        with pytest.raises(aiomqtt.MqttCodeError, match="not currently connected"):
            sender.send(f"{fleet}/receipt/d0", b"r")
        assert sender.unacknowledged() == 0
    finally:
        sender.close()
