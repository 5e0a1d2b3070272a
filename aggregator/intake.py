"""Checking one untrusted update against the current model: every refusal has a reason code."""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Mapping

import numpy as np

from fedmq.broker.codecs import get_codec
from fedmq.broker.errors import Reason, RejectedMessage
from fedmq.broker.messages import _UPDATE_ID, UpdateMessage, decode_message
from fedmq.broker.wire import peek_header

from .strategy import MAX_DELTA_NORM, value_refusal


def decode_update(payload: bytes, *, max_bytes: int) -> UpdateMessage:
    """Decode an update's frame and fields (no model state needed)."""
    return decode_message(payload, max_bytes=max_bytes, expect=UpdateMessage)


def check_update(update: UpdateMessage, *, topic_device: str, shapes: Mapping[str, tuple[int, ...]],
                 codec: str, check_values: bool = True) -> dict[str, np.ndarray]:
    """Check a decoded update received on ``topic_device``'s update topic against the model.

    Returns its delta as float32 arrays of the model's shapes (views into the payload where the
    codec allows). Version and duplicate checks are the round's business. ``check_values=False``
    skips the pass over the values (finite, norm) for an accumulator that checks them itself while
    it folds (:attr:`.strategy.WeightedMean.checks_values`).
    """
    if update.device != topic_device:
        raise RejectedMessage(Reason.DEVICE_MISMATCH, f"payload names device {update.device!r} but was published on {topic_device!r}'s topic")
    if update.codec != codec:
        raise RejectedMessage(Reason.CODEC, f"update uses codec {update.codec!r}; the task asks for {codec!r}")
    delta = get_codec(update.codec).decode(update.tensors, shapes)
    if not check_values:
        return delta
    with np.errstate(over="ignore", invalid="ignore"):  # one BLAS pass per tensor; NaN/inf propagate
        squared = sum(float(np.dot(array.reshape(-1), array.reshape(-1))) for array in delta.values())
    if not squared <= MAX_DELTA_NORM ** 2:
        raise value_refusal(delta)
    return delta


def salvage_update_id(payload: bytes | bytearray | memoryview) -> str:
    """The ``update_id`` of an update refused before its fields were read (too large, a bad
    field), so that its receipt names it and the device can drop it; "" when there is none."""
    header = peek_header(payload)
    value = header.get("update_id") if header is not None else None
    return value if isinstance(value, str) and _UPDATE_ID.fullmatch(value) else ""


class DeviceRateLimit:
    """A token bucket per device: ``burst`` updates at once, refilled at ``per_second`` (sans-IO:
    the caller passes a monotonic ``now``). Checked before an update is decoded, so a flood from
    one device costs a dictionary lookup and a read of the header (for the receipt's update id)
    per update, not a decode, the checks and a journal write."""

    def __init__(self, per_second: float, burst: int, *, max_devices: int = 100_000) -> None:
        self.per_second = per_second
        self.burst = burst
        self.max_devices = max_devices
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()  # device -> (tokens, at)

    def take(self, device: str, now: float) -> float:
        """Take one token for ``device``; return 0.0, or the seconds until one is available."""
        if self.per_second <= 0:
            return 0.0
        tokens, at = self._buckets.pop(device, (float(self.burst), now))
        tokens = min(float(self.burst), tokens + (now - at) * self.per_second)
        if tokens >= 1.0:
            wait, tokens = 0.0, tokens - 1.0
        else:
            wait = (1.0 - tokens) / self.per_second
        self._buckets[device] = (tokens, now)  # most recently used last
        while len(self._buckets) > self.max_devices:
            self._buckets.popitem(last=False)
        return wait if wait > 0 else 0.0


def retry_after(wait: float) -> float:
    """A receipt's retry_after_s for a wait: rounded up to 10 ms, at least 10 ms."""
    return max(0.01, math.ceil(wait * 100) / 100)
