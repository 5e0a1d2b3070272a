"""The fedmq frame: a msgpack header map, then the raw bytes of the message's tensors.

::

    payload := header [padding body]
    header  := msgpack map (the message fields; "tensors" lists the tensor descriptors)
    padding := zero bytes up to the next multiple of 8 (only when there are tensors)
    body    := the tensors' little-endian bytes, concatenated in descriptor order

Keeping the tensor bytes outside msgpack lets the receiver take numpy views straight into the
payload instead of copying every tensor (msgpack's ``unpackb`` copies each bin field). A message
without tensors (status, receipt) is a plain msgpack map.

Decoding treats the payload as hostile: the size is checked before anything is parsed, the header
is parsed from a bounded prefix with msgpack's limits, and every descriptor is checked before a
view is taken. Every refusal is a :class:`~.errors.RejectedMessage` with a reason code.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import msgpack
import numpy as np

from .errors import Reason, RejectedMessage

#: Dtypes a tensor may have on the wire (always little-endian).
WIRE_DTYPES: dict[str, np.dtype] = {
    name: np.dtype(name).newbyteorder("<")
    for name in ("float32", "float16", "float64", "int8", "uint8", "int16", "uint16", "int32", "uint32", "int64")
}
_DTYPE_NAMES = {dt: name for name, dt in WIRE_DTYPES.items()}

MAX_HEADER_BYTES = 256 * 1024
_FIRST_FEED = 4096
MAX_TENSORS = 4096
MAX_NDIM = 8
ALIGNMENT = 8


#: Length of the signature trailer of a signed frame (Ed25519).
SIGNATURE_BYTES = 64


@dataclass(frozen=True, eq=False, slots=True)
class Frame:
    """A decoded frame: the header fields (without ``tensors``) and read-only tensor views.

    A signed frame (its header has ``sig``) ends with a 64-byte signature over every byte before
    it; ``signed`` is that part of the payload and ``signature`` the trailer.
    """

    header: dict[str, Any]
    tensors: dict[str, np.ndarray]
    signed: memoryview | None = None
    signature: bytes | None = None


def dtype_name(dtype: np.dtype) -> str:
    """The wire name of a numpy dtype; raise ``ValueError`` for dtypes the wire cannot carry."""
    name = _DTYPE_NAMES.get(np.dtype(dtype).newbyteorder("<"))
    if name is None:
        raise ValueError(f"dtype {dtype} cannot be sent; use one of {sorted(WIRE_DTYPES)}")
    return name


def encode_frame(header: Mapping[str, Any], tensors: Mapping[str, np.ndarray] | None = None, *,
                 sign: Callable[[bytes], bytes] | None = None) -> bytes:
    """Encode ``header`` and ``tensors`` into one payload (see the module docstring).

    With ``sign`` (the header must then carry ``sig``), the payload is followed by
    ``sign(payload)``, a 64-byte signature over every byte before it.
    """
    if "tensors" in header:
        raise ValueError("'tensors' is reserved for the tensor descriptors")
    if (sign is None) != ("sig" not in header):
        raise ValueError("a signed frame needs both a 'sig' header field and a signing function")
    payload = _encode_unsigned(dict(header), tensors)
    if sign is None:
        return payload
    signature = sign(payload)
    if len(signature) != SIGNATURE_BYTES:
        raise ValueError(f"signature must be {SIGNATURE_BYTES} bytes, got {len(signature)}")
    return payload + signature


def _encode_unsigned(fields: dict[str, Any], tensors: Mapping[str, np.ndarray] | None) -> bytes:
    if not tensors:
        return msgpack.packb(fields, use_bin_type=True)
    arrays = []
    descriptors = []
    for name, array in tensors.items():
        array = np.asarray(array)
        wire_dtype = WIRE_DTYPES[dtype_name(array.dtype)]
        # np.require keeps 0-d arrays 0-d (ascontiguousarray would make them 1-d)
        array = np.require(array, dtype=wire_dtype, requirements="C")
        descriptors.append({"name": name, "dtype": dtype_name(wire_dtype), "shape": list(array.shape)})
        arrays.append(memoryview(array.reshape(-1).view(np.uint8)))
    fields["tensors"] = descriptors
    head = msgpack.packb(fields, use_bin_type=True)
    padding = b"\0" * (-len(head) % ALIGNMENT)
    return b"".join([head, padding, *arrays])


def _unique_keys(pairs: list[tuple[Any, Any]]) -> dict[Any, Any]:
    result = dict(pairs)
    if len(result) != len(pairs):
        raise ValueError("a map has the same key twice")
    for key in result:  # the distinct keys are all the keys now
        if type(key) is not str:
            raise ValueError("map keys must be strings")
    return result


def _refuse_ext(code: int, data: bytes) -> None:
    raise ValueError(f"msgpack extension type {code} is not allowed")


def _unpacker() -> msgpack.Unpacker:
    limit = MAX_HEADER_BYTES
    return msgpack.Unpacker(
        raw=False,
        strict_map_key=True,
        use_list=True,
        max_buffer_size=limit,
        max_str_len=limit,
        max_bin_len=limit,
        max_array_len=MAX_TENSORS * 2,
        max_map_len=MAX_TENSORS * 2,
        max_ext_len=0,
        ext_hook=_refuse_ext,
        object_pairs_hook=_unique_keys,  # a repeated key must not silently win or lose  # max_ext_len=0 still lets a zero-length extension through
    )


def _read_header(view: memoryview, size: int) -> tuple[dict[str, Any], int]:
    """The msgpack header map at the front of ``view`` (``size`` bytes) and where it ends."""
    unpacker = _unpacker()
    # Feed the header in growing slices: the Unpacker copies what it is fed, and a header is a
    # few hundred bytes at the front of a payload of megabytes.
    fed = 0
    while True:
        end = min(size, MAX_HEADER_BYTES, max(_FIRST_FEED, 8 * fed))
        unpacker.feed(view[fed:end])
        fed = end
        try:
            header = unpacker.unpack()
        except msgpack.OutOfData:
            if fed < min(size, MAX_HEADER_BYTES):
                continue
            raise RejectedMessage(
                Reason.MALFORMED, f"truncated msgpack header (or header over {MAX_HEADER_BYTES} bytes)"
            ) from None
        except (ValueError, TypeError, msgpack.StackError, msgpack.FormatError) as exc:
            raise RejectedMessage(Reason.MALFORMED, f"not a msgpack header: {type(exc).__name__}: {exc}") from None
        break
    if not isinstance(header, dict):
        raise RejectedMessage(Reason.MALFORMED, f"header is a {type(header).__name__}, not a map")
    return header, unpacker.tell()


def peek_header(payload: bytes | bytearray | memoryview) -> dict[str, Any] | None:
    """The header map of a payload that may be refused for other reasons (too large, bad
    tensors), or None when no header can be read. Reads at most :data:`MAX_HEADER_BYTES`; never
    raises. For answers that must name what they answer (an update's id, a request's id)."""
    try:
        view = memoryview(payload).cast("B")
        return _read_header(view, view.nbytes)[0] if view.nbytes else None
    except (TypeError, RejectedMessage):
        return None


def decode_frame(payload: bytes | bytearray | memoryview, *, max_bytes: int) -> Frame:
    """Decode an untrusted payload of at most ``max_bytes`` into a :class:`Frame`.

    The tensors are read-only views into ``payload`` (no copy); keep the payload alive as long as
    them, which numpy does by itself through the views' ``base``.
    """
    try:
        view = memoryview(payload).cast("B")
    except TypeError as exc:
        raise RejectedMessage(Reason.MALFORMED, f"payload is not bytes: {type(payload).__name__}") from exc
    size = view.nbytes
    if size > max_bytes:
        raise RejectedMessage(Reason.OVERSIZE, f"payload of {size} bytes exceeds the cap of {max_bytes} bytes")
    if size == 0:
        raise RejectedMessage(Reason.MALFORMED, "empty payload")
    header, header_end = _read_header(view, size)
    signed: memoryview | None = None
    signature: bytes | None = None
    if "sig" in header:
        if size - SIGNATURE_BYTES < header_end:
            raise RejectedMessage(Reason.MALFORMED, "signed frame without its signature trailer")
        size -= SIGNATURE_BYTES
        signed, signature = view[:size], bytes(view[size:])
    if "tensors" not in header:
        if header_end != size:
            raise RejectedMessage(Reason.MALFORMED, f"{size - header_end} unexpected bytes after the header")
        return Frame(header, {}, signed, signature)
    descriptors = header.pop("tensors")
    return Frame(header, _tensor_views(payload, descriptors, header_end, size), signed, signature)


#: Checked descriptor lists by their msgpack bytes (cleared when full). A model's updates all carry
#: the same descriptors, so each list is checked once instead of once per message.
_LAYOUTS: dict[bytes, tuple[tuple[tuple[str, np.dtype, tuple[int, ...], int], ...], int]] = {}
_MAX_LAYOUTS = 64


def _layout(descriptors: list[Any]) -> tuple[tuple[tuple[str, np.dtype, tuple[int, ...], int], ...], int]:
    """The checked descriptors as (name, dtype, shape, byte count), and their total bytes.

    The cache key is the list packed again: msgpack keeps the types apart (``1000`` and ``1000.0``,
    ``1`` and ``True`` pack differently), so a list equal in Python but not on the wire is checked
    on its own.
    """
    key = msgpack.packb(descriptors, use_bin_type=True)
    layout = _LAYOUTS.get(key)
    if layout is None:
        entries = []
        names: set[str] = set()
        for index, desc in enumerate(descriptors):
            name, dtype, shape = _check_descriptor(index, desc)
            if name in names:
                raise RejectedMessage(Reason.TENSORS, f"tensor {name!r} appears twice")
            names.add(name)
            entries.append((name, dtype, shape, math.prod(shape) * dtype.itemsize))
        layout = (tuple(entries), sum(entry[3] for entry in entries))
        if len(_LAYOUTS) >= _MAX_LAYOUTS:
            _LAYOUTS.clear()  # atomic under the GIL, unlike evicting one entry while another thread reads
        _LAYOUTS[key] = layout
    return layout


def _tensor_views(payload: Any, descriptors: Any, header_end: int, size: int) -> dict[str, np.ndarray]:
    if not isinstance(descriptors, list):
        raise RejectedMessage(Reason.MALFORMED, "'tensors' must be a list of descriptors")
    if len(descriptors) > MAX_TENSORS:
        raise RejectedMessage(Reason.MALFORMED, f"more than {MAX_TENSORS} tensors")
    offset = header_end + (-header_end % ALIGNMENT)
    if offset > size or any(payload[header_end:offset]):
        raise RejectedMessage(Reason.MALFORMED, "missing or non-zero padding after the header")
    entries, total = _layout(descriptors)
    if offset + total > size:
        for name, _, _, nbytes in entries:  # name the first tensor that does not fit
            if offset + nbytes > size:
                raise RejectedMessage(
                    Reason.MALFORMED, f"payload truncated: tensor {name!r} needs {nbytes} bytes at offset {offset}, "
                    f"payload has {size}"
                )
            offset += nbytes
    if offset + total != size:
        raise RejectedMessage(Reason.MALFORMED, f"{size - offset - total} unexpected bytes after the last tensor")
    # one buffer export for the whole body, read-only whatever the payload is; each tensor is a
    # slice of it (a slice and a view cost a fraction of a np.frombuffer each)
    body = np.frombuffer(payload, dtype=np.uint8, count=total, offset=offset)
    body.flags.writeable = False
    tensors: dict[str, np.ndarray] = {}
    start = 0
    for name, dtype, shape, nbytes in entries:
        tensors[name] = body[start:start + nbytes].view(dtype).reshape(shape)
        start += nbytes
    return tensors


def _check_descriptor(index: int, desc: Any) -> tuple[str, np.dtype, tuple[int, ...]]:
    if not isinstance(desc, dict) or set(desc) != {"name", "dtype", "shape"}:
        raise RejectedMessage(Reason.MALFORMED, f"tensor descriptor #{index} must be a map of name, dtype, shape")
    name, dtype_name_, shape = desc["name"], desc["dtype"], desc["shape"]
    if not isinstance(name, str) or not 0 < len(name) <= 128:
        raise RejectedMessage(Reason.MALFORMED, f"tensor descriptor #{index}: name must be a string of 1-128 characters")
    dtype = WIRE_DTYPES.get(dtype_name_) if isinstance(dtype_name_, str) else None
    if dtype is None:
        raise RejectedMessage(Reason.DTYPE, f"tensor {name!r}: unknown dtype {dtype_name_!r}")
    if (
        not isinstance(shape, list)
        or len(shape) > MAX_NDIM
        or not all(type(d) is int and 0 <= d < 2**32 for d in shape)
    ):
        raise RejectedMessage(Reason.SHAPE, f"tensor {name!r}: shape must be a list of at most {MAX_NDIM} non-negative ints")
    return name, dtype, tuple(shape)
