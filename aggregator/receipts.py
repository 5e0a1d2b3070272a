"""Receipts go out through paho directly, tracked by their message info instead of a task each.

A receipt is a QoS 1 PUBLISH that nobody awaits on its own: the aggregator needs to know only
that at most a bounded number wait for their PUBACK, and that none waits too long (a broker that
does not acknowledge within the timeout is gone, and the session must end). aiomqtt's
``publish()`` costs an ``asyncio.Event``, a ``wait_for`` task, a pending-call entry and, in the
aggregator, one task more per message: 125 us of CPU per receipt on the benchmark machine, against
79 us for paho's own PUBLISH and PUBACK handling (``bench/PERFORMANCE.md``). For small updates
that difference is a tenth of the aggregator's time per update.

This reaches into ``aiomqtt.Client._client`` (the paho client) and chains its ``on_publish``
callback, as :mod:`fedmq.broker.zerocopy` does for the reading side; the tests run it against a
real Mosquitto, including one that stops acknowledging.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque

import aiomqtt
import paho.mqtt.client as paho


class ReceiptSender:
    """QoS 1 publishes of one aiomqtt connection, each followed until the broker acknowledges it.

    Use :meth:`send` from the event loop thread. :meth:`room` waits until at most ``limit`` are
    unacknowledged; :meth:`check` and :meth:`room` raise :class:`aiomqtt.MqttError` once one has
    waited ``timeout`` seconds. :meth:`close` (always call it) gives paho its callback back.
    """

    def __init__(self, client: aiomqtt.Client, *, limit: int, timeout: float) -> None:
        self.limit = limit
        self.timeout = timeout
        self._paho: paho.Client = client._client
        self._waiting: deque[tuple[paho.MQTTMessageInfo, float]] = deque()  # in publish order
        self._acked = asyncio.Event()
        self._on_publish = self._paho.on_publish  # aiomqtt's: it resolves its own publishes

        def on_publish(*args: object) -> None:
            self._on_publish(*args)  # type: ignore[misc]
            self._acked.set()

        self._paho.on_publish = on_publish

    def send(self, topic: str, payload: bytes) -> None:
        """Queue a QoS 1 PUBLISH in paho (in call order with everything else published)."""
        info = self._paho.publish(topic, payload, qos=1)
        if info.rc != paho.MQTT_ERR_SUCCESS:
            raise aiomqtt.MqttCodeError(info.rc, "Could not publish a receipt")
        self._waiting.append((info, time.monotonic()))

    def unacknowledged(self) -> int:
        """Receipts still waiting for their PUBACK."""
        self._forget_acknowledged()
        return sum(1 for info, _ in self._waiting if not info.is_published())

    def _forget_acknowledged(self) -> None:
        waiting = self._waiting
        while waiting and waiting[0][0].is_published():
            waiting.popleft()

    def _overdue(self) -> float:
        """Seconds until the oldest unacknowledged receipt times out (<= 0: it has)."""
        self._forget_acknowledged()
        return self._waiting[0][1] + self.timeout - time.monotonic() if self._waiting else self.timeout

    def check(self) -> None:
        """Raise :class:`aiomqtt.MqttError` if a receipt has waited ``timeout`` seconds."""
        if self._overdue() <= 0:
            raise aiomqtt.MqttError(f"a receipt got no PUBACK within {self.timeout:g} s")

    async def room(self) -> None:
        """Wait until at most ``limit`` receipts are unacknowledged."""
        while True:
            self.check()
            if self.unacknowledged() <= self.limit:
                return
            self._acked.clear()
            try:
                async with asyncio.timeout(max(self._overdue(), 0.001)):
                    await self._acked.wait()
            except TimeoutError:
                pass  # check() says which

    async def settle(self, wait: float) -> int:
        """Wait up to ``wait`` seconds (and no receipt beyond its timeout) for the PUBACKs of the
        receipts sent; return how many got none."""
        deadline = time.monotonic() + wait
        while self.unacknowledged():
            left = min(deadline - time.monotonic(), self._overdue())
            if left <= 0:
                break
            self._acked.clear()
            try:
                async with asyncio.timeout(left):
                    await self._acked.wait()
            except TimeoutError:
                pass
        return self.unacknowledged()

    def close(self) -> None:
        self._paho.on_publish = self._on_publish
