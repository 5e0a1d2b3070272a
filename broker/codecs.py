"""Delta codecs: how a device's weight delta becomes wire tensors and back.

A codec turns named float32 arrays into named wire tensors (``encode``) and checks and turns wire
tensors back into float32 arrays of the model's shapes (``decode``). The update message declares
its codec by name; the aggregator decodes every registered codec. Lossy codecs with device-side
state (error feedback) keep that state outside the codec object.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol

import numpy as np

from .errors import Reason, RejectedMessage


class DeltaCodec(Protocol):
    name: str

    def encode(self, delta: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]: ...

    def decode(
        self, wire: Mapping[str, np.ndarray], shapes: Mapping[str, tuple[int, ...]]
    ) -> dict[str, np.ndarray]: ...


def check_names(wire: Mapping[str, np.ndarray], expected: Mapping[str, object]) -> None:
    """Raise ``tensors`` unless ``wire`` has exactly the expected names."""
    if wire.keys() != expected.keys():
        missing = sorted(set(expected) - set(wire))
        extra = sorted(set(wire) - set(expected))
        raise RejectedMessage(Reason.TENSORS, f"tensor names differ from the model: missing {missing}, unexpected {extra}")


class Float32Codec:
    """Dense float32, lossless: the reference every other codec is measured against."""

    name = "fp32"

    def encode(self, delta: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in delta.items()}

    def decode(self, wire: Mapping[str, np.ndarray], shapes: Mapping[str, tuple[int, ...]]) -> dict[str, np.ndarray]:
        check_names(wire, shapes)
        out: dict[str, np.ndarray] = {}
        for name, shape in shapes.items():
            array = wire[name]
            if array.dtype != np.float32:
                raise RejectedMessage(Reason.DTYPE, f"tensor {name!r} is {array.dtype}, codec fp32 needs float32")
            if array.shape != tuple(shape):
                raise RejectedMessage(Reason.SHAPE, f"tensor {name!r} has shape {array.shape}, the model has {tuple(shape)}")
            out[name] = array
        return out


CODECS: dict[str, DeltaCodec] = {codec.name: codec for codec in (Float32Codec(),)}


def get_codec(name: str) -> DeltaCodec:
    """The codec called ``name``; raise ``codec`` for names this version does not know."""
    codec = CODECS.get(name) if isinstance(name, str) else None
    if codec is None:
        raise RejectedMessage(Reason.CODEC, f"unknown codec {name!r}; known: {sorted(CODECS)}")
    return codec
