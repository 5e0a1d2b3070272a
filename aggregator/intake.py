"""Checking one untrusted update against the current model: every refusal has a reason code."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from fedmq.broker.codecs import get_codec
from fedmq.broker.errors import Reason, RejectedMessage
from fedmq.broker.messages import UpdateMessage, decode_message

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
