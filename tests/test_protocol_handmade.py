"""docs/protocol.md is enough to write an agent: a hand-made client against the real aggregator.

The aggregator runs as the real CLI in a subprocess against a real Mosquitto. The device side uses
only paho-mqtt, msgpack and numpy, following docs/protocol.md: no fedmq import builds, parses or
sends anything. fedmq is read only afterwards, to check the aggregator's registry.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import paho.mqtt.client as paho
import pytest

from fedmq.broker.settings import BrokerSettings

pytestmark = pytest.mark.broker

WAIT = 5.0            # seconds: upper bound on every network wait
STARTUP_WAIT = 10.0   # the first model needs the aggregator's interpreter to start and connect
INPUTS, HIDDEN, CLASSES = 4, 3, 2

# -- the protocol, written from docs/protocol.md alone ------------------------------------------

WIRE_DTYPES = {"float32": "<f4", "float16": "<f2", "float64": "<f8", "int8": "i1", "uint8": "u1",
               "int16": "<i2", "int32": "<i4", "uint32": "<u4", "int64": "<i8"}


def topic(fleet: str, *levels: str) -> str:
    return "/".join(("fedmq", "v1", fleet, *levels))


def parse_frame(payload: bytes) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Header map, then (if it lists tensors) zero padding to a multiple of 8 and the tensor bytes."""
    unpacker = msgpack.Unpacker(raw=False, strict_map_key=True)
    unpacker.feed(payload)
    header = unpacker.unpack()
    offset = unpacker.tell()
    descriptors = header.pop("tensors", None)
    if descriptors is None:
        assert offset == len(payload), "bytes after a header without tensors"
        return header, {}
    padding = -offset % 8
    assert payload[offset:offset + padding] == b"\0" * padding
    offset += padding
    tensors = {}
    for desc in descriptors:
        dtype = np.dtype(WIRE_DTYPES[desc["dtype"]])
        count = int(np.prod(desc["shape"], dtype=np.int64))
        tensors[desc["name"]] = np.frombuffer(payload, dtype=dtype, count=count, offset=offset).reshape(desc["shape"])
        offset += count * dtype.itemsize
    assert offset == len(payload), "bytes after the last tensor"
    return header, tensors


def build_frame(header: dict[str, Any], tensors: dict[str, np.ndarray]) -> bytes:
    descriptors = [{"name": name, "dtype": "float32", "shape": list(array.shape)} for name, array in tensors.items()]
    head = msgpack.packb({**header, "tensors": descriptors}, use_bin_type=True)
    body = b"".join(np.ascontiguousarray(array, dtype="<f4").tobytes() for array in tensors.values())
    return head + b"\0" * (-len(head) % 8) + body


def update_frame(device: str, update_id: str, base_version: int, tensors: dict[str, np.ndarray], *,
                 num_examples: int = 6, metrics: dict[str, float] | None = None) -> bytes:
    header = {"kind": "update", "schema": 1, "device": device, "update_id": update_id,
              "base_version": base_version, "num_examples": num_examples, "codec": "fp32",
              "metrics": metrics or {}, "created": time.time()}
    return build_frame(header, tensors)


class HandmadeDevice:
    """A synchronous paho client that queues what arrives on the model and receipt topics."""

    def __init__(self, broker: BrokerSettings, fleet: str, device: str) -> None:
        self.fleet, self.device = fleet, device
        self.models: queue.Queue[bytes] = queue.Queue()
        self.receipts: queue.Queue[bytes] = queue.Queue()
        self.agg_status: queue.Queue[bytes] = queue.Queue()
        self._subscribed: queue.Queue[bool] = queue.Queue()
        self.client = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=device,
                                  protocol=paho.MQTTv311, clean_session=True)
        if broker.username:
            self.client.username_pw_set(broker.username, broker.password)
        offline = msgpack.packb({"kind": "status", "schema": 1, "device": device, "state": "offline"})
        self.client.will_set(topic(fleet, "status", device), offline, qos=1, retain=True)
        self.client.on_connect = self._on_connect
        self.client.on_subscribe = lambda *args: self._subscribed.put(True)
        self.client.on_message = self._on_message
        self.broker = broker

    def _on_connect(self, client: paho.Client, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        if reason.is_failure:
            return
        client.subscribe([(topic(self.fleet, "model"), 1), (topic(self.fleet, "receipt", self.device), 1),
                          (topic(self.fleet, "aggregator", "status"), 1)])
        online = msgpack.packb({"kind": "status", "schema": 1, "device": self.device, "state": "online",
                                "model_version": 0, "software": "handmade/0"})
        client.publish(topic(self.fleet, "status", self.device), online, qos=1, retain=True)

    def _on_message(self, client: paho.Client, userdata: Any, message: paho.MQTTMessage) -> None:
        levels = message.topic.split("/")
        if levels[3:] == ["model"]:
            self.models.put(message.payload)
        elif levels[3:] == ["receipt", self.device]:
            self.receipts.put(message.payload)
        elif levels[3:] == ["aggregator", "status"]:
            self.agg_status.put(message.payload)

    def __enter__(self) -> HandmadeDevice:
        self.client.connect(self.broker.host, self.broker.port, keepalive=30)
        self.client.loop_start()
        self._subscribed.get(timeout=WAIT)
        return self

    def __exit__(self, *exc: object) -> None:
        self.client.disconnect()
        self.client.loop_stop()

    def publish_update(self, payload: bytes) -> None:
        info = self.client.publish(topic(self.fleet, "update", self.device), payload, qos=1)
        info.wait_for_publish(timeout=WAIT)
        assert info.is_published()

    def next_model(self, timeout: float = WAIT) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        return parse_frame(self.models.get(timeout=timeout))

    def next_receipt(self) -> dict[str, Any]:
        header, tensors = parse_frame(self.receipts.get(timeout=WAIT))
        assert tensors == {}
        return header


# -- fixtures -------------------------------------------------------------------------------------

def _broker_url(broker: BrokerSettings) -> str:
    host = f"[{broker.host}]" if ":" in broker.host else broker.host
    return f"mqtt://{host}:{broker.port}?protocol={broker.protocol}"


@pytest.fixture
def aggregator(tmp_path: Path, mqtt_broker: BrokerSettings, fleet: str) -> Iterator[Path]:
    """The real ``fedmq aggregator`` CLI for ``fleet``; yields its state directory."""
    state_dir = tmp_path / "aggregator"
    credentials = ""
    if mqtt_broker.username:
        credentials += f"username = {json.dumps(mqtt_broker.username)}\n"
    if mqtt_broker.password:
        credentials += f"password = {json.dumps(mqtt_broker.password)}\n"
    config = tmp_path / "aggregator.toml"
    config.write_text(
        f'fleet = "{fleet}"\n'
        f"state_dir = {json.dumps(str(state_dir))}\n"
        f'client_id = "agg-{fleet}"\n'
        "[broker]\n"
        f"url = {json.dumps(_broker_url(mqtt_broker))}\n"
        f"{credentials}"
        "[model]\n"
        f"inputs = {INPUTS}\nhidden = [{HIDDEN}]\nclasses = {CLASSES}\nseed = 7\n"
        "[task]\n"
        'mode = "sync"\nepochs = 2\nbatch_size = 8\nlr = 0.1\ncodec = "fp32"\ndeadline_s = 60.0\n'
        "[rounds]\n"
        "min_updates = 1\ntarget_updates = 1\nmax_rounds = 0\n",
        encoding="utf-8",
    )
    # FEDMQ_* variables override config keys: keep the caller's environment out of this run
    env = {k: v for k, v in os.environ.items() if not k.startswith("FEDMQ_")}
    log_path = tmp_path / "aggregator.log"
    with open(log_path, "wb") as log_file:
        process = subprocess.Popen(
            [sys.executable, "-m", "fedmq.cli", "--log-level", "info", "aggregator", "--config", str(config)],
            stdout=log_file, stderr=subprocess.STDOUT, env=env,
        )
        try:
            yield state_dir
            assert process.poll() is None, f"aggregator exited early:\n{log_path.read_text()}"
        finally:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
                try:
                    process.wait(timeout=WAIT)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait(timeout=WAIT)


# -- the test -------------------------------------------------------------------------------------

def test_handmade_agent_speaks_the_documented_protocol(aggregator: Path, mqtt_broker: BrokerSettings,
                                                       fleet: str) -> None:
    device = f"dev-{fleet}"
    shapes = {"dense0.weight": (INPUTS, HIDDEN), "dense0.bias": (HIDDEN,),
              "dense1.weight": (HIDDEN, CLASSES), "dense1.bias": (CLASSES,)}
    with HandmadeDevice(mqtt_broker, fleet, device) as dev:
        # the retained model v1: manifest and parameters, exactly the documented tensors
        header, initial = dev.next_model(timeout=STARTUP_WAIT)
        assert header["kind"] == "model" and header["schema"] == 1 and header["fleet"] == fleet
        assert (header["version"], header["parent"]) == (1, 0)
        assert header["arch"] == {"type": "mlp", "inputs": INPUTS, "hidden": [HIDDEN], "classes": CLASSES}
        assert header["task"] == {"mode": "sync", "epochs": 2, "batch_size": 8, "lr": 0.1, "codec": "fp32",
                                  "deadline_s": 60.0}
        assert list(initial) == list(shapes)
        assert {name: t.shape for name, t in initial.items()} == shapes
        assert all(t.dtype == np.dtype("<f4") for t in initial.values())
        assert not initial["dense0.bias"].any() and initial["dense0.weight"].any()

        status = msgpack.unpackb(dev.agg_status.get(timeout=WAIT), raw=False)
        assert status["kind"] == "aggregator_status" and status["state"] == "online"
        assert status["model_version"] == 1

        # garbage: not a msgpack map, so the update id cannot be known
        dev.publish_update(b"\x93not a fedmq frame")
        receipt = dev.next_receipt()
        assert receipt["kind"] == "receipt" and receipt["device"] == device
        assert (receipt["status"], receipt["reason"], receipt["update_id"]) == ("rejected", "malformed", "")
        assert receipt["model_version"] == 1

        # a well-formed frame whose first weight is transposed: (HIDDEN, INPUTS) instead of (INPUTS, HIDDEN)
        wrong = {name: np.zeros(shape, dtype=np.float32) for name, shape in shapes.items()}
        wrong["dense0.weight"] = np.zeros((HIDDEN, INPUTS), dtype=np.float32)
        dev.publish_update(update_frame(device, "bad-shape-1", 1, wrong))
        receipt = dev.next_receipt()
        assert (receipt["status"], receipt["reason"]) == ("rejected", "shape")
        assert "dense0.weight" in receipt["detail"]

        # the good update: small distinct constants, so a swapped or dropped tensor shows
        delta = {name: np.float32(0.01 * (k + 1)) + np.arange(np.prod(shape), dtype=np.float32).reshape(shape) / 1000
                 for k, (name, shape) in enumerate(shapes.items())}
        good = update_frame(device, "v1-handmade-1", 1, delta, num_examples=6, metrics={"loss": 0.25, "accuracy": 0.5})
        dev.publish_update(good)
        receipt = dev.next_receipt()
        assert receipt == {"kind": "receipt", "schema": 1, "device": device, "update_id": "v1-handmade-1",
                           "status": "accepted", "model_version": 1, "reason": None, "detail": ""}

        # target_updates = 1: the round closes on that update and v2 = v1 + delta (server lr 1, one update)
        header, params = dev.next_model()
        assert (header["version"], header["parent"]) == (2, 1)
        assert list(params) == list(shapes)
        for name in shapes:
            expected = initial[name] + delta[name]
            np.testing.assert_allclose(params[name], expected, rtol=0, atol=1e-6, err_msg=name)

        # the same update again is already counted; a new one computed from v1 is now stale
        dev.publish_update(good)
        receipt = dev.next_receipt()
        assert (receipt["status"], receipt["reason"], receipt["update_id"]) == ("rejected", "duplicate", "v1-handmade-1")
        assert receipt["model_version"] == 2
        dev.publish_update(update_frame(device, "v1-handmade-2", 1, delta))
        receipt = dev.next_receipt()
        assert (receipt["status"], receipt["reason"], receipt["update_id"]) == ("rejected", "stale", "v1-handmade-2")
        assert dev.models.empty(), "a rejected update must not produce a model"

    # afterwards, with fedmq's own files: the registry counted exactly the one accepted update
    with contextlib.closing(sqlite3.connect(aggregator / "registry.sqlite3")) as db:
        rows = db.execute("SELECT version, parent, info FROM versions ORDER BY version").fetchall()
    assert [(v, p) for v, p, _ in rows] == [(1, 0), (2, 1)]
    info = json.loads(rows[1][2])
    assert (info["updates"], info["examples"]) == (1, 6)
    assert info["train_loss"] == pytest.approx(0.25) and info["train_accuracy"] == pytest.approx(0.5)
