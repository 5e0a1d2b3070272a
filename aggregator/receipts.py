"""Receipts go out through paho directly, tracked by their message info instead of a task each.

A receipt is a QoS 1 PUBLISH that nobody awaits on its own: the aggregator needs to know only
that at most a bounded number wait for their PUBACK, and that none waits too long. "Too long"
means the broker is gone: a receipt has waited ``timeout`` seconds *and nothing at all has come
from the broker for as long*. A PUBACK can sit behind megabytes of queued updates on a slow link
(draining a backlog), and a broker that is sending is not dead; a session torn down for that
would lose the receipts in flight and make devices re-send whole updates. A receipt that waits
``give_up`` seconds ends the session whatever arrives. aiomqtt's
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
from collections import deque

import aiomqtt
import paho.mqtt.client as paho

_clock = paho.time_func  # the clock of paho's _last_bytes_received


class ReceiptSender:
    """QoS 1 publishes of one aiomqtt connection, each followed until the broker acknowledges it.

    Use :meth:`send` from the event loop thread. :meth:`room` waits until at most ``limit`` are
    unacknowledged; :meth:`check` and :meth:`room` raise :class:`aiomqtt.MqttError` once one is
    overdue (see the module docstring). :meth:`close` (always call it) gives paho its callback back.
    """

    def __init__(self, client: aiomqtt.Client, *, limit: int, timeout: float, give_up: float | None = None) -> None:
        self.limit = limit
        self.timeout = timeout
        self.give_up = 10 * timeout if give_up is None else give_up
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
        self._waiting.append((info, _clock()))

    def unacknowledged(self) -> int:
        """Receipts still waiting for their PUBACK."""
        self._forget_acknowledged()
        return sum(1 for info, _ in self._waiting if not info.is_published())

    def _forget_acknowledged(self) -> None:
        waiting = self._waiting
        while waiting and waiting[0][0].is_published():
            waiting.popleft()

    def _overdue(self) -> float:
        """Seconds until the oldest unacknowledged receipt is overdue (<= 0: it is)."""
        self._forget_acknowledged()
        if not self._waiting:
            return self.timeout
        sent = self._waiting[0][1]
        heard = getattr(self._paho, "_last_bytes_received", 0.0)  # any bytes from the broker, by paho's clock
        return min(max(sent, heard) + self.timeout, sent + self.give_up) - _clock()

    def check(self) -> None:
        """Raise :class:`aiomqtt.MqttError` if a receipt is overdue."""
        if self._overdue() <= 0:
            waited = _clock() - self._waiting[0][1]
            if waited >= self.give_up:
                raise aiomqtt.MqttError(f"a receipt got no PUBACK within {self.give_up:g} s")
            raise aiomqtt.MqttError(f"a receipt got no PUBACK within {self.timeout:g} s, "
                                    f"and nothing came from the broker for as long")

    async def watch(self) -> None:
        """Raise :class:`aiomqtt.MqttError` once a receipt is overdue, even if nothing else
        happens (run it as one of the session's tasks: a dead broker sends no new updates
        either)."""
        while True:
            self.check()
            await asyncio.sleep(max(self._overdue(), 0.05))

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
        deadline = _clock() + wait
        while self.unacknowledged():
            left = min(deadline - _clock(), self._overdue())
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
