"""The exception root of fedmq and the reason codes carried by every rejection."""

from __future__ import annotations

from enum import StrEnum


class FedmqError(Exception):
    """Root of every error fedmq raises on purpose."""


class ConfigError(FedmqError, ValueError):
    """A configuration value is missing, unknown or invalid.

    ``key`` is the dotted key (``rounds.min_updates``) and ``source`` the file or environment
    variable it came from, so the message can say exactly what to fix.
    """

    def __init__(self, message: str, *, key: str | None = None, source: str | None = None) -> None:
        self.key = key
        self.source = source
        where = ""
        if key and source:
            where = f"{source}: {key}: "
        elif key:
            where = f"{key}: "
        elif source:
            where = f"{source}: "
        super().__init__(f"{where}{message}")


class Reason(StrEnum):
    """Why a message was rejected. The values are part of the protocol (docs/protocol.md)."""

    OVERSIZE = "oversize"                # payload larger than the receiver's cap, not decoded
    MALFORMED = "malformed"              # not a fedmq frame: bad msgpack, truncated, trailing bytes
    SCHEMA = "schema"                    # unsupported schema version
    KIND = "kind"                        # wrong or unknown message kind for this topic
    FIELD = "field"                      # a field is missing, of the wrong type or out of range
    DEVICE_MISMATCH = "device_mismatch"  # device named in the payload is not the topic's device
    CODEC = "codec"                      # unknown delta codec, or not the one the task asks for
    DTYPE = "dtype"                      # tensor dtype unknown or not allowed here
    TENSORS = "tensors"                  # tensor names missing or unexpected
    SHAPE = "shape"                      # tensor shape does not match the model
    NON_FINITE = "non_finite"            # NaN or infinity in a tensor or metric
    STALE = "stale"                      # computed from a model version the aggregator no longer takes
    FUTURE = "future"                    # computed from a version the aggregator has not published
    DUPLICATE = "duplicate"              # this (device, update id) was already accepted
    REPEAT = "repeat"                    # the device already has an accepted update in this sync round
    VERSION = "version"                  # a model that is not newer than the installed one
    NORM = "norm"                        # the update's L2 norm is over the aggregator's bound (reject mode)
    SIGNATURE = "signature"              # a model that is unsigned, signed by an untrusted key, or tampered
    ROLE = "role"                        # a signed message used outside its role (a canary candidate as a release)
    FROZEN = "frozen"                    # an operator froze the device on an older version
    RATE_LIMITED = "rate_limited"        # the device sends updates faster than the aggregator's limit (transient)
    UNAUTHENTICATED = "unauthenticated"  # an ops request or command without a valid operator signature
    REPLAYED = "replayed"                # a signed request or command seen before, or outside its freshness window
    INTERNAL = "internal"                # the receiver failed on a valid-looking message (a bug: see its log)


#: Reasons that say "not now": the sender keeps the message and sends it again later. Every other
#: rejection is final for that message (a device drops the update from its outbox).
TRANSIENT_REASONS = frozenset({Reason.RATE_LIMITED})


class RejectedMessage(FedmqError, ValueError):
    """An untrusted message was refused. ``reason`` is machine readable, ``detail`` human."""

    def __init__(self, reason: Reason, detail: str) -> None:
        self.reason = reason
        self.detail = detail
        super().__init__(f"{reason.value}: {detail}")
