"""The ops client: what ``fedmq fleet|model|rounds`` does over MQTT, from any machine that reaches
the broker.

:class:`OpsClient` is an async context manager holding one connection. Requests to the aggregator
use MQTT 5 request/response (ResponseTopic + CorrelationData) when the connection is MQTT 5, and
the topic pair ``ops/request/{me}`` -> ``ops/response/{me}`` with the request id in the payload
over MQTT 3.1.1. Every request has a timeout; no answer raises :class:`NoAggregator`.
The fleet's presence (``status/+``, the aggregator's status) is read from retained messages, so
``fleet_status()`` still works, with a warning, when no aggregator answers.
"""

from __future__ import annotations

import asyncio
import contextlib
import getpass
import logging
import math
import re
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import aiomqtt
import numpy as np
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from fedmq.broker import topics
from fedmq.broker.errors import FedmqError, RejectedMessage
from fedmq.broker.messages import (
    AggregatorStatus,
    Command,
    DeviceStatus,
    OpsRequest,
    OpsResponse,
    decode_message,
)
from fedmq.broker.operators import OperatorSigner
from fedmq.broker.settings import BrokerSettings, is_protocol_refusal

log = logging.getLogger(__name__)

#: Largest answer accepted (a model payload travels in one): MQTT's own packet limit.
MAX_RESPONSE_BYTES = 256 * 1024 * 1024
MAX_STATUS_BYTES = 64 * 1024


class OpsError(FedmqError):
    """An ops command failed: the broker is unreachable, or the aggregator refused the request."""


class NoAggregator(OpsError):
    """No aggregator answered within the timeout."""


def default_client_id() -> str:
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = "user"
    user = re.sub(r"[^A-Za-z0-9_.-]", "-", user)[:32] or "user"
    return f"ops-{user}-{uuid.uuid4().hex[:6]}"


@dataclass(slots=True)
class DeviceRow:
    """One device as ``fedmq fleet status`` shows it."""

    device: str
    state: str = "unknown"
    since: float | None = None          # when it went online/offline, when known
    model_version: int = 0
    last_update: float | None = None    # last update the aggregator took from it
    accepted: int | None = None
    rejected: int | None = None
    backend: str = ""
    platform: str = ""
    paused: bool = False
    frozen: int = 0                     # an operator froze the device at this version (0 = not)
    detail: str = ""
    counters_from: str = ""             # "aggregator" or "device" (its own counters, when no aggregator answered)

    def to_json(self) -> dict[str, Any]:
        return {"device": self.device, "state": self.state, "since": self.since, "model_version": self.model_version,
                "last_update": self.last_update, "accepted": self.accepted, "rejected": self.rejected,
                "backend": self.backend, "platform": self.platform, "paused": self.paused, "frozen": self.frozen,
                "detail": self.detail,
                "counters_from": self.counters_from}


@dataclass(slots=True)
class FleetStatus:
    fleet: str
    devices: list[DeviceRow]
    aggregator: dict[str, Any] | None = None   # the aggregator's answer (None when none answered)
    aggregator_status: AggregatorStatus | None = None  # its retained presence
    warning: str = ""
    taken_at: float = field(default_factory=time.time)

    def to_json(self) -> dict[str, Any]:
        retained = self.aggregator_status
        return {
            "fleet": self.fleet, "taken_at": self.taken_at, "warning": self.warning or None,
            "aggregator": self.aggregator,
            "aggregator_presence": None if retained is None else {
                "state": retained.state, "model_version": retained.model_version, "since": retained.since},
            "devices": [d.to_json() for d in self.devices],
        }


class OpsClient:
    """``async with OpsClient(settings, fleet, client_id, timeout) as ops: await ops.request(...)``."""

    def __init__(self, settings: BrokerSettings, fleet: str, client_id: str | None = None, timeout: float = 10.0,
                 signer: OperatorSigner | None = None) -> None:
        self.settings = settings
        self.fleet = topics.check_name(fleet, "fleet")
        self.client_id = topics.check_name(client_id or default_client_id(), "ops client id")
        if not (math.isfinite(timeout) and timeout > 0):
            raise OpsError(f"timeout must be a positive number of seconds, got {timeout}")
        self.timeout = timeout
        #: the operator identity that signs every request and command (None: unsigned, for a
        #: broker without client certificates, whose aggregator and devices take unsigned ones)
        self.signer = signer
        self.protocol = ""
        self.statuses: dict[str, DeviceStatus] = {}
        self.changed_at: dict[str, float] = {}     # device -> when this client saw its state change live
        self.aggregator_status: AggregatorStatus | None = None
        self._client: aiomqtt.Client | None = None
        self._reader: asyncio.Task[None] | None = None
        self._pending: dict[str, asyncio.Future[OpsResponse]] = {}
        self._watching = False
        self._retained: dict[str, asyncio.Future[bytes]] = {}
        self._response_topic = topics.ops_response_topic(self.fleet, self.client_id)

    # -- connection --------------------------------------------------------------------------

    async def __aenter__(self) -> OpsClient:
        versions = ["5", "3.1.1"] if self.settings.protocol == "auto" else [self.settings.protocol]
        for version in versions:
            client = self.settings.client(identifier=self.client_id, protocol=version)  # type: ignore[arg-type]
            try:
                await client.__aenter__()
            except aiomqtt.MqttError as exc:
                if version == "5" and len(versions) > 1 and is_protocol_refusal(exc):
                    continue
                raise OpsError(f"cannot connect to the broker {self.settings.url} as {self.client_id}: {exc}") from None
            except OSError as exc:
                raise OpsError(f"cannot connect to the broker {self.settings.url}: {exc}") from None
            self._client, self.protocol = client, version
            break
        assert self._client is not None
        try:
            await self._client.subscribe(self._response_topic, qos=1)
        except aiomqtt.MqttError as exc:
            await self.__aexit__(None, None, None)
            raise OpsError(f"cannot subscribe to {self._response_topic}: {exc}") from None
        self._reader = asyncio.create_task(self._read(), name="ops-reader")
        return self

    async def __aexit__(self, *exc_info: Any) -> None:
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, aiomqtt.MqttError):
                await self._reader
        if self._client is not None:
            with contextlib.suppress(aiomqtt.MqttError):
                await self._client.__aexit__(None, None, None)
        self._client = None

    @property
    def client(self) -> aiomqtt.Client:
        if self._client is None:
            raise OpsError("the ops client is not connected (use it as `async with OpsClient(...)`)")
        return self._client

    async def _read(self) -> None:
        status_filter = topics.statuses_filter(self.fleet)
        aggregator_topic = topics.aggregator_status_topic(self.fleet)
        try:
            async for message in self.client.messages:
                payload = message.payload if isinstance(message.payload, bytes | bytearray) else b""
                if message.topic.matches(self._response_topic):
                    self._on_response(message, payload)
                elif message.topic.matches(status_filter):
                    self._on_status(str(message.topic), payload, retained=message.retain)
                elif message.topic.matches(aggregator_topic):
                    try:
                        self.aggregator_status = decode_message(payload, max_bytes=MAX_STATUS_BYTES, expect=AggregatorStatus)
                    except RejectedMessage as exc:
                        log.warning("unreadable aggregator status: %s", exc)
                elif str(message.topic) in self._retained:
                    waiter = self._retained[str(message.topic)]
                    if not waiter.done():
                        waiter.set_result(bytes(payload))
        except aiomqtt.MqttError as exc:
            error = OpsError(f"lost the connection to the broker {self.settings.url}: {exc}")
            for future in self._pending.values():
                if not future.done():
                    future.set_exception(error)

    def _on_response(self, message: aiomqtt.Message, payload: bytes) -> None:
        try:
            response: OpsResponse = decode_message(payload, max_bytes=MAX_RESPONSE_BYTES, expect=OpsResponse)
        except RejectedMessage as exc:
            log.warning("unreadable answer from the aggregator: %s", exc)
            return
        correlation = getattr(message.properties, "CorrelationData", None) if message.properties is not None else None
        request_id = correlation.decode(errors="replace") if isinstance(correlation, bytes) else response.request_id
        future = self._pending.get(request_id)
        if future is None and response.request_id == "unknown" and len(self._pending) == 1:
            future = next(iter(self._pending.values()))  # a refusal of a request the aggregator could not read
        if future is None:
            log.debug("answer to an unknown request %s (one that timed out?)", request_id)
        elif not future.done():
            future.set_result(response)

    def _on_status(self, topic: str, payload: bytes, *, retained: bool) -> None:
        try:
            device = topics.parse_topic(topic).device
            status: DeviceStatus = decode_message(payload, max_bytes=MAX_STATUS_BYTES, expect=DeviceStatus)
        except (topics.TopicError, RejectedMessage) as exc:
            log.warning("unreadable status on %s: %s", topic, exc)
            return
        if device is None or status.device != device:
            log.warning("status on %s names device %r", topic, status.device)
            return
        previous = self.statuses.get(device)
        if not retained and (previous is None or previous.state != status.state):
            self.changed_at[device] = time.time()
        self.statuses[device] = status

    # -- requests ----------------------------------------------------------------------------

    async def request(self, op: str, args: Mapping[str, Any] | None = None,
                      tensors: Mapping[str, np.ndarray] | None = None) -> OpsResponse:
        """Send one request to the aggregator and return its answer; raise :class:`OpsError` when
        the aggregator refuses it and :class:`NoAggregator` when none answers in time."""
        request_id = uuid.uuid4().hex
        now = time.time()
        request = OpsRequest(request_id, op, self.client_id, dict(args or {}), deadline=now + self.timeout,
                             tensors=dict(tensors or {}), issued_at=now, fleet=self.fleet)
        properties = None
        if self.protocol == "5":
            properties = Properties(PacketTypes.PUBLISH)
            properties.ResponseTopic = self._response_topic
            properties.CorrelationData = request_id.encode()
            # the broker drops a request nobody took in time (e.g. for a disconnected aggregator's session)
            properties.MessageExpiryInterval = max(1, math.ceil(self.timeout))
        future: asyncio.Future[OpsResponse] = asyncio.get_running_loop().create_future()
        self._pending[request_id] = future
        try:
            async with asyncio.timeout(self.timeout):
                await self.client.publish(topics.ops_request_topic(self.fleet, self.client_id),
                                          request.encode(self.signer), qos=1, properties=properties)
                response = await future
        except TimeoutError:
            raise NoAggregator(
                f"no aggregator answered on fleet {self.fleet} within {self.timeout:g} s: is it running and connected "
                f"to this broker ({self.settings.url})? check `fedmq fleet status`"
            ) from None
        except aiomqtt.MqttError as exc:
            raise OpsError(f"cannot send the request to the broker {self.settings.url}: {exc}") from None
        finally:
            self._pending.pop(request_id, None)
        if not response.ok:
            raise OpsError(f"the aggregator refused {op}: {response.error}")
        return response

    # -- fleet presence and commands -----------------------------------------------------------

    async def watch_statuses(self) -> None:
        """Subscribe to the retained device and aggregator statuses (once; they stay current)."""
        if self._watching:
            return
        await self.client.subscribe(topics.statuses_filter(self.fleet), qos=1)
        await self.client.subscribe(topics.aggregator_status_topic(self.fleet), qos=1)
        self._watching = True

    async def fleet_status(self) -> FleetStatus:
        """Every device with a retained status, merged with the aggregator's per-device counters.

        The aggregator's answer also marks the end of the retained statuses (the broker sends them
        before anything published after the subscription); with no aggregator the whole timeout
        has passed, and the table is built from the retained statuses alone, with a warning.
        """
        await self.watch_statuses()
        answer: dict[str, Any] | None = None
        warning = ""
        try:
            answer = dict((await self.request("status")).result)
        except NoAggregator as exc:
            warning = f"{exc}; showing the devices' own status messages only"
        return merge_fleet_status(self.fleet, self.statuses, self.changed_at, answer, self.aggregator_status, warning)

    async def command(self, command: str, device: str | None = None, reason: str = "", version: int = 0) -> Command:
        """Publish a retained pause/resume/freeze/unfreeze for ``device`` (or every device), signed
        by the operator identity when there is one, and return it."""
        topic = topics.command_topic_for(self.fleet, command, device)
        issued_by = self.signer.name if self.signer is not None else self.client_id
        message = Command(command, issued_at=time.time(), issued_by=issued_by, reason=reason,  # type: ignore[arg-type]
                          target=device or "all", fleet=self.fleet, version=version)
        try:
            async with asyncio.timeout(self.timeout):
                await self.client.publish(topic, message.encode(self.signer), qos=1, retain=True)
        except (TimeoutError, aiomqtt.MqttError) as exc:
            raise OpsError(f"cannot publish the {command} command to {topic}: {exc or 'timed out'}") from None
        return message

    async def pause(self, device: str | None = None, reason: str = "") -> Command:
        return await self.command("pause", device, reason)

    async def resume(self, device: str | None = None, reason: str = "") -> Command:
        return await self.command("resume", device, reason)

    async def retained(self, topic: str) -> bytes:
        """The retained message on ``topic`` (raise :class:`OpsError` if none arrives in time).

        Read on this client's own connection: with client ids pinned to the certificate (the
        secure broker), a second connection would take this one's session over.
        """
        future: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self._retained[topic] = future
        try:
            async with asyncio.timeout(self.timeout):
                await self.client.subscribe(topic, qos=1)
                return await future
        except TimeoutError:
            raise OpsError(f"nothing retained on {topic} within {self.timeout:g} s") from None
        except aiomqtt.MqttError as exc:
            raise OpsError(f"cannot read {topic}: {exc}") from None
        finally:
            self._retained.pop(topic, None)
            with contextlib.suppress(aiomqtt.MqttError):
                await self.client.unsubscribe(topic)


def merge_fleet_status(fleet: str, statuses: Mapping[str, DeviceStatus], changed_at: Mapping[str, float],
                       answer: Mapping[str, Any] | None, aggregator_status: AggregatorStatus | None,
                       warning: str = "") -> FleetStatus:
    """One row per device known from a retained status or from the aggregator's counters."""
    stats: Mapping[str, Any] = answer.get("devices", {}) if answer else {}
    rows = []
    for name in sorted(set(statuses) | set(stats)):
        row = DeviceRow(name)
        status = statuses.get(name)
        entry = stats.get(name, {})
        if status is not None:
            row.state, row.model_version, row.backend = status.state, status.model_version, status.backend
            row.platform, row.paused, row.detail = status.platform, status.paused, status.detail
            row.frozen = status.frozen
        elif "state" in entry:
            row.state = entry["state"]
        # when it went online/offline: seen live by this client, else by the aggregator, else
        # (online only) the start time the device reports
        if name in changed_at:
            row.since = changed_at[name]
        elif entry.get("changed_at") and entry.get("state") == row.state:
            row.since = float(entry["changed_at"])
        elif status is not None and status.state == "online" and status.since:
            row.since = status.since
        if "accepted" in entry:
            row.accepted, row.rejected = int(entry["accepted"]), int(entry["rejected"])
            row.last_update = float(entry["last_update"]) or None
            row.counters_from = "aggregator"
        elif status is not None and answer is None:
            row.accepted = int(status.counters.get("accepted", 0))
            row.rejected = int(status.counters.get("rejected", 0))
            row.counters_from = "device"
        elif answer is not None:
            row.accepted, row.rejected, row.counters_from = 0, 0, "aggregator"
        rows.append(row)
    return FleetStatus(fleet, rows, dict(answer["aggregator"]) if answer and "aggregator" in answer else None,
                       aggregator_status, warning)
