"""The fedmq frame (broker/wire.py): frames are built byte by byte with msgpack, not with the encoder."""

from __future__ import annotations

import struct
import time
import tracemalloc

import msgpack
import numpy as np
import pytest

from fedmq.broker.errors import Reason, RejectedMessage
from fedmq.broker.wire import (
    ALIGNMENT,
    MAX_HEADER_BYTES,
    MAX_NDIM,
    MAX_TENSORS,
    WIRE_DTYPES,
    decode_frame,
    dtype_name,
    encode_frame,
)

BIG = 64 * 1024 * 1024


def pad8(n: int) -> int:
    """Bytes of zero padding after an ``n``-byte header."""
    return (8 - n % 8) % 8


def build(header: dict, body: bytes = b"", *, padding: bytes | None = None) -> bytes:
    """A frame by hand: msgpack header, zero padding to a multiple of 8 (or ``padding``), body."""
    head = msgpack.packb(header, use_bin_type=True)
    if padding is None:
        padding = b"\0" * pad8(len(head))
    return head + padding + body


def desc(name: str, dtype: str, shape: list) -> dict:
    return {"name": name, "dtype": dtype, "shape": shape}


def rejected(payload, reason: Reason, *, max_bytes: int = BIG) -> RejectedMessage:
    with pytest.raises(RejectedMessage) as info:
        decode_frame(payload, max_bytes=max_bytes)
    assert info.value.reason is reason, info.value
    return info.value


# -- decoding hand-built frames ----------------------------------------------------------------------


def test_decode_plain_map_without_tensors() -> None:
    frame = decode_frame(msgpack.packb({"kind": "status", "n": 3}), max_bytes=BIG)
    assert frame.header == {"kind": "status", "n": 3}
    assert frame.tensors == {}


def test_decode_hand_built_frame_with_two_tensors() -> None:
    body = struct.pack("<3f", 1.5, -2.0, 0.25) + struct.pack("<2h", -7, 300)
    payload = build({"kind": "x", "tensors": [desc("w", "float32", [3]), desc("b", "int16", [2, 1])]}, body)
    frame = decode_frame(payload, max_bytes=BIG)
    assert frame.header == {"kind": "x"}, "'tensors' is taken out of the header"
    assert list(frame.tensors) == ["w", "b"]
    assert frame.tensors["w"].dtype == np.float32 and frame.tensors["w"].shape == (3,)
    assert frame.tensors["w"].tolist() == [1.5, -2.0, 0.25]
    assert frame.tensors["b"].dtype == np.int16 and frame.tensors["b"].shape == (2, 1)
    assert frame.tensors["b"].tolist() == [[-7], [300]]


def test_decode_zero_d_and_empty_tensors_from_hand_built_frame() -> None:
    body = struct.pack("<d", 3.5)  # the 0-d tensor; the (2, 0) tensor has no bytes
    payload = build({"tensors": [desc("s", "float64", []), desc("e", "uint8", [2, 0])]}, body)
    frame = decode_frame(payload, max_bytes=BIG)
    assert frame.tensors["s"].shape == () and float(frame.tensors["s"]) == 3.5
    assert frame.tensors["e"].shape == (2, 0) and frame.tensors["e"].dtype == np.uint8


def test_decode_bytes_are_little_endian() -> None:
    payload = build({"tensors": [desc("v", "uint32", [1])]}, b"\x01\x02\x03\x04")
    assert int(decode_frame(payload, max_bytes=BIG).tensors["v"][0]) == 0x04030201


def test_payload_of_exactly_max_bytes_is_accepted() -> None:
    payload = build({"tensors": [desc("v", "uint8", [3])]}, b"abc")
    assert decode_frame(payload, max_bytes=len(payload)).tensors["v"].tolist() == [97, 98, 99]


def test_decode_accepts_bytearray_and_memoryview() -> None:
    payload = build({"tensors": [desc("v", "int8", [2])]}, b"\x01\xff")
    for buf in (bytearray(payload), memoryview(payload)):
        assert decode_frame(buf, max_bytes=BIG).tensors["v"].tolist() == [1, -1]


# -- views: read-only, no copy, aligned ------------------------------------------------------------


def test_views_are_read_only_and_share_memory_with_payload() -> None:
    payload = build({"tensors": [desc("w", "float32", [2, 2])]}, struct.pack("<4f", 1, 2, 3, 4))
    w = decode_frame(payload, max_bytes=BIG).tensors["w"]
    assert not w.flags.writeable
    with pytest.raises(ValueError):
        w[0, 0] = 9.0
    assert np.shares_memory(w, np.frombuffer(payload, dtype=np.uint8))


def test_views_into_a_bytearray_see_its_bytes_and_stay_read_only() -> None:
    payload = bytearray(build({"tensors": [desc("v", "uint8", [2])]}, b"\x05\x06"))
    v = decode_frame(payload, max_bytes=BIG).tensors["v"]
    assert not v.flags.writeable
    payload[-1] = 42  # no copy: the view sees the change
    assert v.tolist() == [5, 42]


@pytest.mark.parametrize("extra", range(9))
def test_body_starts_at_a_multiple_of_8(extra: int) -> None:
    header = {"kind": "x" * extra, "tensors": [desc("w", "float64", [2])]}
    head_len = len(msgpack.packb(header, use_bin_type=True))
    payload = build(header, struct.pack("<2d", 1.0, 2.0))
    w = decode_frame(payload, max_bytes=BIG).tensors["w"]
    base = np.frombuffer(payload, dtype=np.uint8).__array_interface__["data"][0]
    start = w.__array_interface__["data"][0] - base
    assert start == head_len + pad8(head_len)
    assert start % ALIGNMENT == 0


# -- encoder ---------------------------------------------------------------------------------------


def test_encode_without_tensors_is_a_plain_msgpack_map() -> None:
    assert encode_frame({"kind": "status", "n": 1}) == msgpack.packb({"kind": "status", "n": 1})
    assert encode_frame({"kind": "status"}, {}) == msgpack.packb({"kind": "status"})


def test_encode_matches_hand_built_frame() -> None:
    w = np.array([[1.5, -2.0], [0.25, 8.0]], dtype=np.float32)
    b = np.array([-1, 2, 3], dtype=np.int64)
    expected = build(
        {"kind": "x", "tensors": [desc("w", "float32", [2, 2]), desc("b", "int64", [3])]},
        struct.pack("<4f", 1.5, -2.0, 0.25, 8.0) + struct.pack("<3q", -1, 2, 3),
    )
    assert encode_frame({"kind": "x"}, {"w": w, "b": b}) == expected


def test_encode_big_endian_and_non_contiguous_inputs_as_little_endian_c_order() -> None:
    big = np.array([1, 2], dtype=">u4")
    strided = np.arange(6, dtype=np.int16).reshape(2, 3).T  # (3, 2), Fortran-ordered view
    expected = build(
        {"tensors": [desc("big", "uint32", [2]), desc("t", "int16", [3, 2])]},
        struct.pack("<2I", 1, 2) + struct.pack("<6h", 0, 3, 1, 4, 2, 5),
    )
    assert encode_frame({}, {"big": big, "t": strided}) == expected


def test_encode_refuses_reserved_tensors_key() -> None:
    with pytest.raises(ValueError, match="reserved"):
        encode_frame({"tensors": []}, {"w": np.zeros(1, np.float32)})


@pytest.mark.parametrize("dtype", [np.bool_, np.complex64, np.uint64, object])
def test_encode_refuses_dtypes_the_wire_cannot_carry(dtype) -> None:
    with pytest.raises(ValueError):
        encode_frame({}, {"w": np.zeros(2, dtype=dtype)})


@pytest.mark.parametrize(
    ("dtype", "name"),
    [
        ("<f4", "float32"),
        (">f4", "float32"),
        ("f2", "float16"),
        (">f8", "float64"),
        ("i1", "int8"),
        ("u1", "uint8"),
        (">i2", "int16"),
        ("i4", "int32"),
        (">u4", "uint32"),
        ("i8", "int64"),
    ],
)
def test_dtype_name(dtype: str, name: str) -> None:
    assert dtype_name(np.dtype(dtype)) == name


def test_wire_dtypes_are_the_documented_ten() -> None:
    assert sorted(WIRE_DTYPES) == sorted(["float32", "float16", "float64", "int8", "uint8", "int16", "uint16", "int32",
                                          "uint32", "int64"])


# -- round trips -------------------------------------------------------------------------------------

SHAPES = [(3,), (2, 3), (4, 1, 2), (1,) * MAX_NDIM]


@pytest.mark.parametrize("dtype", sorted(WIRE_DTYPES))
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_round_trip_every_dtype_and_shape(dtype: str, shape: tuple[int, ...]) -> None:
    count = int(np.prod(shape))
    offset = 0 if dtype.startswith("u") else -5  # negative values for the signed dtypes
    array = (np.arange(count) * 3 + offset).astype(dtype).reshape(shape)
    payload = encode_frame({"kind": "t", "v": 1}, {"a": array, "z": np.array([7], dtype=dtype)})
    frame = decode_frame(payload, max_bytes=len(payload))
    assert frame.header == {"kind": "t", "v": 1}
    assert frame.tensors["a"].dtype == np.dtype(dtype)
    assert frame.tensors["a"].shape == shape
    np.testing.assert_array_equal(frame.tensors["a"], array)
    assert frame.tensors["z"].tolist() == [7]


def test_round_trip_empty_vector() -> None:
    frame = decode_frame(encode_frame({}, {"e": np.zeros(0, np.int32), "w": np.ones(1, np.int32)}), max_bytes=BIG)
    assert frame.tensors["e"].shape == (0,) and frame.tensors["e"].dtype == np.int32
    assert frame.tensors["w"].tolist() == [1]


def test_round_trip_keeps_float_bit_patterns() -> None:
    array = np.array([np.nan, np.inf, -np.inf, -0.0, 1e-45], dtype=np.float32)
    frame = decode_frame(encode_frame({}, {"a": array}), max_bytes=BIG)
    assert frame.tensors["a"].tobytes() == array.tobytes()


# -- rejections ------------------------------------------------------------------------------------


def test_oversize_is_checked_before_parsing() -> None:
    # Garbage that would be 'malformed' if parsed: oversize must win without looking at it.
    error = rejected(b"\xc1" * 101, Reason.OVERSIZE, max_bytes=100)
    assert "101" in error.detail and "100" in error.detail
    rejected(b"\xc1" * 100, Reason.MALFORMED, max_bytes=100)


def test_oversize_valid_frame() -> None:
    payload = build({"tensors": [desc("v", "uint8", [3])]}, b"abc")
    rejected(payload, Reason.OVERSIZE, max_bytes=len(payload) - 1)


def test_empty_payload() -> None:
    assert "empty" in rejected(b"", Reason.MALFORMED).detail


def test_not_bytes() -> None:
    rejected("a string", Reason.MALFORMED)


@pytest.mark.parametrize("payload", [b"\xc1", b"\xc1\x00\x00", b"\xff\xff", b"\x81\xc1\x00"])
def test_non_msgpack_bytes(payload: bytes) -> None:
    rejected(payload, Reason.MALFORMED)


@pytest.mark.parametrize("value", [[1, 2], 5, "text", None, b"bin", 1.5])
def test_header_not_a_map(value) -> None:
    assert "not a map" in rejected(msgpack.packb(value, use_bin_type=True), Reason.MALFORMED).detail


def test_header_with_non_string_keys() -> None:
    rejected(msgpack.packb({1: 2}), Reason.MALFORMED)


@pytest.mark.parametrize("cut", [1, 2, 5])
def test_truncated_header(cut: int) -> None:
    head = msgpack.packb({"kind": "status", "detail": "hello"})
    assert "truncated" in rejected(head[:-cut], Reason.MALFORMED).detail


def test_header_longer_than_limit() -> None:
    payload = msgpack.packb({"detail": "x" * (MAX_HEADER_BYTES + 10)})
    rejected(payload, Reason.MALFORMED)


@pytest.mark.parametrize("cut", [1, 4, 12])
def test_truncated_body(cut: int) -> None:
    payload = build({"tensors": [desc("w", "float32", [3])]}, struct.pack("<3f", 1, 2, 3))
    assert "truncated" in rejected(payload[:-cut], Reason.MALFORMED).detail


def test_missing_padding_after_header() -> None:
    header = {"tensors": [desc("e", "uint8", [0])]}
    head = msgpack.packb(header)
    assert pad8(len(head)) > 0
    rejected(head, Reason.MALFORMED)
    assert decode_frame(build(header), max_bytes=BIG).tensors["e"].shape == (0,)


def test_trailing_bytes_after_plain_header() -> None:
    error = rejected(msgpack.packb({"kind": "status"}) + b"\0", Reason.MALFORMED)
    assert "1 unexpected" in error.detail


@pytest.mark.parametrize("extra", [b"\0", b"\0" * 8, b"junk"])
def test_trailing_bytes_after_last_tensor(extra: bytes) -> None:
    payload = build({"tensors": [desc("w", "float32", [1])]}, struct.pack("<f", 1.0)) + extra
    assert f"{len(extra)} unexpected" in rejected(payload, Reason.MALFORMED).detail


def test_non_zero_padding() -> None:
    header = {"tensors": [desc("w", "uint8", [1])]}
    n = pad8(len(msgpack.packb(header)))
    assert n > 0, "the test needs a header whose length is not a multiple of 8"
    padding = b"\0" * (n - 1) + b"\x01"
    assert "padding" in rejected(build(header, b"\x07", padding=padding), Reason.MALFORMED).detail


@pytest.mark.parametrize(
    "descriptors",
    [
        {"w": desc("w", "uint8", [1])},  # not a list
        "w",
        [["w", "uint8", [1]]],  # descriptor not a map
        [{"name": "w", "dtype": "uint8"}],  # missing shape
        [{"name": "w", "shape": [1]}],  # missing dtype
        [{"dtype": "uint8", "shape": [1]}],  # missing name
        [{**desc("w", "uint8", [1]), "offset": 0}],  # extra key
        [desc(5, "uint8", [1])],  # non-string name
        [desc(b"w", "uint8", [1])],
        [desc("", "uint8", [1])],  # empty name
        [desc("n" * 129, "uint8", [1])],  # name too long
    ],
)
def test_bad_descriptor_is_malformed(descriptors) -> None:
    rejected(build({"tensors": descriptors}, b"\x01"), Reason.MALFORMED)


def test_name_of_128_characters_is_allowed() -> None:
    frame = decode_frame(build({"tensors": [desc("n" * 128, "uint8", [1])]}, b"\x01"), max_bytes=BIG)
    assert list(frame.tensors) == ["n" * 128]


def test_duplicate_tensor_name() -> None:
    payload = build({"tensors": [desc("w", "uint8", [1]), desc("w", "uint8", [1])]}, b"\x01\x02")
    assert "twice" in rejected(payload, Reason.TENSORS).detail


def test_duplicate_tensor_name_is_refused_every_time() -> None:
    payload = build({"tensors": [desc("w", "uint8", [1]), desc("w", "uint8", [1])]}, b"\x01\x02")
    for _ in range(3):  # a refused descriptor list is never remembered as checked
        assert "twice" in rejected(payload, Reason.TENSORS).detail


# -- checked descriptor lists are remembered by their bytes, not by Python equality -----------------


@pytest.mark.parametrize("good, bad", [([2], [2.0]), ([1], [True]), ([3, 1], [3, True])])
def test_a_list_equal_in_python_but_not_on_the_wire_is_checked_on_its_own(good: list, bad: list) -> None:
    assert good == bad  # what a cache keyed on Python equality would confuse
    count = int(np.prod(good))
    frame = decode_frame(build({"tensors": [desc("w", "uint8", good)]}, b"\x01" * count), max_bytes=BIG)
    assert frame.tensors["w"].shape == tuple(good)
    rejected(build({"tensors": [desc("w", "uint8", bad)]}, b"\x01" * count), Reason.SHAPE)


def test_a_remembered_list_still_checks_each_payload_size() -> None:
    header = {"tensors": [desc("a", "float32", [2]), desc("b", "uint8", [3])]}
    body = struct.pack("<2f", 1.5, -2.0) + b"\x07\x08\x09"
    frame = decode_frame(build(header, body), max_bytes=BIG)  # remembered from here on
    assert frame.tensors["a"].tolist() == [1.5, -2.0] and frame.tensors["b"].tolist() == [7, 8, 9]
    truncated = rejected(build(header, body[:-1]), Reason.MALFORMED).detail
    assert "tensor 'b' needs 3 bytes" in truncated, truncated
    assert "tensor 'a' needs 8 bytes" in rejected(build(header, body[:5]), Reason.MALFORMED).detail
    assert "2 unexpected" in rejected(build(header, body + b"\0\0"), Reason.MALFORMED).detail
    again = decode_frame(bytearray(build(header, body)), max_bytes=BIG)
    assert again.tensors["b"].tolist() == [7, 8, 9] and not again.tensors["b"].flags.writeable


def test_remembered_lists_are_bounded() -> None:
    from fedmq.broker import wire

    for i in range(3 * wire._MAX_LAYOUTS):
        name = f"t{i}"
        frame = decode_frame(build({"tensors": [desc(name, "uint8", [1])]}, bytes([i % 256])), max_bytes=BIG)
        assert frame.tensors[name].tolist() == [i % 256]
        assert len(wire._LAYOUTS) <= wire._MAX_LAYOUTS


@pytest.mark.parametrize("dtype", ["float128", "bool", "complex64", "uint64", "<f4", "f4", "FLOAT32", "", 5, None])
def test_unknown_dtype(dtype) -> None:
    rejected(build({"tensors": [desc("w", dtype, [1])]}, b"\0" * 16), Reason.DTYPE)


@pytest.mark.parametrize(
    "shape",
    [[-1], [2, -3], [2.0], ["2"], [True], [None], [[2]], [1] * (MAX_NDIM + 1), 3, "3", None, {"0": 3}, [2**32]],
)
def test_bad_shape(shape) -> None:
    rejected(build({"tensors": [desc("w", "uint8", shape)]}, b"\0" * 8), Reason.SHAPE)


def test_too_many_tensors() -> None:
    too_many = [desc(f"t{i}", "uint8", [0]) for i in range(MAX_TENSORS + 1)]
    rejected(build({"tensors": too_many}), Reason.MALFORMED)
    just_enough = too_many[:MAX_TENSORS]
    assert len(decode_frame(build({"tensors": just_enough}), max_bytes=BIG).tensors) == MAX_TENSORS


@pytest.mark.parametrize(
    "payload",
    [
        msgpack.packb(msgpack.ExtType(1, b"ab")),
        msgpack.packb({"a": msgpack.ExtType(5, b"abcd")}),
        msgpack.packb({"t": msgpack.Timestamp(1)}),
        msgpack.packb({"tensors": [desc("w", msgpack.ExtType(1, b"x"), [1])]}) + b"\0" * 8,
    ],
    ids=["ext-header", "ext-field", "timestamp", "ext-dtype"],
)
def test_msgpack_ext_types_are_malformed(payload: bytes) -> None:
    rejected(payload, Reason.MALFORMED)


@pytest.mark.parametrize(
    "payload",
    [b"\x91" * 100_000 + b"\xc0", b"\x81\xa1a" * 50_000 + b"\xc0"],
    ids=["nested-arrays", "nested-maps"],
)
def test_nesting_bombs_are_malformed(payload: bytes) -> None:
    rejected(payload, Reason.MALFORMED)


@pytest.mark.parametrize("shape", [[2**31, 2**31], [2**32 - 1] * MAX_NDIM, [2**32 - 1]])
def test_declared_huge_shape_is_rejected_without_allocating(shape: list[int]) -> None:
    payload = build({"tensors": [desc("w", "float64", shape)]}, b"\0" * 64)
    tracemalloc.start()
    started = time.perf_counter()
    try:
        rejected(payload, Reason.MALFORMED)
        elapsed = time.perf_counter() - started
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert elapsed < 0.5
    assert peak < 1024 * 1024


def test_rejected_message_is_a_value_error_with_reason_and_detail() -> None:
    error = rejected(b"", Reason.MALFORMED)
    assert isinstance(error, ValueError)
    assert str(error) == f"malformed: {error.detail}"


# -- regressions -------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", sorted(WIRE_DTYPES))
def test_zero_d_scalar_round_trip_keeps_shape(dtype: str) -> None:
    """Regression: ``np.ascontiguousarray`` returns at least 1-d, so a 0-d tensor came back as ``(1,)``."""
    scalar = np.array(3, dtype=dtype)
    frame = decode_frame(encode_frame({}, {"s": scalar}), max_bytes=BIG)
    assert frame.tensors["s"].shape == ()
    assert frame.tensors["s"].item() == 3


@pytest.mark.parametrize("shape", [(2, 0, 3), (0, 0), (3, 0)], ids=str)
def test_empty_multidim_tensor_round_trip(shape: tuple[int, ...]) -> None:
    """Regression: ``memoryview(array).cast("B")`` raised ``TypeError: cannot cast view with zeros in
    shape or strides`` for a tensor of 2 or more dimensions with a 0 among them."""
    array = np.zeros(shape, dtype=np.float32)
    frame = decode_frame(encode_frame({}, {"e": array, "w": np.ones(2, np.float32)}), max_bytes=BIG)
    assert frame.tensors["e"].shape == shape
    assert frame.tensors["w"].tolist() == [1.0, 1.0]


def test_zero_length_ext_type_is_malformed() -> None:
    """Regression: ``max_ext_len=0`` refuses ext types with data but lets a zero-length ext
    (``c7 00 01``) through as ``msgpack.ExtType(1, b'')``."""
    payload = msgpack.packb({"kind": "status", "x": msgpack.ExtType(1, b"")})
    rejected(payload, Reason.MALFORMED)
