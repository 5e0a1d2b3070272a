"""The aggregator's side of the ops protocol: answer ``fedmq fleet|model|rounds`` requests.

A request arrives on ``ops/request/{client}``; the answer always goes to
``ops/response/{client}`` for that same client (the broker ACL lets each operator write only its
own request topic, so the topic names the requester). With MQTT 5 the request names that topic as
its ResponseTopic and carries CorrelationData, which the answer echoes; with MQTT 3.1.1 the
client matches answers by the ``request_id`` every answer carries.

A bad request gets an ``ok=false`` answer that names the problem; nothing a client sends raises
out of :meth:`OpsService.handle`. Mutating requests (push, rollback) are answered from a small
cache when QoS 1 delivers them twice, so a re-delivered push never makes two versions.

With the fleet CA configured (``[ops] ca_file``, by default the broker's CA when the aggregator
itself uses a client certificate), a request counts only when it is signed by an operator
certificate of that CA (:mod:`fedmq.broker.operators`), names this fleet, was issued at most
:data:`~fedmq.broker.operators.REQUEST_WINDOW_S` ago and not in the future beyond the clock skew,
and, for a mutating op, was not seen before: a broker that injects or replays requests gets an
``ok=false`` answer and changes nothing.
"""

from __future__ import annotations

import json
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Any

import aiomqtt
import numpy as np
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from fedmq.broker import topics
from fedmq.broker.errors import FedmqError, Reason, RejectedMessage
from fedmq.broker.files import write_atomic
from fedmq.broker.messages import MAX_CLOCK_SKEW_S, DeviceStatus, ModelMessage, OpsRequest, OpsResponse, decode_message
from fedmq.broker.operators import REQUEST_WINDOW_S, OperatorVerifier
from fedmq.broker.wire import MAX_HEADER_BYTES, peek_header

from .registry import RegistryError, VersionRecord

if TYPE_CHECKING:
    from .daemon import Aggregator

log = logging.getLogger(__name__)

#: A request whose deadline passed more than this long ago (by the aggregator's clock) waited in
#: a queue after its client gave up: it is dropped unanswered. Generous, for clock skew.
CLOCK_SKEW_S = 300.0
#: Seconds to wait for the broker's PUBACK of an answer.
RESPONSE_TIMEOUT_S = 30.0
#: How many answers to mutating requests are kept for QoS 1 re-deliveries.
ANSWER_CACHE = 256
#: Rows in one ``model.list`` / ``rounds`` answer, and devices in one ``status`` answer: the
#: answer's header must stay under the frame's header limit.
DEFAULT_ROWS = 100
MAX_ROWS = 1000
MAX_DEVICES = 1000
MUTATING = frozenset({"model.push", "model.rollback"})
OPS = ("status", "model.list", "model.show", "model.get", "model.push", "model.rollback", "rounds")


class OpsRefused(FedmqError, ValueError):
    """A request that cannot be done as asked; the message goes back to the operator."""


def parameter_problems(tensors: Mapping[str, np.ndarray], shapes: Mapping[str, tuple[int, ...]]) -> list[str]:
    """What is wrong with operator-supplied weights for an architecture (empty when they fit)."""
    problems = []
    missing = sorted(set(shapes) - set(tensors))
    extra = sorted(set(tensors) - set(shapes))
    if missing:
        problems.append(f"missing tensors {missing}")
    if extra:
        problems.append(f"unexpected tensors {extra}")
    for name in sorted(set(shapes) & set(tensors)):
        array = tensors[name]
        if tuple(array.shape) != tuple(shapes[name]):
            problems.append(f"{name} has shape {tuple(array.shape)}, the architecture needs {tuple(shapes[name])}")
        elif array.dtype.kind != "f":
            problems.append(f"{name} has dtype {array.dtype}, weights must be floating point")
        elif not np.isfinite(array).all():
            problems.append(f"{name} has NaN or infinity")
    return problems


def describe_record(record: VersionRecord, *, current: int) -> dict[str, Any]:
    return {"version": record.version, "parent": record.parent, "created": record.created, "sha256": record.sha256,
            "size": record.size, "current": record.version == current, "source": _source(record.info),
            "info": record.info}


def _source(info: Mapping[str, Any]) -> str:
    if info.get("initial"):
        return "initial"
    source = info.get("source")
    if source == "rollback":
        return f"rollback of v{info.get('rollback_of')}"
    if source == "push":
        return f"push {info.get('file', '')}".strip()
    return str(source) if source else "round"


def _int_arg(args: Mapping[str, Any], name: str, *, default: int | None = None, lo: int = 1, hi: int = 2**53) -> int:
    value = args.get(name, default)
    if value is None:
        raise OpsRefused(f"argument {name!r} is required")
    if type(value) is not int or not lo <= value <= hi:
        raise OpsRefused(f"argument {name!r} must be an integer from {lo} to {hi}, got {value!r}")
    return value


class OpsService:
    """Answers ops requests for one :class:`~.daemon.Aggregator` (``OpsService(aggregator)``)."""

    def __init__(self, aggregator: Aggregator) -> None:
        self.aggregator = aggregator
        self.fleet = aggregator.config.fleet
        shapes = aggregator.config.arch.param_shapes()
        # a push carries the weights as float64 at most, plus the header
        self.max_request_bytes = 8 * sum(int(np.prod(s)) for s in shapes.values()) + MAX_HEADER_BYTES + 4096
        #: device -> (state, unix time of the last change seen, or None when only a retained copy was seen)
        self.presence: dict[str, tuple[str, float | None]] = {}
        self._answers: OrderedDict[tuple[str, str], bytes] = OrderedDict()
        auth = aggregator.config.ops_auth
        self.verifier = OperatorVerifier.from_files(auth.ca_file, auth.crl_file) if auth.ca_file else None
        #: signed mutating requests seen: (operator, request id) -> issued_at, kept for the freshness
        #: window, on disk too (a restart within the window must not make a replay count again)
        self._seen_path = aggregator.config.state_dir / "ops_seen.json"
        self._seen: OrderedDict[tuple[str, str], float] = OrderedDict(self._load_seen())
        self._ops: dict[str, Callable[[aiomqtt.Client, OpsRequest], Awaitable[tuple[dict[str, Any], dict[str, np.ndarray]]]]] = {
            "status": self._status, "model.list": self._model_list, "model.show": self._model_show,
            "model.get": self._model_get, "model.push": self._model_push, "model.rollback": self._model_rollback,
            "rounds": self._rounds,
        }

    # -- presence (the aggregator may subscribe to device statuses for "offline since") ---------

    def observe_status(self, device: str, payload: Any, *, retained: bool) -> None:
        """Remember when ``device`` went online or offline (only changes seen live have a time)."""
        if not isinstance(payload, bytes | bytearray) or not payload:
            self.presence.pop(device, None)  # an empty payload clears a retained status: gone
            return
        try:
            status: DeviceStatus = decode_message(payload, max_bytes=self.aggregator.config.limits.max_status_bytes,
                                                  expect=DeviceStatus)
        except RejectedMessage as exc:
            log.debug("unreadable status of %s: %s", device, exc)
            return
        if device not in self.presence and len(self.presence) >= MAX_DEVICES * 100:
            return
        previous = self.presence.get(device)
        if previous is not None and previous[0] == status.state:
            return
        if retained:
            changed: float | None = status.since if status.state == "online" and status.since else None
        else:
            changed = time.time()
        self.presence[device] = (status.state, changed)

    # -- the request loop's entry point ----------------------------------------------------------

    async def handle(self, client: aiomqtt.Client, message: aiomqtt.Message) -> None:
        """Decode one request, do it, publish the answer. Never raises (except cancellation)."""
        try:
            await self._handle(client, message)
        except aiomqtt.MqttError as exc:
            log.warning("could not answer the ops request on %s: %s", message.topic, exc)
        except Exception:  # a bug must cost one answer, not the daemon
            log.exception("ops request on %s failed", message.topic)

    async def _handle(self, client: aiomqtt.Client, message: aiomqtt.Message) -> None:
        try:
            parsed = topics.parse_topic(str(message.topic))
        except topics.TopicError:
            parsed = None
        if parsed is None or parsed.kind != "ops_request" or parsed.fleet != self.fleet or parsed.device is None:
            log.warning("ignoring ops message on unexpected topic %s", message.topic)
            return
        requester = parsed.device
        reply_topic = topics.ops_response_topic(self.fleet, requester)
        props = message.properties
        correlation = getattr(props, "CorrelationData", None) if props is not None else None
        asked_topic = getattr(props, "ResponseTopic", None) if props is not None else None
        payload = message.payload if isinstance(message.payload, bytes | bytearray) else b""
        try:
            request: OpsRequest = decode_message(payload, max_bytes=self.max_request_bytes, expect=OpsRequest)
        except RejectedMessage as exc:
            self.aggregator.counters["ops_rejected"] += 1
            log.warning("rejected ops request from %s: %s", requester, exc)
            response = OpsResponse(_salvage_request_id(payload), False, error=f"bad request: {exc}")
            await self._publish(client, reply_topic, response.encode(), correlation)
            return
        if asked_topic is not None and asked_topic != reply_topic:
            error = f"response topic must be {reply_topic} (the requester's own), got {asked_topic!r}"
        elif request.reply_to != requester:
            error = f"reply_to {request.reply_to!r} must be the client id of the request topic ({requester!r})"
        else:
            error = ""
        if error:
            self.aggregator.counters["ops_rejected"] += 1
            await self._publish(client, reply_topic, OpsResponse(request.request_id, False, error=error).encode(),
                                correlation)
            return
        operator = ""
        if self.verifier is not None:
            try:
                operator = self._authenticate(request, time.time())
            except RejectedMessage as exc:
                self.aggregator.counters["ops_unauthenticated"] += 1
                log.warning("refused ops request %s (%s) from %s: %s", request.request_id, request.op, requester, exc)
                await self._publish(client, reply_topic,
                                    OpsResponse(request.request_id, False, error=f"not authenticated: {exc}").encode(),
                                    correlation)
                return
        if request.deadline and time.time() > request.deadline + CLOCK_SKEW_S:
            self.aggregator.counters["ops_expired"] += 1
            log.warning("dropping ops request %s (%s) from %s: its client gave up on it long ago", request.request_id,
                        request.op, requester)
            return
        key = (requester, request.request_id)
        cached = self._answers.get(key)
        if cached is None and operator and request.op in MUTATING and (operator, request.request_id) in self._seen:
            self.aggregator.counters["ops_replayed"] += 1
            log.warning("refused ops request %s (%s) from %s: replayed", request.request_id, request.op, requester)
            error = f"not authenticated: replayed: request {request.request_id} of {operator} was already done"
            await self._publish(client, reply_topic, OpsResponse(request.request_id, False, error=error).encode(),
                                correlation)
            return
        if cached is None:
            if operator and request.op in MUTATING:
                try:
                    self._remember(operator, request)
                except OSError as exc:
                    log.error("cannot record ops request %s of %s (%s); not done", request.request_id, operator, exc)
                    error = f"the aggregator cannot record the request on disk ({exc}); it was not done, send it again"
                    await self._publish(client, reply_topic, OpsResponse(request.request_id, False, error=error).encode(),
                                        correlation)
                    return
            encoded = await self._answer(client, requester, request, operator)
            if request.op in MUTATING:
                self._answers[key] = encoded
                while len(self._answers) > ANSWER_CACHE:
                    self._answers.popitem(last=False)
        else:
            log.info("ops request %s from %s delivered again; sending the same answer", request.request_id, requester)
            encoded = cached
        await self._publish(client, reply_topic, encoded, correlation)

    def _authenticate(self, request: OpsRequest, now: float) -> str:
        """The operator who signed ``request``, or ``RejectedMessage`` saying why it does not count."""
        assert self.verifier is not None
        operator = self.verifier.verify(request.signed_by, now=now)
        if request.fleet != self.fleet:
            raise RejectedMessage(Reason.UNAUTHENTICATED, f"the request is signed for fleet {request.fleet!r}, not {self.fleet!r}")
        if request.issued_at > now + MAX_CLOCK_SKEW_S:
            raise RejectedMessage(Reason.REPLAYED, f"issued_at {request.issued_at:.0f} is {request.issued_at - now:.0f} s "
                                  "in the future (check the operator's clock)")
        if request.issued_at < now - REQUEST_WINDOW_S:
            raise RejectedMessage(Reason.REPLAYED, f"issued {now - request.issued_at:.0f} s ago; requests older than "
                                  f"{REQUEST_WINDOW_S:g} s are refused (a replay, or a clock far behind)")
        return operator

    def _load_seen(self) -> list[tuple[tuple[str, str], float]]:
        try:
            rows = json.loads(self._seen_path.read_text())
            return [((str(operator), str(request_id)), float(at)) for operator, request_id, at in rows]
        except FileNotFoundError:
            return []
        except (OSError, ValueError, TypeError) as exc:
            # refusing every request until the window passes would lock operators out; say so instead
            log.warning("ignoring unreadable %s (%s): signed requests of the last %g s could be replayed once",
                        self._seen_path, exc, REQUEST_WINDOW_S)
            return []

    def _remember(self, operator: str, request: OpsRequest) -> None:
        """Remember a signed mutating request before doing it: on disk first (``OSError`` when
        that fails, and then it is not remembered either, so that a re-send can still be done)."""
        seen = OrderedDict(self._seen)
        seen[(operator, request.request_id)] = request.issued_at
        oldest = time.time() - REQUEST_WINDOW_S - MAX_CLOCK_SKEW_S
        while seen and (next(iter(seen.values())) < oldest or len(seen) > 10_000):
            seen.popitem(last=False)
        write_atomic(self._seen_path, json.dumps([[op, rid, at] for (op, rid), at in seen.items()]).encode())
        self._seen = seen

    async def _answer(self, client: aiomqtt.Client, requester: str, request: OpsRequest, operator: str = "") -> bytes:
        self.aggregator.counters["ops_requests"] += 1
        handler = self._ops.get(request.op)
        try:
            if handler is None:
                raise OpsRefused(f"unknown op {request.op!r}; this aggregator knows {list(OPS)}")
            result, tensors = await handler(client, request if not operator else _signed_as(request, operator))
            response = OpsResponse(request.request_id, True, result, tensors=tensors)
        except (OpsRefused, RegistryError, RejectedMessage) as exc:
            response = OpsResponse(request.request_id, False, error=str(exc))
        except ValueError as exc:  # replace_model's checks of the weights
            response = OpsResponse(request.request_id, False, error=str(exc))
        except Exception as exc:
            log.exception("ops %s from %s failed", request.op, requester)
            response = OpsResponse(request.request_id, False, error=f"internal error in the aggregator: {exc!r}"[:500])
        encoded = response.encode()
        if not response.tensors and len(encoded) > MAX_HEADER_BYTES:
            response = OpsResponse(request.request_id, False,
                                   error=f"the answer to {request.op} is too large ({len(encoded)} bytes); ask for fewer rows")
            encoded = response.encode()
        if response.ok:
            log.info("ops %s from %s done", request.op, requester)
        else:
            self.aggregator.counters["ops_failed"] += 1
            log.warning("ops %s from %s refused: %s", request.op, requester, response.error)
        return encoded

    async def _publish(self, client: aiomqtt.Client, topic: str, payload: bytes, correlation: bytes | None) -> None:
        properties = None
        if correlation is not None:  # only an MQTT 5 request has properties
            properties = Properties(PacketTypes.PUBLISH)
            properties.CorrelationData = correlation
        await client.publish(topic, payload, qos=1, properties=properties, timeout=RESPONSE_TIMEOUT_S)

    # -- the ops ---------------------------------------------------------------------------------

    def _record(self, args: Mapping[str, Any]) -> VersionRecord:
        version = _int_arg(args, "version")
        record = self.aggregator.registry.get(version)
        if record is None:
            latest = self.aggregator.registry.latest()
            have = f"versions 1 to {latest.version}" if latest else "no versions"
            raise OpsRefused(f"no model version {version} in the registry (it has {have})")
        return record

    async def _status(self, client: aiomqtt.Client, request: OpsRequest) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        agg = self.aggregator
        status = agg.status()
        names = sorted(set(agg.device_stats) | set(self.presence))
        devices: dict[str, dict[str, Any]] = {}
        for name in names[:MAX_DEVICES]:
            stats = agg.device_stats.get(name)
            entry: dict[str, Any] = {}
            if stats is not None:
                entry.update(accepted=int(stats["accepted"]), rejected=int(stats["rejected"]),
                             last_update=float(stats["last_update"]))
            if name in self.presence:
                entry["state"], entry["changed_at"] = self.presence[name]
            devices[name] = entry
        model = agg.model
        result = {
            "fleet": self.fleet, "now": time.time(),
            "aggregator": {"state": status.state, "model_version": status.model_version, "mode": status.mode,
                           "software": status.software, "since": status.since, "counters": dict(status.counters),
                           "client_id": agg.config.client_id},
            "model": {"version": model.version, "parent": model.parent, "created": model.created,
                      "arch": list(model.arch.widths)},
            "devices": devices, "devices_total": len(names),
        }
        return result, {}

    async def _model_list(self, client: aiomqtt.Client, request: OpsRequest) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        limit = _int_arg(request.args, "limit", default=DEFAULT_ROWS, hi=MAX_ROWS)
        records = self.aggregator.registry.versions()
        current = self.aggregator.model.version
        rows = []
        for r in records[-limit:]:
            row = describe_record(r, current=current)
            del row["info"]
            rows.append(row)
        return {"versions": rows, "total": len(records)}, {}

    async def _model_show(self, client: aiomqtt.Client, request: OpsRequest) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        record = self._record(request.args)
        payload = self.aggregator.registry.load_payload(record)
        model: ModelMessage = decode_message(payload, max_bytes=len(payload) + 1, expect=ModelMessage)
        tensors = {name: {"shape": list(array.shape), "dtype": str(array.dtype),
                          "norm": float(np.linalg.norm(array.astype(np.float64)))}
                   for name, array in model.params.items()}
        result = describe_record(record, current=self.aggregator.model.version)
        result.update(arch=list(model.arch.widths), task=model.task.to_wire(), tensors=tensors,
                      backbone=model.backbone.sha256 if model.backbone else None,
                      signed_by=model.signed_by[2].get("key") if model.signed_by else None,
                      num_params=model.arch.num_params())
        return result, {}

    async def _model_get(self, client: aiomqtt.Client, request: OpsRequest) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        record = self._record(request.args)
        payload = self.aggregator.registry.load_payload(record)
        return ({"version": record.version, "sha256": record.sha256, "size": record.size},
                {"payload": np.frombuffer(payload, dtype=np.uint8)})

    async def _model_push(self, client: aiomqtt.Client, request: OpsRequest) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        shapes = self.aggregator.config.arch.param_shapes()
        problems = parameter_problems(request.tensors, shapes)
        if problems:
            raise OpsRefused(f"the pushed weights do not fit the fleet's architecture "
                             f"{list(self.aggregator.config.arch.widths)}: " + "; ".join(problems))
        file = request.args.get("file")
        info: dict[str, Any] = {"source": "push", "pushed_by": request.reply_to}
        if isinstance(file, str) and file:
            info["file"] = file
        params = {name: np.asarray(request.tensors[name], dtype=np.float32) for name in shapes}
        record = await self.aggregator.replace_model(client, params, info)
        return {"version": record.version, "parent": record.parent, "sha256": record.sha256}, {}

    async def _model_rollback(self, client: aiomqtt.Client, request: OpsRequest) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        source = self._record(request.args)
        payload = self.aggregator.registry.load_payload(source)
        model: ModelMessage = decode_message(payload, max_bytes=len(payload) + 1, expect=ModelMessage)
        params = {name: np.array(array, dtype=np.float32) for name, array in model.params.items()}
        record = await self.aggregator.replace_model(
            client, params, {"source": "rollback", "rollback_of": source.version, "requested_by": request.reply_to})
        return {"version": record.version, "parent": record.parent, "rollback_of": source.version,
                "sha256": record.sha256}, {}

    async def _rounds(self, client: aiomqtt.Client, request: OpsRequest) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        limit = _int_arg(request.args, "limit", default=DEFAULT_ROWS, hi=MAX_ROWS)
        records = self.aggregator.registry.versions()
        current = self.aggregator.model.version
        return {"rounds": [describe_record(r, current=current) for r in records[-limit:]], "total": len(records)}, {}


def _salvage_request_id(payload: bytes | bytearray) -> str:
    """The request id of a request that failed its checks, so a 3.1.1 client can match the refusal."""
    header = peek_header(payload)
    value = header.get("request_id") if header is not None else None
    if isinstance(value, str) and 0 < len(value) <= 64 and all(c.isalnum() or c in "_.:-" for c in value):
        return value
    return "unknown"


def _signed_as(request: OpsRequest, operator: str) -> OpsRequest:
    """``request`` with ``reply_to`` replaced by the operator who signed it, for the registry's
    ``pushed_by`` / ``requested_by`` (the authenticated name, not the one the topic claims)."""
    return OpsRequest(request.request_id, request.op, operator, request.args, request.deadline, request.tensors,
                      request.issued_at, request.fleet, request.signed_by)
