"""Delta codecs: how a device's weight delta becomes wire tensors and back.

A codec turns named float32 arrays into named wire tensors (``encode``) and checks and turns wire
tensors back into float32 arrays of the model's shapes (``decode``). The update message declares
its codec by name; the aggregator decodes every registered codec. Lossy codecs with device-side
state (error feedback) keep that state outside the codec object.
"""

from __future__ import annotations

import math
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
        # np.require keeps 0-d arrays 0-d (ascontiguousarray would make them 1-d)
        return {k: np.require(v, dtype=np.float32, requirements="C") for k, v in delta.items()}

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


FLOAT16_MAX = float(np.finfo(np.float16).max)
#: Largest int8 scale a decoder accepts: ``127 * scale`` must stay a finite float32 (128 leaves a
#: rounding margin; real deltas are bounded far lower by the aggregator's norm limit anyway).
MAX_INT8_SCALE = float(np.finfo(np.float32).max) / 128
INT8_BLOCK = 256


def _check_tensor(wire: Mapping[str, np.ndarray], name: str, dtypes: tuple[type, ...], shape: tuple[int, ...],
                  codec: str) -> np.ndarray:
    """``wire[name]`` if it has one of ``dtypes`` and exactly ``shape``; raise ``dtype``/``shape``."""
    array = wire[name]
    if array.dtype not in dtypes:
        needed = " or ".join(np.dtype(d).name for d in dtypes)
        raise RejectedMessage(Reason.DTYPE, f"tensor {name!r} is {array.dtype}, codec {codec} needs {needed}")
    if array.shape != shape:
        raise RejectedMessage(Reason.SHAPE, f"tensor {name!r} has shape {array.shape}, codec {codec} needs {shape}")
    return array


def _to_float16(x: np.ndarray) -> np.ndarray:
    # a finite delta beyond the float16 range is clipped, not turned into inf the aggregator would refuse
    return np.clip(np.asarray(x, dtype=np.float32), -FLOAT16_MAX, FLOAT16_MAX).astype(np.float16)


class Float16Codec:
    """Dense float16: half the bytes of fp32, about 3 significant digits (relative error <= 2**-11)."""

    name = "fp16"

    def encode(self, delta: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {k: _to_float16(v) for k, v in delta.items()}

    def decode(self, wire: Mapping[str, np.ndarray], shapes: Mapping[str, tuple[int, ...]]) -> dict[str, np.ndarray]:
        check_names(wire, shapes)
        return {name: _check_tensor(wire, name, (np.float16,), tuple(shape), self.name).astype(np.float32)
                for name, shape in shapes.items()}


class Int8Codec:
    """Symmetric int8 quantisation with stochastic rounding, one scale per tensor or per block.

    Each parameter ``p`` travels as ``p:q`` (int8 in [-127, 127], the parameter's shape) and
    ``p:scale`` (float32, shape ``(1,)``, or ``(ceil(size / block),)`` with blocks taken along
    the flattened parameter); the decoded value is ``q * scale``. ``scale = max|x| / 127`` over
    the tensor or block. Rounding is stochastic, so ``E[decode(encode(x))] == x`` and the error
    of one element is below one ``scale``; unbiased errors average out over devices and rounds.

    ``rng`` is a :class:`numpy.random.Generator` or a seed for one; ``None`` seeds from the OS.
    """

    def __init__(self, block: int | None = None, rng: np.random.Generator | int | None = None) -> None:
        if block is not None and (type(block) is not int or block < 1):
            raise ValueError(f"block must be a positive integer or None, got {block!r}")
        self.block = block
        self.name = "int8" if block is None else "int8-block" if block == INT8_BLOCK else f"int8-block{block}"
        self._rng = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)

    def num_scales(self, size: int) -> int:
        """How many scales a parameter of ``size`` elements has."""
        return 1 if self.block is None else -(-size // self.block)

    def encode(self, delta: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        out: dict[str, np.ndarray] = {}
        for name, value in delta.items():
            x = np.asarray(value, dtype=np.float32)
            flat = x.reshape(-1).astype(np.float64)
            if not np.isfinite(flat).all():
                raise ValueError(f"delta {name!r} has NaN or infinity; int8 cannot carry it")
            n = self.num_scales(flat.size)
            rows = flat.reshape(1, -1) if self.block is None else np.pad(flat, (0, n * self.block - flat.size)).reshape(n, self.block)
            peak = np.abs(rows).max(axis=1) if rows.size else np.zeros(n)
            scale = (peak / 127).astype(np.float32)
            # divide by the float32 scale the receiver will multiply by, so the rounding stays unbiased
            safe = np.where(scale > 0, scale, 1).astype(np.float64)[:, None]
            ratio = rows / safe
            q = np.floor(ratio + self._rng.random(ratio.shape))
            q = np.where(scale[:, None] > 0, np.clip(q, -127, 127), 0).astype(np.int8)
            out[f"{name}:q"] = q.reshape(-1)[: flat.size].reshape(x.shape)
            out[f"{name}:scale"] = scale
        return out

    def decode(self, wire: Mapping[str, np.ndarray], shapes: Mapping[str, tuple[int, ...]]) -> dict[str, np.ndarray]:
        check_names(wire, {f"{name}:{part}": None for name in shapes for part in ("q", "scale")})
        out: dict[str, np.ndarray] = {}
        for name, shape in shapes.items():
            shape = tuple(shape)
            size = math.prod(shape)
            q = _check_tensor(wire, f"{name}:q", (np.int8,), shape, self.name)
            n = self.num_scales(size)
            scale = _check_tensor(wire, f"{name}:scale", (np.float32,), (n,), self.name)
            if not (np.isfinite(scale).all() and (scale >= 0).all() and (scale <= MAX_INT8_SCALE).all()):
                raise RejectedMessage(Reason.FIELD, f"tensor {name + ':scale'!r} has a scale that is negative, "
                                      f"not finite or above {MAX_INT8_SCALE:.3g}")
            if size and (q == -128).any():
                raise RejectedMessage(Reason.FIELD, f"tensor {name + ':q'!r} holds -128; int8 values are in [-127, 127]")
            flat = q.reshape(-1).astype(np.float32)
            if self.block is None:
                flat *= scale[0]
            else:
                flat *= np.repeat(scale, self.block)[:size]
            out[name] = flat.reshape(shape)
        return out


class TopKCodec:
    """Top-k sparsification: the ``ceil(fraction * size)`` largest-magnitude entries of each tensor.

    Each parameter ``p`` travels as ``p:indices`` (flat indices, strictly increasing: uint16 for a
    tensor of at most 65,536 elements, else uint32) and ``p:values`` (``float32`` or ``float16``, as
    many). The decoder accepts any count up to the parameter's size, so devices may choose their own
    fraction; 2 % is the default (1 % ended 1.4 points below fp32 on the digits demo, 2 % within 0.6). The dropped mass is meant to be
    carried over by error feedback on the device (:mod:`fedmq.edge_agent.error_feedback`).
    """

    def __init__(self, values: str = "fp32", fraction: float = 0.02) -> None:
        if values not in ("fp32", "fp16"):
            raise ValueError(f"values must be 'fp32' or 'fp16', got {values!r}")
        if not (type(fraction) in (int, float) and 0 < fraction <= 1):
            raise ValueError(f"fraction must be in (0, 1], got {fraction!r}")
        self.name = f"topk-{values}"
        self.fraction = float(fraction)
        self.value_dtype = np.dtype(np.float32 if values == "fp32" else np.float16)

    def k(self, size: int) -> int:
        """How many entries a tensor of ``size`` elements keeps (at least one unless empty)."""
        # round first so that 0.01 * 100_000 keeps 1000, not 1001 through a float ulp
        return min(size, max(1, math.ceil(round(self.fraction * size, 9))))

    def encode(self, delta: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        out: dict[str, np.ndarray] = {}
        for name, value in delta.items():
            flat = np.asarray(value, dtype=np.float32).reshape(-1)
            if flat.size >= 2**32:
                raise ValueError(f"delta {name!r} has {flat.size} elements; uint32 indices cannot address them")
            k = self.k(flat.size)
            if k == flat.size:
                indices = np.arange(k)
            else:
                indices = np.sort(np.argpartition(np.abs(flat), flat.size - k)[flat.size - k:])
            values = flat[indices]
            out[f"{name}:indices"] = indices.astype(np.uint16 if flat.size <= 1 << 16 else np.uint32)
            out[f"{name}:values"] = values if self.value_dtype == np.float32 else _to_float16(values)
        return out

    def decode(self, wire: Mapping[str, np.ndarray], shapes: Mapping[str, tuple[int, ...]]) -> dict[str, np.ndarray]:
        check_names(wire, {f"{name}:{part}": None for name in shapes for part in ("indices", "values")})
        out: dict[str, np.ndarray] = {}
        for name, shape in shapes.items():
            shape = tuple(shape)
            size = math.prod(shape)
            indices, values = wire[f"{name}:indices"], wire[f"{name}:values"]
            if indices.ndim != 1:
                raise RejectedMessage(Reason.SHAPE, f"tensor {name + ':indices'!r} must be 1-d, has shape {indices.shape}")
            count = indices.shape[0]
            if count > size:
                raise RejectedMessage(Reason.SHAPE, f"tensor {name + ':indices'!r} has {count} entries, "
                                      f"the parameter only {size}")
            _check_tensor(wire, f"{name}:indices", (np.uint16, np.uint32), (count,), self.name)
            _check_tensor(wire, f"{name}:values", (self.value_dtype.type,), (count,), self.name)
            if count:
                if not (indices[1:] > indices[:-1]).all():
                    raise RejectedMessage(Reason.FIELD, f"tensor {name + ':indices'!r} is not strictly increasing "
                                          "(unsorted or duplicate indices)")
                if int(indices[-1]) >= size:
                    raise RejectedMessage(Reason.FIELD, f"tensor {name + ':indices'!r} has index {int(indices[-1])}, "
                                          f"out of range for {size} elements")
            flat = np.zeros(size, dtype=np.float32)
            flat[indices] = values
            out[name] = flat.reshape(shape)
        return out


CODECS: dict[str, DeltaCodec] = {
    codec.name: codec
    for codec in (Float32Codec(), Float16Codec(), Int8Codec(), Int8Codec(block=INT8_BLOCK),
                  TopKCodec("fp32"), TopKCodec("fp16"))
}


def get_codec(name: str) -> DeltaCodec:
    """The codec called ``name``; raise ``codec`` for names this version does not know."""
    codec = CODECS.get(name) if isinstance(name, str) else None
    if codec is None:
        raise RejectedMessage(Reason.CODEC, f"unknown codec {name!r}; known: {sorted(CODECS)}")
    return codec
