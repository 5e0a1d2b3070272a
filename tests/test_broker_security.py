"""A real Mosquitto with the rendered fedmq config and ACL: who may connect, publish and read what.

A denied PUBLISH is dropped silently and a forbidden SUBSCRIBE is "granted" but delivers nothing,
so every denial is observed: subscribers holding the read right watch ``fedmq/v1/{fleet}/#``, the
forbidden messages are published first, then a control message that must arrive; once it has,
the subscribers listen a little longer and nothing forbidden may have come.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import socket
import ssl
import subprocess
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import aiomqtt
import numpy as np
import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from fedmq.broker import pki, topics
from fedmq.broker.errors import ConfigError
from fedmq.broker.local import find_free_port, mosquitto_binary
from fedmq.broker.mosquitto_config import TlsFiles, render_acl, render_config
from fedmq.broker.settings import BrokerSettings

pytestmark = pytest.mark.broker

HOST = "127.0.0.1"
WAIT = 5.0  # upper bound on every network wait
QUIET = 0.5  # how long to keep listening for forbidden messages once the control message is in
FLEET = "secfleet"
AGGREGATOR = "aggregator"
OPERATOR = "ops-alice"
DEVICES = ("dev-a", "dev-b", "dev-c")
EVERYTHING = f"{topics.fleet_prefix(FLEET)}/#"
NO_BROKER = "Mosquitto is needed for the broker security tests: apt-get install -y mosquitto"

Received = set[tuple[str, bytes]]


@dataclass(frozen=True)
class Broker:
    port: int
    pki: Path
    log: Path


@contextlib.contextmanager
def mosquitto_process(workdir: Path, config: str, port: int, *,
                      keep_root: bool = True) -> Iterator[tuple[subprocess.Popen[bytes], Path]]:
    """Run ``mosquitto -c`` on ``config`` until the block ends; yields the process and its log path.

    As root, Mosquitto drops to the ``mosquitto`` user, which cannot enter pytest's 0700
    ``tmp_path``: ``keep_root`` adds ``user root`` then (the test of the dropped-privilege
    deployment turns it off and uses a world-readable directory).
    """
    binary = mosquitto_binary()
    if binary is None:
        pytest.fail(NO_BROKER)
    if keep_root and os.geteuid() == 0:
        config += "user root\n"
    conf, log = workdir / "mosquitto.conf", workdir / "mosquitto.log"
    conf.write_text(config + "log_dest stderr\nlog_type all\n", encoding="utf-8")
    conf.chmod(0o644)
    with log.open("wb") as log_handle:
        proc = subprocess.Popen([binary, "-c", str(conf)], stdin=subprocess.DEVNULL, stdout=log_handle,
                                stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + WAIT
        while True:
            if proc.poll() is not None:
                pytest.fail(f"Mosquitto exited with code {proc.returncode}:\n{log.read_text(errors='replace')[-3000:]}")
            with contextlib.suppress(OSError), socket.create_connection((HOST, port), timeout=0.2):
                break
            if time.monotonic() > deadline:
                pytest.fail(f"Mosquitto did not open port {port}:\n{log.read_text(errors='replace')[-3000:]}")
            time.sleep(0.02)
        yield proc, log
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=WAIT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=WAIT)


@contextlib.contextmanager
def running_mosquitto(workdir: Path, config: str, port: int, *, keep_root: bool = True) -> Iterator[Path]:
    """:func:`mosquitto_process` for tests that only need the log path."""
    with mosquitto_process(workdir, config, port, keep_root=keep_root) as (_, log):
        yield log


def make_pki(directory: Path) -> Path:
    pki.init_ca(directory, fleet=FLEET)
    pki.issue_server(directory, hostnames=["localhost"], ips=[HOST])
    for device in DEVICES:
        pki.issue_device(directory, device)
    pki.issue_client(directory, AGGREGATOR, role="aggregator")
    pki.issue_client(directory, OPERATOR, role="operator")
    return directory


@pytest.fixture(scope="module")
def fleet_pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def tls_broker(fleet_pki: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Broker]:
    workdir = tmp_path_factory.mktemp("tls-broker")
    acl = workdir / "acl"
    acl.write_text(render_acl(FLEET, aggregator=AGGREGATOR, operators=[OPERATOR]), encoding="utf-8")
    port = find_free_port()
    config = render_config(fleet=FLEET, port=port, tls=pki.server_tls_files(fleet_pki), acl_path=acl,
                           crl_file=pki.crl_file(fleet_pki))
    with running_mosquitto(workdir, config, port) as log:
        yield Broker(port=port, pki=fleet_pki, log=log)


def settings_for(broker: Broker, identity: str, *, pki_dir: Path | None = None) -> BrokerSettings:
    directory = pki_dir or broker.pki
    cert, key = pki.device_paths(directory, identity)
    if not cert.exists():
        cert, key = pki.client_paths(directory, identity)
    return BrokerSettings(host=HOST, port=broker.port, protocol="5", tls=True, ca_file=str(broker.pki / "ca.pem"),
                          cert_file=str(cert), key_file=str(key), connect_timeout=WAIT)


def connect(broker: Broker, identity: str, *, identifier: str | None = None,
            will: aiomqtt.Will | None = None) -> aiomqtt.Client:
    return settings_for(broker, identity).client(identifier=identifier or identity, will=will)


async def receive(client: aiomqtt.Client, expected: Received) -> Received:
    """Everything ``client`` gets until all of ``expected`` came (within WAIT), then QUIET seconds more."""
    got: Received = set()
    quiet_until: float | None = None
    loop = asyncio.get_running_loop()
    try:
        async with asyncio.timeout(WAIT) as timeout:
            async for message in client.messages:
                assert isinstance(message.payload, bytes)
                got.add((str(message.topic), message.payload))
                if quiet_until is None and expected <= got:
                    quiet_until = loop.time() + QUIET
                    timeout.reschedule(quiet_until)
    except TimeoutError:
        pass
    assert expected <= got, f"control messages missing: {sorted(expected - got)}; got {sorted(got)}"
    return got


def token() -> bytes:
    return uuid.uuid4().hex.encode()


@pytest.mark.asyncio
async def test_device_cannot_publish_outside_its_own_update_and_status(tls_broker: Broker) -> None:
    forbidden = [
        topics.update_topic(FLEET, "dev-b"),
        topics.status_topic(FLEET, "dev-b"),
        topics.model_topic(FLEET),
        topics.command_topic(FLEET, "dev-b"),
        topics.broadcast_command_topic(FLEET),
        topics.freeze_topic(FLEET, "dev-a"),  # not even its own: commands come from operators
        topics.broadcast_freeze_topic(FLEET),
        topics.receipt_topic(FLEET, "dev-b"),
        topics.receipt_topic(FLEET, "dev-a"),  # not even its own receipts: those come from the aggregator
        topics.artifact_topic(FLEET, "ab" * 32),
        topics.aggregator_status_topic(FLEET),
        topics.ops_request_topic(FLEET, "dev-a"),
        topics.ops_request_topic(FLEET, OPERATOR),
        topics.ops_response_topic(FLEET, OPERATOR),
    ]
    marker = token()
    async with (
        connect(tls_broker, AGGREGATOR) as aggregator,
        connect(tls_broker, OPERATOR) as operator,
        connect(tls_broker, "dev-b") as other_device,
        connect(tls_broker, "dev-a") as device,
    ):
        for watcher in (aggregator, operator, other_device, device):
            await watcher.subscribe(EVERYTHING, qos=1)
        for topic in forbidden:
            await device.publish(topic, marker, qos=1)  # returns normally: Mosquitto drops it
        controls = {
            "aggregator": (topics.update_topic(FLEET, "dev-a"), token()),
            "device": (topics.receipt_topic(FLEET, "dev-a"), token()),
            "other_device": (topics.receipt_topic(FLEET, "dev-b"), token()),
            "operator": (topics.ops_response_topic(FLEET, OPERATOR), token()),
        }
        await device.publish(*controls["aggregator"], qos=1)
        for name in ("device", "other_device", "operator"):
            await aggregator.publish(*controls[name], qos=1)
        received = await asyncio.gather(
            receive(aggregator, {controls["aggregator"]}),
            receive(device, {controls["device"]}),
            receive(other_device, {controls["other_device"]}),
            receive(operator, {controls["operator"]}),
        )
    leaked = sorted(topic for got in received for topic, payload in got if payload == marker)
    assert leaked == []


@pytest.mark.asyncio
async def test_device_publishes_its_update_and_status_and_reads_model_own_receipt_and_commands(
    tls_broker: Broker,
) -> None:
    update, status = (topics.update_topic(FLEET, "dev-a"), token()), (topics.status_topic(FLEET, "dev-a"), token())
    model = (topics.model_topic(FLEET), token())
    artifact = (topics.artifact_topic(FLEET, "cd" * 32), token())
    own_receipt, other_receipt = (topics.receipt_topic(FLEET, "dev-a"), token()), (topics.receipt_topic(FLEET, "dev-b"), token())
    own_command, other_command = (topics.command_topic(FLEET, "dev-a"), token()), (topics.command_topic(FLEET, "dev-b"), token())
    broadcast = (topics.broadcast_command_topic(FLEET), token())
    own_freeze, other_freeze = (topics.freeze_topic(FLEET, "dev-a"), token()), (topics.freeze_topic(FLEET, "dev-b"), token())
    broadcast_freeze = (topics.broadcast_freeze_topic(FLEET), token())
    async with connect(tls_broker, AGGREGATOR) as aggregator, connect(tls_broker, OPERATOR) as operator, \
            connect(tls_broker, "dev-a") as device:
        await aggregator.subscribe(topics.updates_filter(FLEET), qos=1)
        await aggregator.subscribe(topics.statuses_filter(FLEET), qos=1)
        await device.subscribe(EVERYTHING, qos=1)
        await device.publish(*update, qos=1)
        await device.publish(*status, qos=1)
        for message in (other_receipt, model, artifact, own_receipt):
            await aggregator.publish(*message, qos=1)
        for message in (other_command, other_freeze, own_command, broadcast, own_freeze, broadcast_freeze):
            await operator.publish(*message, qos=1)
        at_aggregator, at_device = await asyncio.gather(
            receive(aggregator, {update, status}),
            receive(device, {model, artifact, own_receipt, own_command, broadcast, own_freeze, broadcast_freeze}),
        )
    assert other_receipt not in at_device and other_command not in at_device and other_freeze not in at_device
    assert {update, status} <= at_aggregator


@pytest.mark.asyncio
async def test_operator_and_aggregator_rights(tls_broker: Broker) -> None:
    request = (topics.ops_request_topic(FLEET, OPERATOR), token())
    response = (topics.ops_response_topic(FLEET, OPERATOR), token())
    aggregator_status = (topics.aggregator_status_topic(FLEET), token())
    marker = token()
    # An operator is no device: the device patterns would let it post update/<its name>; the ACL denies it.
    operator_forbidden = [topics.ops_request_topic(FLEET, "ops-bob"), topics.update_topic(FLEET, OPERATOR),
                          topics.status_topic(FLEET, OPERATOR), topics.model_topic(FLEET),
                          topics.receipt_topic(FLEET, "dev-a")]
    # (the aggregator may write device statuses: it deletes an oversized retained one, see render_acl)
    aggregator_forbidden = [topics.update_topic(FLEET, AGGREGATOR), topics.status_topic(FLEET, AGGREGATOR),
                            topics.command_topic(FLEET, "dev-a"), topics.broadcast_command_topic(FLEET),
                            topics.freeze_topic(FLEET, "dev-a"), topics.broadcast_freeze_topic(FLEET)]
    async with connect(tls_broker, AGGREGATOR) as aggregator, connect(tls_broker, OPERATOR) as operator, \
            connect(tls_broker, "dev-a") as device:
        for watcher in (aggregator, operator, device):
            await watcher.subscribe(EVERYTHING, qos=1)
        for topic in operator_forbidden:
            await operator.publish(topic, marker, qos=1)
        for topic in aggregator_forbidden:
            await aggregator.publish(topic, marker, qos=1)
        await operator.publish(*request, qos=1)
        await aggregator.publish(*response, qos=1)
        await aggregator.publish(*aggregator_status, qos=1)
        received = await asyncio.gather(
            receive(aggregator, {request}),
            receive(operator, {response, aggregator_status}),
            receive(device, {aggregator_status}),
        )
    assert sorted(topic for got in received for topic, payload in got if payload == marker) == []


@pytest.mark.asyncio
async def test_a_device_cannot_borrow_another_devices_client_id(tls_broker: Broker) -> None:
    # dev-a's certificate with client id "dev-b": the broker renames it to dev-a
    # (use_username_as_clientid), so dev-b keeps its session and dev-a gains none of its topics.
    stolen, own = (topics.update_topic(FLEET, "dev-b"), token()), (topics.update_topic(FLEET, "dev-a"), token())
    still_there = (topics.receipt_topic(FLEET, "dev-b"), token())
    async with connect(tls_broker, AGGREGATOR) as aggregator, connect(tls_broker, "dev-b") as victim:
        await aggregator.subscribe(topics.updates_filter(FLEET), qos=1)
        await victim.subscribe(topics.receipt_topic(FLEET, "dev-b"), qos=1)
        async with connect(tls_broker, "dev-a", identifier="dev-b") as impostor:
            await impostor.publish(*stolen, qos=1)
            await impostor.publish(*own, qos=1)
            at_aggregator = await receive(aggregator, {own})
        await aggregator.publish(*still_there, qos=1)
        await receive(victim, {still_there})  # not kicked off by the impostor's CONNECT
    assert stolen not in at_aggregator


@pytest.mark.asyncio
async def test_clients_without_a_valid_fleet_certificate_are_refused(tls_broker: Broker, tmp_path: Path) -> None:
    ca_file = str(tls_broker.pki / "ca.pem")
    rogue = make_pki(tmp_path / "rogue")  # the same names under another CA
    server_cert, server_key = tls_broker.pki / "server" / "server.pem", tls_broker.pki / "server" / "server.key"
    # Under TLS 1.3 the broker rejects a client certificate after the client's side of the
    # handshake is done; aiomqtt then only gives up when its connect timeout expires (paho logs
    # the TLS alert). A short timeout keeps this quick; the control below shows it is enough.
    refused_within = 2.0

    def tls_as(cert: Path | None, key: Path | None) -> BrokerSettings:
        return BrokerSettings(host=HOST, port=tls_broker.port, protocol="5", tls=True, ca_file=ca_file,
                              cert_file=str(cert) if cert else None, key_file=str(key) if key else None,
                              connect_timeout=refused_within)

    attempts = {
        "no client certificate": tls_as(None, None),
        "certificate from another CA": tls_as(rogue / "devices" / "dev-a.pem", rogue / "devices" / "dev-a.key"),
        "server certificate used as a client": tls_as(server_cert, server_key),
        "anonymous, no TLS": BrokerSettings(host=HOST, port=tls_broker.port, protocol="5",
                                            connect_timeout=refused_within),
        "username without TLS": BrokerSettings(host=HOST, port=tls_broker.port, protocol="5", username=AGGREGATOR,
                                               password="guess", connect_timeout=refused_within),
    }

    async def attempt(name: str, settings: BrokerSettings) -> str | None:
        try:
            async with settings.client(identifier="dev-a"):
                return f"{name}: connected"
        except aiomqtt.MqttError:
            return None

    outcomes = await asyncio.gather(*(attempt(name, settings) for name, settings in attempts.items()))
    assert [outcome for outcome in outcomes if outcome] == []
    async with tls_as(*pki.device_paths(tls_broker.pki, "dev-a")).client(identifier="dev-a"):
        pass  # the fleet's own certificate connects within the same timeout


def crash_with_will(settings: BrokerSettings, identifier: str, will_topic: str, payload: bytes) -> None:
    """Connect with a Last Will, then lose the connection without DISCONNECT (as on power loss).

    paho's network loop is driven by hand: its background thread would wait a reconnect delay
    before it can be stopped.
    """
    connected, disconnected = threading.Event(), threading.Event()
    client = paho.Client(CallbackAPIVersion.VERSION2, client_id=identifier, protocol=paho.MQTTv5)
    context = ssl.create_default_context(cafile=settings.ca_file)
    assert settings.cert_file is not None
    context.load_cert_chain(settings.cert_file, settings.key_file)
    client.tls_set_context(context)
    client.will_set(will_topic, payload, qos=1, retain=True)
    client.on_connect = lambda *args: connected.set()
    client.on_disconnect = lambda *args: disconnected.set()

    def loop_until(event: threading.Event, what: str) -> None:
        deadline = time.monotonic() + WAIT
        while not event.is_set():
            assert time.monotonic() < deadline, what
            client.loop(timeout=0.02)

    try:
        client.connect(HOST, settings.port, keepalive=30)
        loop_until(connected, "no CONNACK")
        sock = client.socket()
        assert sock is not None
        sock.shutdown(socket.SHUT_RDWR)  # no DISCONNECT packet: the broker must send the will
        loop_until(disconnected, "the client did not notice the lost connection")
    finally:
        sock = client.socket()
        if sock is not None:
            sock.close()


@pytest.mark.asyncio
async def test_device_last_will_on_its_own_status_arrives_a_forged_one_does_not(tls_broker: Broker) -> None:
    own = (topics.status_topic(FLEET, "dev-c"), b"offline " + token())
    forged = (topics.status_topic(FLEET, "dev-b"), b"offline " + token())
    settings = settings_for(tls_broker, "dev-c")
    async with connect(tls_broker, AGGREGATOR) as aggregator:
        await aggregator.subscribe(topics.statuses_filter(FLEET), qos=1)
        # Mosquitto accepts any will topic at CONNECT and checks it, with the client's identity,
        # when it publishes the will: the forged one is dropped.
        await asyncio.to_thread(crash_with_will, settings, "dev-c", *forged)
        await asyncio.to_thread(crash_with_will, settings, "dev-c", *own)
        got = await receive(aggregator, {own})
    assert forged not in got
    async with connect(tls_broker, AGGREGATOR) as late:  # and it is retained, like the agent's
        await late.subscribe(topics.status_topic(FLEET, "dev-c"), qos=1)
        await receive(late, {own})


@pytest.mark.asyncio
async def test_password_file_variant(tmp_path: Path) -> None:
    password_file = pki.write_password_file(tmp_path / "passwd", {"dev-a": "right-pw", AGGREGATOR: "agg-pw"})
    acl = tmp_path / "acl"
    acl.write_text(render_acl(FLEET, aggregator=AGGREGATOR), encoding="utf-8")
    port = find_free_port()
    config = render_config(fleet=FLEET, port=port, tls=None, password_file=password_file, acl_path=acl)
    assert "require_certificate" not in config and "allow_anonymous false" in config

    def login(username: str | None, password: str | None) -> BrokerSettings:
        return BrokerSettings(host=HOST, port=port, protocol="5", username=username, password=password,
                              connect_timeout=WAIT)

    with running_mosquitto(tmp_path, config, port):
        for username, password in (("dev-a", "wrong-pw"), ("dev-a", None), ("nobody", "right-pw"), (None, None)):
            with pytest.raises(aiomqtt.MqttError):
                async with login(username, password).client(identifier="dev-a"):
                    pytest.fail(f"{username}/{password} connected")
        update, stolen = (topics.update_topic(FLEET, "dev-a"), token()), (topics.update_topic(FLEET, "dev-b"), token())
        async with login(AGGREGATOR, "agg-pw").client(identifier=AGGREGATOR) as aggregator, \
                login("dev-a", "right-pw").client(identifier="dev-a") as device:
            await aggregator.subscribe(topics.updates_filter(FLEET), qos=1)
            await device.publish(*stolen, qos=1)
            await device.publish(*update, qos=1)
            got = await receive(aggregator, {update})
        assert stolen not in got


@pytest.mark.asyncio
async def test_broker_running_as_its_own_user_reads_a_key_issued_for_its_group() -> None:
    # Mosquitto 2.0 started as root drops to user mosquitto *before* loading its TLS files and
    # ACL: a root-only 0600 server key stops it. key_group="mosquitto" is the deployment answer.
    if os.geteuid() != 0:
        pytest.skip("needs root: only then does Mosquitto switch to the mosquitto user")
    workdir = Path(tempfile.mkdtemp(prefix="fedmq-security-"))  # pytest's tmp_path is 0700
    try:
        workdir.chmod(0o755)
        directory = workdir / "pki"
        pki.init_ca(directory, fleet=FLEET)
        pki.issue_server(directory, hostnames=["localhost"], key_group="mosquitto")
        pki.issue_device(directory, "dev-a")
        acl = workdir / "acl"
        acl.write_text(render_acl(FLEET, aggregator=AGGREGATOR), encoding="utf-8")
        acl.chmod(0o644)
        port = find_free_port()
        # the CRL too is read by the mosquitto user: 0644 in the 0755 PKI directory
        config = render_config(fleet=FLEET, port=port, tls=pki.server_tls_files(directory), acl_path=acl,
                               crl_file=pki.crl_file(directory))
        with running_mosquitto(workdir, config, port, keep_root=False) as log:
            broker = Broker(port=port, pki=directory, log=log)
            async with connect(broker, "dev-a") as device:
                await device.publish(topics.update_topic(FLEET, "dev-a"), b"x", qos=1)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def test_render_config_refuses_unsafe_or_ambiguous_settings(tmp_path: Path) -> None:
    tls = TlsFiles(ca_file=tmp_path / "ca.pem", cert_file=tmp_path / "s.pem", key_file=tmp_path / "s.key")
    good = {"fleet": FLEET, "port": 8883, "tls": tls, "acl_path": tmp_path / "acl"}
    assert render_config(**good).count("listener ") == 1  # type: ignore[arg-type]
    for change, key in (({"tls": None}, "tls"), ({"acl_path": "acl"}, "acl_path"), ({"port": 0}, "port"),
                        ({"fleet": "bad fleet"}, "fleet"), ({"max_packet_bytes": 10}, "max_packet_bytes"),
                        ({"acl_path": tmp_path / "a b"}, "acl_path"), ({"crl_file": "crl.pem"}, "crl_file"),
                        ({"crl_file": tmp_path / "crl.pem", "password_file": tmp_path / "pw"}, "crl_file"),
                        ({"max_queued_messages": 0}, "max_queued_messages"),
                        ({"max_inflight_messages": True}, "max_inflight_messages"),
                        ({"max_queued_bytes": -1}, "max_queued_bytes")):
        with pytest.raises(ConfigError) as info:
            render_config(**{**good, **change})  # type: ignore[arg-type]
        assert info.value.key == key
    with pytest.raises(ConfigError):
        render_acl(FLEET, aggregator="ops", operators=["ops"])
    with pytest.raises(ConfigError):
        render_acl(FLEET, aggregator=AGGREGATOR, operators=["all"])
    for denied in (["bad/name"], ["all"], [AGGREGATOR], [OPERATOR]):
        with pytest.raises(ConfigError):
            render_acl(FLEET, aggregator=AGGREGATOR, operators=[OPERATOR], denied_devices=denied)


def test_render_config_states_and_sets_the_broker_limits(tmp_path: Path) -> None:
    tls = TlsFiles(ca_file=tmp_path / "ca.pem", cert_file=tmp_path / "s.pem", key_file=tmp_path / "s.key")
    config = render_config(fleet=FLEET, port=8883, tls=tls, acl_path=tmp_path / "acl", crl_file=tmp_path / "crl.pem")
    settings = [line for line in config.splitlines() if line and not line.startswith("#")]
    for line in ("max_packet_size 67108864", "max_inflight_messages 20", "max_queued_messages 1000",
                 f"crlfile {tmp_path / 'crl.pem'}"):
        assert line in settings
    assert not any(line.startswith("max_queued_bytes") for line in settings)
    assert settings.index(f"crlfile {tmp_path / 'crl.pem'}") > settings.index("listener 8883 127.0.0.1")
    comments = " ".join(line for line in config.splitlines() if line.startswith("#"))
    assert "no per-topic" in comments and "retain" in comments and "oversized retained device statuses" in comments
    assert "SIGHUP" in comments
    custom = render_config(fleet=FLEET, port=8883, tls=tls, acl_path=tmp_path / "acl", max_queued_messages=50,
                           max_queued_bytes=1 << 28, max_inflight_messages=5, max_packet_bytes=None)
    for line in ("max_inflight_messages 5", "max_queued_messages 50", "max_queued_bytes 268435456"):
        assert line in custom.splitlines()
    assert "max_packet_size" not in [line.split()[0] for line in custom.splitlines() if line and line[0] != "#"]
    assert "crlfile" not in custom


@pytest.mark.asyncio
async def test_the_limits_the_config_sets_are_accepted_by_mosquitto(tmp_path: Path) -> None:
    # Mosquitto 2.0.11 stops at start-up on an option it does not know: the generated limits all exist.
    password_file = pki.write_password_file(tmp_path / "passwd", {"dev-a": "pw"})
    acl = tmp_path / "acl"
    acl.write_text(render_acl(FLEET, aggregator=AGGREGATOR, denied_devices=["dev-z"]), encoding="utf-8")
    port = find_free_port()
    config = render_config(fleet=FLEET, port=port, tls=None, password_file=password_file, acl_path=acl,
                           max_queued_bytes=1 << 28)
    with running_mosquitto(tmp_path, config, port) as log:
        login = BrokerSettings(host=HOST, port=port, protocol="5", username="dev-a", password="pw", connect_timeout=WAIT)
        async with login.client(identifier="dev-a"):
            pass
    assert "Unknown configuration variable" not in log.read_text(errors="replace")


@pytest.mark.asyncio
async def test_large_updates_reach_a_zero_copy_aggregator_over_tls(tls_broker: Broker) -> None:
    """broker/zerocopy.py reads a large packet with recv_into; over TLS that is the SSL socket's."""
    from fedmq.broker import zerocopy

    body = np.random.default_rng(4).bytes(zerocopy.LARGE * 40 + 7)  # 2.6 MB: many TLS records
    async with connect(tls_broker, AGGREGATOR) as aggregator, connect(tls_broker, "dev-a") as device:
        assert zerocopy.zero_copy(aggregator)
        await aggregator.subscribe(topics.update_topic(FLEET, "dev-a"), qos=1)
        for _ in range(3):
            await device.publish(topics.update_topic(FLEET, "dev-a"), body, qos=1)
        async with asyncio.timeout(WAIT):
            payloads = [(await anext(aggregator.messages)).payload for _ in range(3)]
    assert all(isinstance(p, bytearray) and p == body for p in payloads)
