"""Large payloads handed over without paho's copies (broker/zerocopy.py): the in-place decoder
agrees with paho's on every field, only registered clients get it, and the aggregator ingests
such payloads on a real Mosquitto exactly as it ingests copies."""

from __future__ import annotations

import asyncio
import dataclasses
import struct
from pathlib import Path

import numpy as np
import pytest
from conftest import aggregator_online, unbounded
from paho.mqtt import _packet
from paho.mqtt.enums import MQTTProtocolVersion
from paho.mqtt.exception import MalformedPacket
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from fedmq.aggregator.config import AggregatorConfig
from fedmq.aggregator.daemon import Aggregator
from fedmq.aggregator.journal import UpdateJournal
from fedmq.aggregator.rounds import RoundPolicy
from fedmq.broker import topics, zerocopy
from fedmq.broker.architecture import MLPArchitecture
from fedmq.broker.messages import UpdateMessage, decode_message
from fedmq.broker.settings import BrokerSettings

V5, V311 = MQTTProtocolVersion.MQTTv5, MQTTProtocolVersion.MQTTv311


def paho_decode(header: int, packet: bytearray, protocol: MQTTProtocolVersion) -> _packet.PublishPacket:
    original = getattr(_packet.decode_publish, "original", _packet.decode_publish)
    return original(header, bytearray(packet), protocol)


def publish_packet(topic: bytes, payload: bytes, *, qos: int, mid: int, protocol: MQTTProtocolVersion,
                   properties: Properties | None = None) -> bytearray:
    """The variable header and payload of a PUBLISH as paho's reader holds them."""
    packet = bytearray(struct.pack("!H", len(topic)) + topic)
    if qos:
        packet += struct.pack("!H", mid)
    if protocol == V5:
        packet += (properties or Properties(PacketTypes.PUBLISH)).pack()
    return packet + payload


def with_properties() -> Properties:
    props = Properties(PacketTypes.PUBLISH)
    props.ContentType = "application/x-fedmq"
    props.UserProperty = [("device", "dev-7"), ("codec", "fp32")]
    props.MessageExpiryInterval = 3600
    return props


@pytest.mark.parametrize("protocol", [V5, V311], ids=["v5", "v3.1.1"])
@pytest.mark.parametrize("qos", [0, 1])
@pytest.mark.parametrize("size", [0, 1, zerocopy.LARGE + 3])
@pytest.mark.parametrize("props", [False, True], ids=["no-props", "props"])
def test_in_place_decoder_agrees_with_paho(protocol: MQTTProtocolVersion, qos: int, size: int, props: bool) -> None:
    payload = np.random.default_rng(size).bytes(size)
    packet = publish_packet(b"fedmq/f/update/dev-7", payload, qos=qos, mid=4242, protocol=protocol,
                            properties=with_properties() if props and protocol == V5 else None)
    header = 0x30 | (qos << 1) | 0x01  # retained
    expected = paho_decode(header | 0x08, packet, protocol)
    got = zerocopy.decode_publish_in_place(header | 0x08, packet, protocol)
    assert got.payload is packet and isinstance(got.payload, bytearray), "the payload is paho's buffer itself"
    assert bytes(got.payload) == payload == bytes(expected.payload)
    for field in ("dup", "qos", "retain", "topic", "mid"):
        assert getattr(got, field) == getattr(expected, field), field
    assert (got.properties is None) == (expected.properties is None)
    if expected.properties is not None:
        assert got.properties.json() == expected.properties.json()


@pytest.mark.parametrize("packet", [
    b"\x00",                                   # not even a topic length
    b"\x00\x10fedmq",                          # topic longer than the packet
    b"\x00\x05fedmq\x00",                      # qos 1 without a whole packet id
    b"\x00\x05fedmq\x00\x01\x20",              # properties longer than the packet
], ids=["no-length", "short-topic", "short-mid", "short-props"])
def test_malformed_packets_are_refused_like_paho_does(packet: bytes) -> None:
    decode = _packet.convert_exception(zerocopy.decode_publish_in_place)
    with pytest.raises(MalformedPacket):
        paho_decode(0x32, bytearray(packet), V5)
    with pytest.raises(MalformedPacket):
        decode(0x32, bytearray(packet), V5)


def test_an_empty_topic_is_refused_in_mqtt_3() -> None:
    with pytest.raises(MalformedPacket, match="empty"):
        zerocopy.decode_publish_in_place(0x30, bytearray(b"\x00\x00payload"), V311)


@pytest.mark.broker
@pytest.mark.asyncio
@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
async def test_only_registered_clients_get_paho_buffers(mqtt_broker: BrokerSettings, fleet: str, protocol: str) -> None:
    settings = dataclasses.replace(mqtt_broker, protocol=protocol)
    big, small = np.random.default_rng(1).bytes(zerocopy.LARGE * 3 + 5), b"small"
    topic = f"{topics.fleet_prefix(fleet)}/zc"
    async with settings.client(identifier=f"{fleet}-a") as registered, settings.client(identifier=f"{fleet}-b") as plain:
        assert zerocopy.zero_copy(registered)
        for client in (registered, plain):
            await client.subscribe(topic, qos=1)
        async with settings.client(identifier=f"{fleet}-pub") as publisher:
            await publisher.publish(topic, big, qos=1)
            await publisher.publish(topic, small, qos=1)
        got = {}
        async with asyncio.timeout(10):
            for name, client in (("registered", registered), ("plain", plain)):
                got[name] = [(await anext(client.messages)).payload for _ in range(2)]
    assert [type(p) for p in got["registered"]] == [bytearray, bytes]
    assert [type(p) for p in got["plain"]] == [bytes, bytes]
    assert [bytes(p) for p in got["registered"]] == got["plain"] == [big, small]


ARCH = MLPArchitecture(64, (256,), 10)  # 19,210 parameters: 77 KB updates, above LARGE


@pytest.mark.broker
@pytest.mark.asyncio
async def test_the_aggregator_ingests_paho_buffers(mqtt_broker: BrokerSettings, fleet: str, tmp_path: Path) -> None:
    devices = [f"dev{i}" for i in range(4)]
    rng = np.random.default_rng(9)
    bodies = {d: UpdateMessage(d, f"u-{d}", 1, 10 * (i + 1), "fp32",
                               {n: (rng.standard_normal(s) * 0.01).astype(np.float32)
                                for n, s in ARCH.param_shapes().items()}).encode()
              for i, d in enumerate(devices)}
    assert min(len(b) for b in bodies.values()) >= zerocopy.LARGE
    config = AggregatorConfig(fleet=fleet, state_dir=tmp_path / "agg", broker=mqtt_broker, client_id=f"{fleet}-agg",
                              arch=ARCH, seed=5, policy=RoundPolicy(min_updates=4, target_updates=4), max_rounds=1,
                              **unbounded())
    aggregator = Aggregator(config)
    payload_types: list[type] = []
    ingest = aggregator.ingest
    aggregator.ingest = lambda device, payload: (payload_types.append(type(payload)), ingest(device, payload))[1]  # type: ignore[method-assign]
    run = asyncio.create_task(aggregator.run(asyncio.Event()))
    await aggregator_online(mqtt_broker, fleet)
    async with mqtt_broker.client(identifier=f"{fleet}-devices") as client:
        for device, body in bodies.items():
            await client.publish(topics.update_topic(fleet, device), body, qos=1)
        await asyncio.wait_for(run, timeout=30)  # max_rounds=1: returns once v2 is out
    assert payload_types == [bytearray] * 4
    assert aggregator.model.version == 2 and aggregator.counters["accepted"] == 4
    records = UpdateJournal(tmp_path / "agg" / "journal").open_round(1)
    assert {device: payload for device, payload in records} == bodies, "the journal holds the bytes as sent"
    start = ARCH.init_params(5)
    weights = {d: 10 * (i + 1) for i, d in enumerate(devices)}
    for name in start:
        mean = sum(weights[d] * decode_message(bodies[d], max_bytes=1 << 24, expect=UpdateMessage).tensors[name]
                   .astype(np.float64) for d in devices) / sum(weights.values())
        np.testing.assert_allclose(aggregator.model.params[name], start[name] + mean, rtol=0, atol=1e-6)


# -- reading a large body with recv_into, on a real paho client over a socket pair ------------------

def _publish_packet_bytes(topic: bytes, payload: bytes, mid: int) -> bytes:
    body = bytes(publish_packet(topic, payload, qos=1, mid=mid, protocol=V5))
    length, remaining = bytearray(), len(body)
    while True:
        remaining, digit = divmod(remaining, 128)
        length.append(digit | (0x80 if remaining else 0))
        if not remaining:
            break
    return bytes([0x32]) + bytes(length) + body


class _Holder:
    """What zero_copy() reads from an aiomqtt client: its paho client."""

    def __init__(self, paho_client: object) -> None:
        self._client = paho_client


@pytest.fixture
def paho_on_socketpair() -> tuple[object, object, list]:
    import socket

    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    ours, broker_side = socket.socketpair()
    ours.setblocking(False)
    client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    received: list = []
    client.on_message = lambda _c, _u, message: received.append(message.payload)
    client._sock = ours
    assert zerocopy.zero_copy(_Holder(client))  # type: ignore[arg-type]
    yield client, broker_side, received
    ours.close()
    broker_side.close()


def test_a_body_that_arrives_in_pieces_is_read_into_one_buffer(paho_on_socketpair: tuple) -> None:
    client, broker_side, received = paho_on_socketpair
    payload = np.random.default_rng(2).bytes(zerocopy.LARGE * 4 + 11)
    packet = _publish_packet_bytes(b"fedmq/f/update/d", payload, 9)
    start = 0
    for cut in (1, 3, 70_000, 200_000):  # the header byte, the length bytes, then the body in pieces
        broker_side.sendall(packet[start:cut])
        start = cut
        client.loop_read()
        assert received == [], "nothing is handed over before the whole packet is there"
    broker_side.sendall(packet[200_000:])
    client.loop_read()
    assert len(received) == 1 and isinstance(received[0], bytearray) and received[0] == payload


def test_a_reconnect_mid_body_starts_the_next_packet_afresh(paho_on_socketpair: tuple) -> None:
    client, broker_side, received = paho_on_socketpair
    first = _publish_packet_bytes(b"fedmq/f/update/d", b"\x01" * (zerocopy.LARGE * 2), 1)
    second = _publish_packet_bytes(b"fedmq/f/update/d", b"\x02" * (zerocopy.LARGE * 3), 2)
    broker_side.sendall(first[:zerocopy.LARGE])  # the connection dies here
    client.loop_read()
    while True:  # drain what the dead connection left in the socket
        try:
            client._sock.recv(1 << 20)
        except BlockingIOError:
            break
    client._in_packet = {"command": 0, "have_remaining": 0, "remaining_count": [], "remaining_mult": 1,
                         "remaining_length": 0, "packet": bytearray(b""), "to_process": 0, "pos": 0}  # as reconnect() does
    broker_side.sendall(second)
    client.loop_read()
    assert received == [bytearray(b"\x02" * (zerocopy.LARGE * 3))], "no byte of the broken packet leaks into the next"


def test_receive_buffers_are_allocated_without_being_zeroed_first() -> None:
    # recv_into overwrites every byte, so zeroing a large buffer first (bytearray(n)) is a wasted
    # pass over fresh memory under the GIL; reused memory shows whether it was zeroed
    buffer = zerocopy.new_buffer(5)
    assert type(buffer) is bytearray and len(buffer) == 5
    buffer[:] = b"abcde"
    del buffer[-1:]  # what the reader does before paho appends the last byte
    buffer += b"z"
    assert buffer == bytearray(b"abcdz")
    for _ in range(20):
        filled = bytearray(b"\xab" * 4000)
        del filled
        if any(zerocopy.new_buffer(4000)):
            break
    else:
        pytest.fail("every receive buffer came zeroed: the allocation writes the memory first")
