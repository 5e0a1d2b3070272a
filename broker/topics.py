"""The whole MQTT topic tree of fedmq v1. No other module builds or parses topic strings.

``{device}`` equals the MQTT client id, so broker ACLs can pin it with ``%c``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .errors import FedmqError

PREFIX = "fedmq/v1"

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")

#: Device names with a meaning of their own on the command topics.
RESERVED_DEVICE_NAMES = frozenset({"all"})


class TopicError(FedmqError, ValueError):
    """A fleet or device name cannot be used in a topic, or a topic is not a fedmq topic."""


def check_name(value: str, what: str = "name") -> str:
    """Return ``value`` if it is a valid fleet or device name (1-64 of ``A-Za-z0-9_.-``)."""
    if not isinstance(value, str) or not _NAME.fullmatch(value):
        raise TopicError(
            f"invalid {what} {value!r}: use 1 to 64 characters from A-Z a-z 0-9 _ . -, "
            "starting with a letter or digit"
        )
    return value


def check_device(device: str) -> str:
    check_name(device, "device id")
    if device in RESERVED_DEVICE_NAMES:
        raise TopicError(f"device id {device!r} is reserved; choose another")
    return device


def fleet_prefix(fleet: str) -> str:
    return f"{PREFIX}/{check_name(fleet, 'fleet')}"


def model_topic(fleet: str) -> str:
    """Retained current global model, aggregator -> all."""
    return f"{fleet_prefix(fleet)}/model"


def canary_topic(fleet: str) -> str:
    """Retained candidate model of a staged rollout, aggregator -> the cohort it names (empty when none)."""
    return f"{fleet_prefix(fleet)}/canary"


def update_topic(fleet: str, device: str) -> str:
    """Weight delta from one device, QoS 1, device -> aggregator."""
    return f"{fleet_prefix(fleet)}/update/{check_device(device)}"


def updates_filter(fleet: str) -> str:
    return f"{fleet_prefix(fleet)}/update/+"


def receipt_topic(fleet: str, device: str) -> str:
    """Accepted/rejected receipt for each update, aggregator -> device."""
    return f"{fleet_prefix(fleet)}/receipt/{check_device(device)}"


def status_topic(fleet: str, device: str) -> str:
    """Retained device status; the offline status is the device's Last Will."""
    return f"{fleet_prefix(fleet)}/status/{check_device(device)}"


def statuses_filter(fleet: str) -> str:
    return f"{fleet_prefix(fleet)}/status/+"


def command_topic(fleet: str, device: str) -> str:
    """Operator commands to one device."""
    return f"{fleet_prefix(fleet)}/cmd/{check_device(device)}"


def broadcast_command_topic(fleet: str) -> str:
    """Operator commands to every device."""
    return f"{fleet_prefix(fleet)}/cmd/all"


def freeze_topic(fleet: str, device: str) -> str:
    """Operator freeze/unfreeze for one device: a retained slot of its own beside ``cmd/{device}``,
    so that a freeze never replaces a retained pause (a topic retains one message)."""
    return f"{command_topic(fleet, device)}/freeze"


def broadcast_freeze_topic(fleet: str) -> str:
    """Operator freeze/unfreeze for every device."""
    return f"{broadcast_command_topic(fleet)}/freeze"


def command_topic_for(fleet: str, command: str, device: str | None = None) -> str:
    """Where ``command`` goes: pause/resume on ``cmd/{device|all}``, freeze/unfreeze on ``.../freeze``."""
    if command in ("freeze", "unfreeze"):
        return freeze_topic(fleet, device) if device else broadcast_freeze_topic(fleet)
    return command_topic(fleet, device) if device else broadcast_command_topic(fleet)


def ops_request_topic(fleet: str, client: str) -> str:
    """Request from an ops client to the aggregator (MQTT 3.1.1 fallback of request/response)."""
    return f"{fleet_prefix(fleet)}/ops/request/{check_name(client, 'ops client id')}"


def ops_requests_filter(fleet: str) -> str:
    return f"{fleet_prefix(fleet)}/ops/request/+"


def ops_response_topic(fleet: str, client: str) -> str:
    """Responses from the aggregator to one ops client."""
    return f"{fleet_prefix(fleet)}/ops/response/{check_name(client, 'ops client id')}"


_SHA256 = re.compile(r"[0-9a-f]{64}")


def check_sha256(digest: str) -> str:
    if not isinstance(digest, str) or not _SHA256.fullmatch(digest):
        raise TopicError(f"invalid sha256 {digest!r}: 64 lower-case hex digits")
    return digest


def artifact_topic(fleet: str, sha256: str) -> str:
    """Retained content-addressed artifact (a frozen ONNX backbone), aggregator -> all."""
    return f"{fleet_prefix(fleet)}/artifact/{check_sha256(sha256)}"


def artifacts_filter(fleet: str) -> str:
    return f"{fleet_prefix(fleet)}/artifact/+"


def aggregator_status_topic(fleet: str) -> str:
    """Retained aggregator presence; its offline status is the aggregator's Last Will."""
    return f"{fleet_prefix(fleet)}/aggregator/status"


@dataclass(frozen=True, slots=True)
class ParsedTopic:
    """A fedmq topic taken apart: ``kind`` is ``model``, ``update``, ``receipt``, ``status``,
    ``cmd``, ``freeze``, ``artifact``, ``ops_request``, ``ops_response`` or ``aggregator_status``; ``device``
    is the last level where the topic has one (``all`` for the broadcast command topic, the
    sha256 for an artifact)."""

    fleet: str
    kind: str
    device: str | None = None


_SINGLE = {"model": "model", "canary": "canary"}
_PER_DEVICE = {"update", "receipt", "status", "cmd"}


def parse_topic(topic: str) -> ParsedTopic:
    """Parse a concrete (wildcard-free) fedmq topic; raise :class:`TopicError` if it is not one."""
    parts = topic.split("/")
    if len(parts) < 4 or "/".join(parts[:2]) != PREFIX:
        raise TopicError(f"not a fedmq v1 topic: {topic!r}")
    fleet, rest = parts[2], parts[3:]
    check_name(fleet, "fleet")
    head = rest[0]
    if len(rest) == 1 and head in _SINGLE:
        return ParsedTopic(fleet, _SINGLE[head])
    if len(rest) == 2 and head in _PER_DEVICE:
        device = rest[1]
        if head == "cmd" and device == "all":
            return ParsedTopic(fleet, "cmd", "all")
        check_device(device)
        return ParsedTopic(fleet, head, device)
    if len(rest) == 3 and head == "cmd" and rest[2] == "freeze":
        return ParsedTopic(fleet, "freeze", rest[1] if rest[1] == "all" else check_device(rest[1]))
    if len(rest) == 2 and head == "artifact":
        return ParsedTopic(fleet, "artifact", check_sha256(rest[1]))
    if len(rest) == 2 and rest == ["aggregator", "status"]:
        return ParsedTopic(fleet, "aggregator_status")
    if len(rest) == 3 and head == "ops" and rest[1] in ("request", "response"):
        check_name(rest[2], "ops client id")
        return ParsedTopic(fleet, f"ops_{rest[1]}", rest[2])
    raise TopicError(f"not a fedmq v1 topic: {topic!r}")
