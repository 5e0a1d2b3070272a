"""The reconnect loop: backoff maths, MQTT 5 -> 3.1.1 fallback, reconnect after a broker restart."""

from __future__ import annotations

import asyncio
import random
import subprocess
import sys
from pathlib import Path

import aiomqtt
import pytest

from fedmq.broker.local import MosquittoProcess
from fedmq.broker.session import Backoff, cancel_tasks, run_connected, sleep_or_stop
from fedmq.broker.settings import BrokerSettings


def test_backoff_grows_exponentially_with_jitter_and_cap() -> None:
    backoff = Backoff(base=1.0, cap=8.0, rng=random.Random(0))
    ceilings = [1, 2, 4, 8, 8, 8]
    delays = [backoff.next_delay() for _ in ceilings]
    for delay, ceiling in zip(delays, ceilings, strict=True):
        assert 0.25 <= delay <= ceiling
    assert len(set(delays)) == len(delays), "jitter: no two delays alike"
    many = [Backoff(base=1.0, cap=8.0, attempt=10, rng=random.Random(i)).next_delay() for i in range(200)]
    assert max(many) <= 8.0 and min(many) >= 0.25
    assert max(many) > 6 and min(many) < 2, "full jitter spreads over the whole range"
    backoff.reset()
    assert backoff.next_delay() <= 1.0


@pytest.mark.asyncio
async def test_sleep_or_stop_returns_early_when_stopped() -> None:
    stop = asyncio.Event()
    assert await sleep_or_stop(stop, 0.01) is False
    stop.set()
    async with asyncio.timeout(1):
        assert await sleep_or_stop(stop, 60) is True


@pytest.mark.asyncio
async def test_cancel_tasks_waits_for_every_task() -> None:
    finished: list[str] = []

    async def stubborn() -> None:
        try:
            await asyncio.sleep(60)
        finally:
            finished.append("stubborn")

    tasks = [asyncio.create_task(stubborn()) for _ in range(3)]
    await asyncio.sleep(0)
    async with asyncio.timeout(5):
        await cancel_tasks(tasks)
    assert finished == ["stubborn"] * 3 and all(t.cancelled() for t in tasks)


FALLBACK_SCRIPT = """
import asyncio, aiomqtt
from dataclasses import replace
from fedmq.broker.local import EmbeddedBroker
from fedmq.broker.session import Backoff, run_connected
from fedmq.broker.settings import BrokerSettings

async def main():
    async with EmbeddedBroker() as broker:
        settings = replace(BrokerSettings.from_url(broker.url), connect_timeout=1.0)
        assert settings.protocol == "auto"
        used = []
        async def session(client, protocol):
            used.append(protocol)
            await client.publish("fedmq/v1/x/model", b"hello", qos=1, retain=True)
        async with asyncio.timeout(15):
            await run_connected(settings, session, identifier="fallback", stop=asyncio.Event(),
                                backoff=Backoff(base=0.05, cap=0.1),
                                will=lambda: aiomqtt.Will("fedmq/v1/x/status/fallback", b"gone", qos=1, retain=True))
        print("used", *used)

asyncio.run(main())
"""


def test_auto_protocol_falls_back_to_311_on_amqtt_even_with_a_will() -> None:
    """amqtt drops (does not refuse) an MQTT 5 CONNECT that carries a Will; auto must still get
    through. In a child process: amqtt leaves that dropped connection's transport to the garbage
    collector, which would warn inside whichever test runs next."""
    done = subprocess.run([sys.executable, "-c", FALLBACK_SCRIPT], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["used", "3.1.1"]


@pytest.mark.asyncio
async def test_reconnects_after_broker_restart(require_mosquitto: str, tmp_path: Path) -> None:
    with MosquittoProcess(workdir=tmp_path) as broker:
        settings = BrokerSettings(host=broker.host, port=broker.port, protocol="5")
        sessions: list[str] = []
        lost: list[BaseException] = []

        async def session(client: aiomqtt.Client, protocol: str) -> None:
            sessions.append(protocol)
            if len(sessions) == 1:
                await asyncio.to_thread(broker.kill)
                await asyncio.to_thread(broker.restart)
                async for _ in client.messages:  # raises MqttError: the connection is gone
                    pass

        async with asyncio.timeout(30):
            await run_connected(settings, session, identifier="reconnect", stop=asyncio.Event(),
                                backoff=Backoff(base=0.1, cap=0.5), on_disconnect=lost.append)
        assert sessions == ["5", "5"]
        assert len(lost) == 1 and isinstance(lost[0], aiomqtt.MqttError)
