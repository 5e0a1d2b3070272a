"""The reconnect loop every fedmq client runs: connect, run a session, back off and retry.

aiomqtt does not reconnect by itself (its context manager *is* the connection), so the daemons
call :func:`run_connected` with a coroutine that uses one live connection until it drops.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import aiomqtt

from .settings import BrokerSettings, is_protocol_refusal

log = logging.getLogger(__name__)


@dataclass(slots=True)
class Backoff:
    """Exponential backoff with full jitter: delay is uniform in [0, min(cap, base * 2**n)]."""

    base: float = 0.5
    cap: float = 30.0
    attempt: int = 0
    rng: random.Random = field(default_factory=random.Random)

    def next_delay(self) -> float:
        ceiling = min(self.cap, self.base * (2 ** min(self.attempt, 30)))
        self.attempt += 1
        # never zero: a broker that refuses at once must not be hammered in a tight loop
        return max(self.base / 4, self.rng.uniform(0, ceiling))

    def reset(self) -> None:
        self.attempt = 0


async def sleep_or_stop(stop: asyncio.Event, seconds: float) -> bool:
    """Sleep up to ``seconds``; return True early if ``stop`` is set."""
    # asyncio.timeout, not wait_for: wait_for in 3.11 can swallow a cancellation
    try:
        async with asyncio.timeout(seconds):
            await stop.wait()
    except TimeoutError:
        return False
    return True


async def cancel_tasks(tasks: Iterable[asyncio.Task[Any]], *, retry_every: float = 0.2) -> None:
    """Cancel ``tasks`` and wait until every one has finished.

    A task is cancelled again if it is still running after ``retry_every`` seconds: on Python 3.11,
    ``asyncio.wait_for`` (which aiomqtt's publish() uses) can swallow a cancellation that arrives
    as the awaited operation completes, and the task would then run on.
    """
    pending = {t for t in tasks if not t.done()}
    while pending:
        for task in pending:
            task.cancel()
        _, pending = await asyncio.wait(pending, timeout=retry_every)


def raise_first_failure(tasks: Iterable[asyncio.Task[Any]]) -> None:
    """Re-raise the first exception among finished ``tasks``, after reading every one of them
    (an exception nobody reads is printed as "Task exception was never retrieved" at exit)."""
    failures = [t.exception() for t in tasks if t.done() and not t.cancelled() and t.exception() is not None]
    for extra in failures[1:]:
        log.debug("also failed: %r", extra)
    if failures:
        raise failures[0]  # type: ignore[misc]


Session = Callable[[aiomqtt.Client, str], Awaitable[None]]


async def run_connected(
    settings: BrokerSettings,
    session: Session,
    *,
    identifier: str,
    stop: asyncio.Event,
    will: Callable[[], aiomqtt.Will | None] = lambda: None,
    persistent_session: bool = False,
    backoff: Backoff | None = None,
    max_queued_incoming: int | None = None,
    on_disconnect: Callable[[BaseException], None] = lambda exc: None,
) -> None:
    """Keep a connection up and run ``session(client, protocol)`` on it until ``stop`` is set.

    The session returns normally when it is done (then this returns too) or raises
    ``aiomqtt.MqttError`` when the connection drops (then this reconnects after a backoff).
    """
    backoff = backoff or Backoff()
    protocol = "3.1.1" if settings.protocol == "3.1.1" else "5"
    negotiated = settings.protocol != "auto"
    while not stop.is_set():
        try:
            client = settings.client(identifier=identifier, will=will(), persistent_session=persistent_session,
                                     protocol=protocol, max_queued_incoming=max_queued_incoming)  # type: ignore[arg-type]
            async with client:
                backoff.reset()
                negotiated = True
                log.info("connected to %s as %s (MQTT %s)", settings.url, identifier, protocol)
                await session(client, protocol)
                return
        except aiomqtt.MqttError as exc:
            if not negotiated:
                if protocol == "5" and is_protocol_refusal(exc):
                    log.info("broker %s refused MQTT 5 (%s); using MQTT 3.1.1", settings.url, exc)
                    protocol = "3.1.1"
                    continue
                # some 3.1.1-only brokers (amqtt) drop an MQTT 5 CONNECT that has a Will without
                # answering: until one version has worked, alternate between them
                protocol = "3.1.1" if protocol == "5" else "5"
            on_disconnect(exc)
            delay = backoff.next_delay()
            log.warning("connection to %s lost or refused (%s); retrying in %.1fs", settings.url, exc, delay)
            if await sleep_or_stop(stop, delay):
                return
