"""fedmq v1 messages (broker/messages.py): round trips and every rejection, with hand-built frames."""

from __future__ import annotations

import msgpack
import numpy as np
import pytest

from fedmq.broker.architecture import MLPArchitecture
from fedmq.broker.errors import Reason, RejectedMessage
from fedmq.broker.messages import (
    MAX_METRICS,
    MAX_TEXT,
    MAX_VERSION,
    AggregatorStatus,
    Command,
    DeviceStatus,
    ModelMessage,
    Receipt,
    Task,
    UpdateMessage,
    decode_message,
)
from fedmq.broker.wire import encode_frame

BIG = 16 * 1024 * 1024
NAN = float("nan")
INF = float("inf")
ARCH = MLPArchitecture(3, (2,), 2)  # dense0.weight (3, 2), dense0.bias (2,), dense1.weight (2, 2), dense1.bias (2,)


def frame(header: dict, tensors: dict[str, np.ndarray] | None = None) -> bytes:
    """A payload by hand: msgpack header with descriptors, zero padding to 8, little-endian bytes."""
    header = dict(header)
    body = b""
    if tensors:
        header["tensors"] = [{"name": name, "dtype": str(a.dtype), "shape": list(a.shape)} for name, a in tensors.items()]
        body = b"".join(np.ascontiguousarray(a, a.dtype.newbyteorder("<")).tobytes() for a in tensors.values())
    head = msgpack.packb(header, use_bin_type=True)
    return head + b"\0" * (-len(head) % 8) + body if tensors else head


def rejected(payload: bytes, reason: Reason, expect: type | None = None) -> RejectedMessage:
    with pytest.raises(RejectedMessage) as info:
        decode_message(payload, max_bytes=BIG, expect=expect)
    assert info.value.reason is reason, info.value
    return info.value


def model_params() -> dict[str, np.ndarray]:
    return {
        "dense0.weight": np.array([[1, 2], [3, 4], [5, 6]], dtype=np.float32),
        "dense0.bias": np.array([0.5, -0.5], dtype=np.float32),
        "dense1.weight": np.array([[-1, 0], [0, 1]], dtype=np.float32),
        "dense1.bias": np.array([0, 0.25], dtype=np.float32),
    }


def task_wire(**changes) -> dict:
    return {"mode": "sync", "epochs": 2, "batch_size": 8, "lr": 0.1, "codec": "fp32", "deadline_s": 30.0, **changes}


def model_header(**changes) -> dict:
    return {
        "kind": "model",
        "schema": 1,
        "fleet": "f1",
        "version": 4,
        "parent": 3,
        "created": 1_700_000_000.5,
        "arch": {"type": "mlp", "inputs": 3, "hidden": [2], "classes": 2},
        "task": task_wire(),
        **changes,
    }


def update_header(**changes) -> dict:
    return {
        "kind": "update",
        "schema": 1,
        "device": "dev-1",
        "update_id": "r4:dev-1.0_a",
        "base_version": 4,
        "num_examples": 10,
        "codec": "fp32",
        "metrics": {"loss": 0.5, "n": 3},
        "created": 12.5,
        **changes,
    }


def receipt_header(**changes) -> dict:
    return {
        "kind": "receipt",
        "schema": 1,
        "device": "dev-1",
        "update_id": "u1",
        "status": "rejected",
        "model_version": 4,
        "reason": "stale",
        "detail": "too old",
        **changes,
    }


def status_header(**changes) -> dict:
    return {"kind": "status", "schema": 1, "device": "dev-1", "state": "online", **changes}


def agg_header(**changes) -> dict:
    return {"kind": "aggregator_status", "schema": 1, "state": "online", **changes}


def without(header: dict, key: str) -> dict:
    return {k: v for k, v in header.items() if k != key}


DELTA = {"dense0.weight": np.full((3, 2), 0.5, np.float32)}


# -- round trips -------------------------------------------------------------------------------------


def test_model_round_trip() -> None:
    task = Task(epochs=3, batch_size=32, lr=0.05, codec="fp32", deadline_s=12.5)
    msg = ModelMessage(fleet="f1", version=7, parent=6, arch=ARCH, task=task, params=model_params(), created=1234.5)
    out = decode_message(msg.encode(), max_bytes=BIG, expect=ModelMessage)
    assert isinstance(out, ModelMessage)
    assert (out.fleet, out.version, out.parent, out.created) == ("f1", 7, 6, 1234.5)
    assert out.arch == ARCH
    assert out.task == task
    assert list(out.params) == list(model_params())
    for name, array in model_params().items():
        assert out.params[name].dtype == np.float32
        np.testing.assert_array_equal(out.params[name], array)


def test_model_from_hand_built_frame() -> None:
    out = decode_message(frame(model_header(), model_params()), max_bytes=BIG)
    assert isinstance(out, ModelMessage)
    assert out.version == 4 and out.parent == 3 and out.created == 1_700_000_000.5
    assert out.task == Task(mode="sync", epochs=2, batch_size=8, lr=0.1, codec="fp32", deadline_s=30.0)
    assert out.params["dense0.weight"].tolist() == [[1, 2], [3, 4], [5, 6]]


def test_update_round_trip() -> None:
    tensors = {"dense0.weight": np.arange(6, dtype=np.float32).reshape(3, 2), "dense0.bias": np.array([1, -1], np.float32)}
    msg = UpdateMessage(
        device="dev-1",
        update_id="u:1",
        base_version=9,
        num_examples=42,
        codec="fp32",
        tensors=tensors,
        metrics={"loss": 0.25, "acc": 1.0},
        created=99.0,
    )
    out = decode_message(msg.encode(), max_bytes=BIG, expect=UpdateMessage)
    assert isinstance(out, UpdateMessage)
    assert (out.device, out.update_id, out.base_version, out.num_examples, out.codec, out.created) == (
        "dev-1",
        "u:1",
        9,
        42,
        "fp32",
        99.0,
    )
    assert dict(out.metrics) == {"loss": 0.25, "acc": 1.0}
    assert list(out.tensors) == ["dense0.weight", "dense0.bias"]
    np.testing.assert_array_equal(out.tensors["dense0.weight"], tensors["dense0.weight"])
    np.testing.assert_array_equal(out.tensors["dense0.bias"], tensors["dense0.bias"])


def test_update_optional_fields_default() -> None:
    out = decode_message(frame(without(without(update_header(), "metrics"), "created"), DELTA), max_bytes=BIG)
    assert dict(out.metrics) == {} and out.created == 0.0


def test_update_integer_metrics_become_floats() -> None:
    out = decode_message(frame(update_header(), DELTA), max_bytes=BIG)
    assert out.metrics == {"loss": 0.5, "n": 3.0}
    assert type(out.metrics["n"]) is float


@pytest.mark.parametrize(
    "receipt",
    [
        Receipt("dev-1", "u1", "accepted", 5),
        Receipt("dev-1", "u1", "rejected", 5, reason="stale", detail="computed from 3"),
        Receipt("dev-2", "u2", "rejected", 0, reason="duplicate"),
    ],
)
def test_receipt_round_trip(receipt: Receipt) -> None:
    assert decode_message(receipt.encode(), max_bytes=BIG, expect=Receipt) == receipt


def test_receipt_with_reason_enum_round_trips() -> None:
    out = decode_message(Receipt("dev-1", "u1", "rejected", 5, reason=Reason.NON_FINITE).encode(), max_bytes=BIG)
    assert out.reason == "non_finite"


def test_receipt_detail_is_cut_to_max_text_when_encoded() -> None:
    out = decode_message(Receipt("dev-1", "u1", "rejected", 5, reason="shape", detail="x" * 600).encode(), max_bytes=BIG)
    assert out.detail == "x" * MAX_TEXT


def test_device_status_round_trip() -> None:
    status = DeviceStatus(
        "dev-1",
        "online",
        model_version=3,
        software="fedmq 0.1",
        platform="linux-aarch64",
        backend="numpy",
        since=100.5,
        detail="ok",
        counters={"updates": 4, "rejected": 1.5},
    )
    out = decode_message(status.encode(), max_bytes=BIG, expect=DeviceStatus)
    assert out == DeviceStatus(
        "dev-1", "online", 3, "fedmq 0.1", "linux-aarch64", "numpy", 100.5, "ok", {"updates": 4.0, "rejected": 1.5}
    )


def test_device_status_minimal_header_uses_defaults() -> None:
    out = decode_message(frame(status_header(state="offline")), max_bytes=BIG)
    assert out == DeviceStatus(device="dev-1", state="offline")


def test_aggregator_status_round_trip() -> None:
    status = AggregatorStatus("online", model_version=12, mode="sync", software="fedmq 0.1", since=5.0, counters={"rounds": 11})
    out = decode_message(status.encode(), max_bytes=BIG, expect=AggregatorStatus)
    assert out == AggregatorStatus("online", 12, "sync", "fedmq 0.1", 5.0, {"rounds": 11.0})


def test_aggregator_status_minimal_header_uses_defaults() -> None:
    assert decode_message(frame(agg_header(state="offline")), max_bytes=BIG) == AggregatorStatus(state="offline")


def test_boundary_values_are_accepted() -> None:
    out = decode_message(
        frame(
            update_header(
                base_version=MAX_VERSION,
                num_examples=2**31 - 1,
                update_id="a" * 64,
                metrics={f"m{i}": i for i in range(MAX_METRICS)},
            ),
            DELTA,
        ),
        max_bytes=BIG,
    )
    assert out.base_version == 2**53 and out.num_examples == 2**31 - 1 and len(out.metrics) == 32


# -- envelope: size, schema, kind ----------------------------------------------------------------------


def test_oversize_message() -> None:
    payload = frame(status_header())
    with pytest.raises(RejectedMessage) as info:
        decode_message(payload, max_bytes=len(payload) - 1)
    assert info.value.reason is Reason.OVERSIZE


def test_malformed_message() -> None:
    rejected(b"\xc1", Reason.MALFORMED)


@pytest.mark.parametrize("schema", [None, 0, 2, "1", [1]])
def test_schema_missing_or_wrong(schema) -> None:
    header = without(status_header(), "schema") if schema is None else status_header(schema=schema)
    rejected(frame(header), Reason.SCHEMA)


@pytest.mark.parametrize("kind", [None, "nope", "Model", 5, ["model"], ""])
def test_unknown_kind(kind) -> None:
    header = without(status_header(), "kind") if kind is None else status_header(kind=kind)
    rejected(frame(header), Reason.KIND)


@pytest.mark.parametrize("expect", [ModelMessage, UpdateMessage, Receipt, AggregatorStatus])
def test_wrong_expected_kind(expect: type) -> None:
    rejected(frame(status_header()), Reason.KIND, expect=expect)


# -- update rejections -------------------------------------------------------------------------------

UPDATE_CASES = [
    # missing required fields
    ("device", without(update_header(), "device"), Reason.FIELD),
    ("update_id", without(update_header(), "update_id"), Reason.FIELD),
    ("base_version", without(update_header(), "base_version"), Reason.FIELD),
    ("num_examples", without(update_header(), "num_examples"), Reason.FIELD),
    ("codec", without(update_header(), "codec"), Reason.FIELD),
    # device names
    ("device", update_header(device=""), Reason.FIELD),
    ("device", update_header(device="all"), Reason.FIELD),
    ("device", update_header(device="a/b"), Reason.FIELD),
    ("device", update_header(device="+"), Reason.FIELD),
    ("device", update_header(device=".dev"), Reason.FIELD),
    ("device", update_header(device="d" * 65), Reason.FIELD),
    ("device", update_header(device=5), Reason.FIELD),
    ("device", update_header(device=None), Reason.FIELD),
    # update ids
    ("update_id", update_header(update_id=""), Reason.FIELD),
    ("update_id", update_header(update_id="a" * 65), Reason.FIELD),
    ("update_id", update_header(update_id="a/b"), Reason.FIELD),
    ("update_id", update_header(update_id="a b"), Reason.FIELD),
    ("update_id", update_header(update_id=7), Reason.FIELD),
    # ints: type and range, bools are not ints
    ("base_version", update_header(base_version=0), Reason.FIELD),
    ("base_version", update_header(base_version=-1), Reason.FIELD),
    ("base_version", update_header(base_version=MAX_VERSION + 1), Reason.FIELD),
    ("base_version", update_header(base_version=True), Reason.FIELD),
    ("base_version", update_header(base_version=4.0), Reason.FIELD),
    ("base_version", update_header(base_version="4"), Reason.FIELD),
    ("num_examples", update_header(num_examples=0), Reason.FIELD),
    ("num_examples", update_header(num_examples=2**31), Reason.FIELD),
    ("num_examples", update_header(num_examples=True), Reason.FIELD),
    ("num_examples", update_header(num_examples=None), Reason.FIELD),
    # codec field
    ("codec", update_header(codec=5), Reason.CODEC),
    ("codec", update_header(codec="c" * 33), Reason.CODEC),
    # metrics
    ("metrics", update_header(metrics={"loss": NAN}), Reason.NON_FINITE),
    ("metrics", update_header(metrics={"loss": INF}), Reason.NON_FINITE),
    ("metrics", update_header(metrics={"loss": -INF}), Reason.NON_FINITE),
    ("metrics", update_header(metrics={"loss": True}), Reason.FIELD),
    ("metrics", update_header(metrics={"loss": "0.5"}), Reason.FIELD),
    ("metrics", update_header(metrics={"loss": None}), Reason.FIELD),
    ("metrics", update_header(metrics={"m" * 65: 1.0}), Reason.FIELD),
    ("metrics", update_header(metrics={f"m{i}": 1.0 for i in range(MAX_METRICS + 1)}), Reason.FIELD),
    ("metrics", update_header(metrics=[1.0]), Reason.FIELD),
    ("metrics", update_header(metrics=None), Reason.FIELD),
    # created
    ("created", update_header(created=NAN), Reason.NON_FINITE),
    ("created", update_header(created=INF), Reason.NON_FINITE),
    ("created", update_header(created=-1.0), Reason.FIELD),
    ("created", update_header(created=1e12), Reason.FIELD),
    ("created", update_header(created=True), Reason.FIELD),
    ("created", update_header(created="now"), Reason.FIELD),
    # unknown fields
    ("extra", update_header(extra=1), Reason.FIELD),
    ("fleet", update_header(fleet="f1"), Reason.FIELD),
]


@pytest.mark.parametrize(("key", "header", "reason"), UPDATE_CASES)
def test_update_rejections(key: str, header: dict, reason: Reason) -> None:
    error = rejected(frame(header, DELTA), reason)
    assert key in error.detail, "the detail names the offending field"


def test_update_without_tensors() -> None:
    rejected(frame(update_header()), Reason.TENSORS)


# -- model rejections --------------------------------------------------------------------------------


def params_with(**changes) -> dict[str, np.ndarray]:
    params = model_params()
    for name, value in changes.items():
        name = name.replace("__", ".")
        if value is None:
            del params[name]
        else:
            params[name] = value
    return params


MODEL_CASES = [
    (model_header(version=0), model_params(), Reason.FIELD),
    (model_header(version=True), model_params(), Reason.FIELD),
    (model_header(version=MAX_VERSION + 1), model_params(), Reason.FIELD),
    (model_header(parent=4), model_params(), Reason.FIELD),  # parent must be older than version
    (model_header(parent=-1), model_params(), Reason.FIELD),
    (model_header(parent=False), model_params(), Reason.FIELD),
    (without(model_header(), "created"), model_params(), Reason.FIELD),
    (without(model_header(), "fleet"), model_params(), Reason.FIELD),
    (without(model_header(), "task"), model_params(), Reason.FIELD),
    (without(model_header(), "arch"), model_params(), Reason.FIELD),
    (model_header(created=INF), model_params(), Reason.NON_FINITE),
    (model_header(fleet="f" * 65), model_params(), Reason.FIELD),
    (model_header(fleet=5), model_params(), Reason.FIELD),
    (model_header(extra=1), model_params(), Reason.FIELD),
    (model_header(arch={"type": "cnn", "inputs": 3, "hidden": [2], "classes": 2}), model_params(), Reason.FIELD),
    (model_header(arch={"type": "mlp", "inputs": 3, "hidden": [2], "classes": 2, "act": "relu"}), model_params(), Reason.FIELD),
    (model_header(arch={"type": "mlp", "inputs": 3, "hidden": 2, "classes": 2}), model_params(), Reason.FIELD),
    (model_header(arch={"type": "mlp", "inputs": 0, "hidden": [2], "classes": 2}), model_params(), Reason.FIELD),
    (model_header(arch=[3, 2, 2]), model_params(), Reason.FIELD),
    # tensors against the arch
    (model_header(), params_with(dense1__bias=None), Reason.TENSORS),
    (model_header(), params_with(dense2__bias=np.zeros(2, np.float32)), Reason.TENSORS),
    (model_header(), {**params_with(dense1__bias=None), "dense1.b": np.zeros(2, np.float32)}, Reason.TENSORS),
    (model_header(), params_with(dense0__weight=np.zeros((2, 3), np.float32)), Reason.SHAPE),
    (model_header(), params_with(dense0__bias=np.zeros((2, 1), np.float32)), Reason.SHAPE),
    (model_header(), params_with(dense0__weight=np.zeros((3, 2), np.float64)), Reason.DTYPE),
    (model_header(), params_with(dense1__bias=np.zeros(2, np.float16)), Reason.DTYPE),
    (model_header(), params_with(dense0__bias=np.array([0.0, NAN], np.float32)), Reason.NON_FINITE),
    (model_header(), params_with(dense1__weight=np.array([[0.0, INF], [0.0, 0.0]], np.float32)), Reason.NON_FINITE),
    (model_header(), params_with(dense1__weight=np.array([[0.0, 0.0], [-INF, 0.0]], np.float32)), Reason.NON_FINITE),
]


@pytest.mark.parametrize(("header", "params", "reason"), MODEL_CASES)
def test_model_rejections(header: dict, params: dict, reason: Reason) -> None:
    rejected(frame(header, params), reason)


def test_model_without_tensors() -> None:
    rejected(frame(model_header()), Reason.TENSORS)


# -- task from the wire ------------------------------------------------------------------------------

TASK_WIRE_CASES = [
    ("not a map", Reason.FIELD),
    (task_wire(epochs=0), Reason.FIELD),
    (task_wire(epochs=1001), Reason.FIELD),
    (task_wire(epochs=True), Reason.FIELD),
    (task_wire(epochs=2.0), Reason.FIELD),
    (task_wire(batch_size=0), Reason.FIELD),
    (task_wire(batch_size=65537), Reason.FIELD),
    (task_wire(lr=0.0), Reason.FIELD),
    (task_wire(lr=-0.1), Reason.FIELD),
    (task_wire(lr=100.5), Reason.FIELD),
    (task_wire(lr=True), Reason.FIELD),
    (task_wire(lr="0.1"), Reason.FIELD),
    (task_wire(lr=NAN), Reason.NON_FINITE),
    (task_wire(lr=INF), Reason.NON_FINITE),
    (task_wire(deadline_s=0), Reason.FIELD),
    (task_wire(deadline_s=7 * 86400 + 1), Reason.FIELD),
    (task_wire(deadline_s=NAN), Reason.NON_FINITE),
    (task_wire(mode="turbo"), Reason.FIELD),
    (task_wire(max_staleness=3), Reason.FIELD),                     # sync mode takes no stale update
    (task_wire(mode="async", max_staleness=-1), Reason.FIELD),
    (task_wire(mode="async", max_staleness=1001), Reason.FIELD),
    (task_wire(mode="async", max_staleness=True), Reason.FIELD),
    (task_wire(mode="async", max_staleness=2.0), Reason.FIELD),
    (task_wire(codec=5), Reason.FIELD),
    (task_wire(codec="c" * 33), Reason.FIELD),
    (task_wire(extra=1), Reason.FIELD),
    (without(task_wire(), "codec"), Reason.FIELD),
    (without(task_wire(), "epochs"), Reason.FIELD),
]


@pytest.mark.parametrize(("task", "reason"), TASK_WIRE_CASES)
def test_task_rejections_from_the_wire(task, reason: Reason) -> None:
    rejected(frame(model_header(task=task), model_params()), reason)


def test_async_task_round_trips_and_sync_task_wire_is_unchanged() -> None:
    task = Task(mode="async", max_staleness=7, codec="int8")
    out = decode_message(ModelMessage(fleet="f1", version=2, parent=1, arch=ARCH, task=task, params=ARCH.init_params(0),
                                      created=1.0).encode(), max_bytes=BIG)
    assert out.task == task
    assert "max_staleness" not in Task().to_wire()  # older agents keep reading sync models
    assert Task(mode="async").to_wire()["max_staleness"] == 0


def test_command_round_trip_and_rejections() -> None:
    command = Command("pause", issued_at=1700000000.5, issued_by="ops-alice", reason="battery test")
    assert decode_message(command.encode(), max_bytes=BIG) == command
    header = {"kind": "command", "schema": 1, "command": "reboot", "issued_at": 1.0}
    rejected(encode_frame(header), Reason.FIELD)
    rejected(encode_frame({**header, "command": "pause", "issued_at": NAN}), Reason.NON_FINITE)
    rejected(encode_frame({**header, "command": "pause", "extra": 1}), Reason.FIELD)
    rejected(encode_frame({**header, "command": "pause"}, {"w": np.zeros(2, np.float32)}), Reason.TENSORS)


def test_device_status_paused_flag_round_trips_and_is_checked() -> None:
    status = DeviceStatus(device="d1", state="online", paused=True)
    assert decode_message(status.encode(), max_bytes=BIG).paused is True
    unpaused = DeviceStatus(device="d1", state="online")
    assert b"paused" not in unpaused.encode()
    rejected(encode_frame({"kind": "status", "schema": 1, "device": "d1", "state": "online", "paused": 1}), Reason.FIELD)


def test_task_bounds_from_the_wire_are_inclusive() -> None:
    task = task_wire(epochs=1000, batch_size=65536, lr=100, deadline_s=7 * 86400)
    out = decode_message(frame(model_header(task=task), model_params()), max_bytes=BIG)
    assert out.task == Task(epochs=1000, batch_size=65536, lr=100.0, deadline_s=604800.0)
    assert type(out.task.lr) is float


def test_task_defaults() -> None:
    assert Task() == Task(mode="sync", epochs=5, batch_size=16, lr=0.2, codec="fp32", deadline_s=60.0)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"epochs": 0},
        {"epochs": 1001},
        {"epochs": True},
        {"epochs": 2.0},
        {"batch_size": 0},
        {"batch_size": 65537},
        {"batch_size": False},
        {"lr": 0.0},
        {"lr": -1.0},
        {"lr": 100.01},
        {"lr": NAN},
        {"lr": INF},
        {"deadline_s": 0.0},
        {"deadline_s": -1.0},
        {"deadline_s": 604800.5},
        {"deadline_s": NAN},
        {"deadline_s": INF},
        {"mode": "batch"},
        {"max_staleness": 2},
        {"mode": "async", "max_staleness": -1},
    ],
    ids=str,
)
def test_task_constructor_rejects(kwargs: dict) -> None:
    with pytest.raises(ValueError, match=list(kwargs)[-1]):
        Task(**kwargs)


def test_task_constructor_inclusive_bounds() -> None:
    task = Task(epochs=1000, batch_size=65536, lr=100.0, deadline_s=604800.0)
    assert (task.epochs, task.batch_size, task.lr, task.deadline_s) == (1000, 65536, 100.0, 604800.0)
    assert Task(epochs=1, batch_size=1, lr=1e-9, deadline_s=1e-3).epochs == 1


# -- receipts ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("header", "reason"),
    [
        (receipt_header(reason=None), Reason.FIELD),
        (without(receipt_header(), "reason"), Reason.FIELD),
        (receipt_header(reason="bogus"), Reason.FIELD),
        (receipt_header(reason=5), Reason.FIELD),
        (receipt_header(status="maybe"), Reason.FIELD),
        (receipt_header(status=None), Reason.FIELD),
        (without(receipt_header(), "status"), Reason.FIELD),
        (receipt_header(model_version=-1), Reason.FIELD),
        (receipt_header(model_version=True), Reason.FIELD),
        (receipt_header(device="all"), Reason.FIELD),
        (receipt_header(update_id="u" * 65), Reason.FIELD),
        (receipt_header(detail="d" * (MAX_TEXT + 1)), Reason.FIELD),
        (receipt_header(detail=None), Reason.FIELD),
        (receipt_header(extra=1), Reason.FIELD),
    ],
)
def test_receipt_rejections(header: dict, reason: Reason) -> None:
    rejected(frame(header), reason)


@pytest.mark.parametrize("reason", [r.value for r in Reason])
def test_rejected_receipt_accepts_every_known_reason(reason: str) -> None:
    assert decode_message(frame(receipt_header(reason=reason)), max_bytes=BIG).reason == reason


def test_accepted_receipt_drops_any_reason() -> None:
    out = decode_message(frame(receipt_header(status="accepted", reason="stale")), max_bytes=BIG)
    assert out.status == "accepted" and out.reason is None


def test_receipt_with_tensors() -> None:
    rejected(frame(receipt_header(), {"w": np.zeros(1, np.float32)}), Reason.TENSORS)


# -- statuses ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("header", "reason"),
    [
        (status_header(state="busy"), Reason.FIELD),
        (without(status_header(), "state"), Reason.FIELD),
        (without(status_header(), "device"), Reason.FIELD),
        (status_header(device="all"), Reason.FIELD),
        (status_header(device="a b"), Reason.FIELD),
        (status_header(model_version=-1), Reason.FIELD),
        (status_header(model_version=False), Reason.FIELD),
        (status_header(software="s" * 65), Reason.FIELD),
        (status_header(platform="p" * 129), Reason.FIELD),
        (status_header(backend="b" * 33), Reason.FIELD),
        (status_header(since=NAN), Reason.NON_FINITE),
        (status_header(since=-5.0), Reason.FIELD),
        (status_header(counters={"x": INF}), Reason.NON_FINITE),
        (status_header(counters={"x": NAN}), Reason.NON_FINITE),
        (status_header(counters={"x": True}), Reason.FIELD),
        (status_header(counters=5), Reason.FIELD),
        (status_header(extra="x"), Reason.FIELD),
    ],
)
def test_device_status_rejections(header: dict, reason: Reason) -> None:
    rejected(frame(header), reason)


def test_device_status_with_tensors() -> None:
    rejected(frame(status_header(), {"w": np.zeros(1, np.float32)}), Reason.TENSORS)


@pytest.mark.parametrize(
    ("header", "reason"),
    [
        (without(agg_header(), "state"), Reason.FIELD),
        (agg_header(state="up"), Reason.FIELD),
        (agg_header(model_version=MAX_VERSION + 1), Reason.FIELD),
        (agg_header(model_version=1.0), Reason.FIELD),
        (agg_header(mode="m" * 33), Reason.FIELD),
        (agg_header(since=INF), Reason.NON_FINITE),
        (agg_header(counters={"rounds": NAN}), Reason.NON_FINITE),
        (agg_header(counters={"rounds": False}), Reason.FIELD),
        (agg_header(device="dev-1"), Reason.FIELD),
    ],
)
def test_aggregator_status_rejections(header: dict, reason: Reason) -> None:
    rejected(frame(header), reason)


def test_aggregator_status_with_tensors() -> None:
    rejected(frame(agg_header(), {"w": np.zeros(1, np.float32)}), Reason.TENSORS)


def test_rejection_detail_names_the_field() -> None:
    assert "num_examples" in rejected(frame(update_header(num_examples=0), DELTA), Reason.FIELD).detail
    assert "loss" in rejected(frame(update_header(metrics={"loss": NAN}), DELTA), Reason.NON_FINITE).detail
    assert "'extra'" in rejected(frame(update_header(extra=1), DELTA), Reason.FIELD).detail


# -- regressions -------------------------------------------------------------------------------------


def test_update_id_with_trailing_newline_is_refused() -> None:
    """Regression: a pattern ending with ``$`` matches before a trailing newline, so ``"u1\\n"`` passed."""
    rejected(frame(update_header(update_id="u1\n"), DELTA), Reason.FIELD)


# -- regressions: bugs these tests found, now fixed ------------------------------------------------


@pytest.mark.parametrize("schema", [True, 1.0], ids=["bool", "float"])
def test_regression_schema_true_or_1_0_is_taken_for_schema_1(schema) -> None:
    """``decode_message`` checks ``schema != SCHEMA``; ``True == 1`` and ``1.0 == 1`` in Python, so a
    header with ``schema: true`` or ``schema: 1.0`` is accepted as schema 1 (bools are not ints)."""
    rejected(frame(status_header(schema=schema)), Reason.SCHEMA)


@pytest.mark.parametrize("fleet", ["", "a/b", "+", "#", "bad fleet"])
def test_regression_model_fleet_is_not_checked_as_a_fleet_name(fleet: str) -> None:
    """``ModelMessage.from_frame`` reads ``fleet`` with ``_text(max_len=64)`` only, so an empty fleet or
    one with topic characters (``/``, ``+``, ``#``, space) is accepted, unlike every device field,
    which goes through ``check_device``."""
    rejected(frame(model_header(fleet=fleet), model_params()), Reason.FIELD)


@pytest.mark.parametrize("kwargs", [{"lr": True}, {"deadline_s": True}], ids=str)
def test_regression_task_constructor_accepts_bool_numbers(kwargs: dict) -> None:
    """``Task.__post_init__`` checks ``epochs`` and ``batch_size`` with ``type(...) is int`` but ``lr`` and
    ``deadline_s`` only with ``math.isfinite`` and a range, so ``True`` passes as 1.0."""
    with pytest.raises(ValueError):
        Task(**kwargs)


def test_status_counters_have_room_for_every_rejection_reason() -> None:
    counters = {f"rejected_{reason.value}": 1.0 for reason in Reason} | {f"c{i}": float(i) for i in range(40)}
    status = AggregatorStatus(state="online", model_version=3, counters=counters)
    assert decode_message(status.encode(), max_bytes=BIG).counters == counters
    device = DeviceStatus(device="d1", state="online", counters=counters)
    assert decode_message(device.encode(), max_bytes=BIG).counters == counters
