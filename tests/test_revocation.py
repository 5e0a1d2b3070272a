"""Device certificate revocation: the CRL and revoked.json, the commands, and a real Mosquitto enforcing them.

The broker tests follow the procedure of SECURITY.md ("When a device is stolen"): ``fedmq pki
revoke``, ``fedmq broker config`` with the same options, reload (SIGHUP) or restart Mosquitto.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
import json
import shutil
import signal
import subprocess
import time
from pathlib import Path

import aiomqtt
import pytest
from cryptography import x509
from test_broker_security import (
    AGGREGATOR,
    DEVICES,
    FLEET,
    HOST,
    OPERATOR,
    WAIT,
    Broker,
    make_pki,
    mosquitto_process,
    receive,
    running_mosquitto,
    settings_for,
    token,
)

from fedmq.broker import pki, topics
from fedmq.broker.local import find_free_port
from fedmq.broker.mosquitto_config import render_acl, render_config
from fedmq.broker.pki import PkiError
from fedmq.broker.settings import BrokerSettings
from fedmq.cli import build_parser

REFUSED_WITHIN = 2.0  # see test_clients_without_a_valid_fleet_certificate_are_refused (TLS 1.3)


def mode(path: Path) -> int:
    return path.stat().st_mode & 0o777


def load_crl(directory: Path) -> x509.CertificateRevocationList:
    return x509.load_pem_x509_crl((directory / "crl.pem").read_bytes())


def serial_of(directory: Path, device: str) -> int:
    return x509.load_pem_x509_certificate(pki.device_paths(directory, device)[0].read_bytes()).serial_number


def run_cli(*argv: str) -> int:
    """The fedmq command in-process, without its logging set-up (the tests' own stays in place)."""
    args = build_parser().parse_args(list(argv))
    return int(args.func(args))


def openssl_crl_check(directory: Path, cert: Path) -> subprocess.CompletedProcess[str]:
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.fail("the openssl command is needed to cross-check the CRL (apt-get install openssl)")
    return subprocess.run([openssl, "verify", "-crl_check", "-CAfile", str(directory / "ca.pem"), "-CRLfile",
                           str(directory / "crl.pem"), str(cert)], capture_output=True, text=True, timeout=10,
                          check=False)


@pytest.fixture
def devices_pki(tmp_path: Path) -> Path:
    directory = tmp_path / "pki"
    pki.init_ca(directory, fleet=FLEET)
    for device in DEVICES:
        pki.issue_device(directory, device)
    pki.issue_client(directory, AGGREGATOR, role="aggregator")
    return directory


def test_init_ca_writes_an_empty_crl_valid_until_the_ca_expires(tmp_path: Path) -> None:
    before = datetime.datetime.now(datetime.UTC)
    pki.init_ca(tmp_path, fleet=FLEET, days=3650)
    crl, ca = load_crl(tmp_path), x509.load_pem_x509_certificate((tmp_path / "ca.pem").read_bytes())
    assert list(crl) == [] and crl.issuer == ca.subject
    assert crl.is_signature_valid(ca.public_key())  # type: ignore[arg-type]
    assert crl.next_update_utc == ca.not_valid_after_utc
    assert crl.last_update_utc < before  # backdated: a broker clock a little behind still accepts it
    assert mode(tmp_path / "crl.pem") == 0o644
    assert pki.crl_file(tmp_path) == tmp_path.resolve() / "crl.pem"
    assert pki.revoked_devices(tmp_path) == () and pki.revoked_device_ids(tmp_path) == []


def test_revoke_adds_serials_to_a_ca_signed_crl_and_keeps_earlier_ones(devices_pki: Path) -> None:
    ca_cert, ca_key = pki.load_ca(devices_pki)
    serials = {device: serial_of(devices_pki, device) for device in DEVICES}
    first = pki.revoke(devices_pki, "dev-b", reason="stolen from the shed")
    second = pki.revoke(devices_pki, "dev-c")
    assert (first.device, first.serial, first.reason) == ("dev-b", serials["dev-b"], "stolen from the shed")
    assert second.reason == "unspecified"

    crl = load_crl(devices_pki)
    assert {entry.serial_number for entry in crl} == {serials["dev-b"], serials["dev-c"]}
    assert crl.get_revoked_certificate_by_serial_number(serials["dev-a"]) is None
    assert crl.is_signature_valid(ca_key.public_key())
    assert crl.issuer == ca_cert.subject
    now = datetime.datetime.now(datetime.UTC)
    assert crl.next_update_utc is not None and crl.next_update_utc > now + datetime.timedelta(days=365)
    assert crl.next_update_utc == ca_cert.not_valid_after_utc
    assert crl.last_update_utc <= now
    assert crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number == 3  # empty, +dev-b, +dev-c
    assert mode(devices_pki / "crl.pem") == 0o644

    # OpenSSL, as Mosquitto uses it, agrees
    assert openssl_crl_check(devices_pki, pki.device_paths(devices_pki, "dev-a")[0]).returncode == 0
    refused = openssl_crl_check(devices_pki, pki.device_paths(devices_pki, "dev-b")[0])
    assert refused.returncode != 0 and "revoked" in refused.stdout + refused.stderr

    document = json.loads((devices_pki / "revoked.json").read_text())
    assert [(e["device"], int(e["serial"], 16), e["reason"]) for e in document["revoked"]] == [
        ("dev-b", serials["dev-b"], "stolen from the shed"), ("dev-c", serials["dev-c"], "unspecified")]
    assert pki.revoked_devices(devices_pki) == (first, second)
    assert pki.revoked_device_ids(devices_pki) == ["dev-b", "dev-c"]
    assert mode(devices_pki / "revoked.json") == 0o644

    # revoking again changes nothing
    assert pki.revoke(devices_pki, "dev-b", reason="again") == first
    assert len(list(load_crl(devices_pki))) == 2 and len(pki.revoked_devices(devices_pki)) == 2


def test_a_reissued_device_gets_a_serial_that_is_not_revoked(devices_pki: Path) -> None:
    revoked = pki.revoke(devices_pki, "dev-b", reason="stolen")
    pki.issue_device(devices_pki, "dev-b", force=True)
    new_serial = serial_of(devices_pki, "dev-b")
    assert new_serial != revoked.serial
    assert load_crl(devices_pki).get_revoked_certificate_by_serial_number(new_serial) is None
    assert pki.revoked_device_ids(devices_pki) == []  # history kept, the device is valid again
    assert [r.device for r in pki.revoked_devices(devices_pki)] == ["dev-b"]
    assert openssl_crl_check(devices_pki, pki.device_paths(devices_pki, "dev-b")[0]).returncode == 0
    pki.revoke(devices_pki, "dev-b", reason="stolen again")  # the new certificate can be revoked in turn
    assert {e.serial_number for e in load_crl(devices_pki)} == {revoked.serial, new_serial}
    assert pki.revoked_device_ids(devices_pki) == ["dev-b"]


def test_revoking_what_is_not_a_device_of_this_ca_fails_clearly(devices_pki: Path, tmp_path: Path) -> None:
    with pytest.raises(PkiError, match="no certificate for device 'dev-x'") as info:
        pki.revoke(devices_pki, "dev-x")
    assert str(devices_pki / "devices") in str(info.value)
    with pytest.raises(PkiError, match="not devices"):
        pki.revoke(devices_pki, AGGREGATOR)
    with pytest.raises(PkiError):
        pki.revoke(devices_pki, "bad/id")
    with pytest.raises(PkiError, match="reason"):
        pki.revoke(devices_pki, "dev-a", reason="line\nbreak")
    rogue = tmp_path / "rogue"
    pki.init_ca(rogue, fleet=FLEET)
    rogue_cert, _ = pki.issue_device(rogue, "dev-a")
    shutil.copy(rogue_cert, pki.device_paths(devices_pki, "dev-a")[0])
    with pytest.raises(PkiError, match="not issued by the CA"):
        pki.revoke(devices_pki, "dev-a")
    assert list(load_crl(devices_pki)) == [] and not (devices_pki / "revoked.json").exists()


def test_a_pki_directory_without_a_crl_gets_an_empty_one(devices_pki: Path, tmp_path: Path) -> None:
    (devices_pki / "crl.pem").unlink()  # a PKI made before fedmq had revocation
    assert pki.load_crl(devices_pki) is None
    assert pki.crl_file(devices_pki) == devices_pki.resolve() / "crl.pem"
    assert list(load_crl(devices_pki)) == []
    pki.revoke(devices_pki, "dev-a")  # and revoke works on it from then on
    assert len(list(load_crl(devices_pki))) == 1

    broker_host = tmp_path / "broker-copy"  # the broker host got ca.pem and server files, no ca.key
    broker_host.mkdir()
    shutil.copy(devices_pki / "ca.pem", broker_host / "ca.pem")
    with pytest.raises(PkiError, match="copy crl.pem"):
        pki.crl_file(broker_host)
    other = tmp_path / "other"
    pki.init_ca(other, fleet=FLEET)  # a CRL of another CA would make Mosquitto refuse everybody
    shutil.copy(other / "crl.pem", devices_pki / "crl.pem")
    with pytest.raises(PkiError, match="not signed by the CA"):
        pki.crl_file(devices_pki)


def test_cli_revoke_and_broker_config(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    directory = tmp_path / "pki"
    make_pki(directory)
    (directory / "crl.pem").unlink()  # made by an older fedmq: broker config creates the CRL
    conf, acl = tmp_path / "fedmq.conf", tmp_path / "fedmq.acl"
    config_args = ("broker", "config", "--fleet", FLEET, "--pki", str(directory), "--aggregator", AGGREGATOR,
                   "--operator", OPERATOR, "--acl-path", str(acl), "-o", str(conf))
    assert run_cli(*config_args) == 0
    assert f"crlfile {directory.resolve() / 'crl.pem'}" in conf.read_text().splitlines()
    assert "topic deny #" not in acl.read_text()

    assert run_cli("pki", "revoke", "--dir", str(directory), "dev-b", "dev-c", "--reason", "stolen") == 0
    out = capsys.readouterr().out
    serial = f"{serial_of(directory, 'dev-b'):X}"
    assert f"device dev-b: certificate {serial} revoked" in out and "reason: stolen" in out
    assert "fedmq broker config" in out and "systemctl reload mosquitto" in out and "SECURITY.md" in out
    assert run_cli("pki", "revoke", "--dir", str(directory), "dev-b") == 0
    assert "already revoked" in capsys.readouterr().out

    assert run_cli(*config_args) == 0
    written = capsys.readouterr()
    assert "revoked devices denied in the ACL: dev-b, dev-c" in written.err and written.out == ""  # -o: the file only
    assert run_cli(*config_args[:-2]) == 0  # without -o the config goes to stdout, revocations or not
    assert capsys.readouterr().out == conf.read_text()
    text = acl.read_text()
    for device in ("dev-b", "dev-c"):
        assert f"user {device}\ntopic deny #\n" in text
    assert "user dev-a" not in text

    from fedmq.cli import main
    assert main(["pki", "revoke", "--dir", str(directory), "nobody"]) == 2
    assert "no certificate for device 'nobody'" in capsys.readouterr().err


def broker_config(directory: Path, workdir: Path, port: int) -> str:
    """What ``fedmq broker config`` writes for this PKI (run again after every revocation)."""
    conf, acl = workdir / "generated.conf", workdir / "fedmq.acl"
    assert run_cli("broker", "config", "--fleet", FLEET, "--pki", str(directory), "--aggregator", AGGREGATOR,
                   "--operator", OPERATOR, "--acl-path", str(acl), "--port", str(port), "-o", str(conf)) == 0
    return conf.read_text()


def reload_mosquitto(proc: subprocess.Popen[bytes], log: Path) -> None:
    """SIGHUP, as ``systemctl reload mosquitto`` sends it; returns once Mosquitto has reloaded.

    Mosquitto handles the signal in its single-threaded main loop and logs "Reloading config."
    as it starts the reload, which it finishes before it serves the network again.
    """
    before = log.read_bytes().count(b"Reloading config.")
    proc.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + WAIT
    while log.read_bytes().count(b"Reloading config.") == before:
        assert time.monotonic() < deadline, "Mosquitto did not reload"
        time.sleep(0.02)
    assert b"Unable to load certificate revocation file" not in log.read_bytes()


async def refused(settings: BrokerSettings, identifier: str) -> bool:
    try:
        async with dataclasses.replace(settings, connect_timeout=REFUSED_WITHIN).client(identifier=identifier):
            return False
    except aiomqtt.MqttError:
        return True


async def received_within(client: aiomqtt.Client, seconds: float) -> set[tuple[str, bytes]]:
    got: set[tuple[str, bytes]] = set()
    try:
        async with asyncio.timeout(seconds):
            async for message in client.messages:
                assert isinstance(message.payload, bytes)
                got.add((str(message.topic), message.payload))
    except TimeoutError:
        pass
    return got


async def all_publish(broker: Broker, devices: tuple[str, ...]) -> None:
    """Each of ``devices`` connects afresh and publishes its update; the aggregator gets every one."""
    updates = {device: (topics.update_topic(FLEET, device), token()) for device in devices}
    async with settings_for(broker, AGGREGATOR).client(identifier=AGGREGATOR) as aggregator:
        await aggregator.subscribe(topics.updates_filter(FLEET), qos=1)
        for device, update in updates.items():
            async with settings_for(broker, device).client(identifier=device) as client:
                await client.publish(*update, qos=1)
        await receive(aggregator, set(updates.values()))


@pytest.mark.broker
@pytest.mark.asyncio
async def test_a_revoked_device_is_refused_and_shut_out_while_the_others_carry_on(tmp_path: Path) -> None:
    directory = make_pki(tmp_path / "pki")
    port = find_free_port()
    workdir = tmp_path / "broker"
    workdir.mkdir()
    with mosquitto_process(workdir, broker_config(directory, workdir, port), port) as (proc, log):
        broker = Broker(port=port, pki=directory, log=log)
        model = topics.model_topic(FLEET)
        async with (
            settings_for(broker, AGGREGATOR).client(identifier=AGGREGATOR) as aggregator,
            settings_for(broker, "dev-a").client(identifier="dev-a") as dev_a,
            settings_for(broker, "dev-b").client(identifier="dev-b") as dev_b,
            settings_for(broker, "dev-c").client(identifier="dev-c") as dev_c,
        ):
            await aggregator.subscribe(topics.updates_filter(FLEET), qos=1)
            for device in (dev_a, dev_b):
                await device.subscribe(model, qos=1)
            before = {(topics.update_topic(FLEET, name), token()): client
                      for name, client in zip(DEVICES, (dev_a, dev_b, dev_c), strict=True)}
            for update, client in before.items():
                await client.publish(*update, qos=1)
            await receive(aggregator, set(before))

            pki.revoke(directory, "dev-b", reason="stolen")
            broker_config(directory, workdir, port)  # same files, regenerated: the ACL now denies dev-b
            reload_mosquitto(proc, log)

            # the CRL: a new TLS handshake with dev-b's certificate fails
            assert await refused(settings_for(broker, "dev-b"), "dev-b")
            # the ACL: the connection dev-b opened before the reload is still up but can do nothing
            stolen = (topics.update_topic(FLEET, "dev-b"), token())
            await dev_b.publish(*stolen, qos=1)
            after = {(topics.update_topic(FLEET, "dev-a"), token()): dev_a,
                     (topics.update_topic(FLEET, "dev-c"), token()): dev_c}
            for update, client in after.items():
                await client.publish(*update, qos=1)
            new_model = (model, token())
            await aggregator.publish(*new_model, qos=1)
            at_aggregator, at_a, at_b = await asyncio.gather(
                receive(aggregator, set(after)), receive(dev_a, {new_model}), received_within(dev_b, 1.0))
            assert stolen not in at_aggregator
            assert new_model not in at_b
        await all_publish(broker, ("dev-a", "dev-c"))

    # restart with the regenerated files: every connection is new, dev-b stays out
    with mosquitto_process(workdir, broker_config(directory, workdir, port), port) as (proc, log):
        broker = Broker(port=port, pki=directory, log=log)
        assert await refused(settings_for(broker, "dev-b"), "dev-b")
        await all_publish(broker, ("dev-a", "dev-c"))

        # re-issued: a new certificate for the same id connects again once the files are regenerated
        old = tmp_path / "old-dev-b"
        old.mkdir()
        for path in pki.device_paths(directory, "dev-b"):
            shutil.copy(path, old / path.name)
        pki.issue_device(directory, "dev-b", force=True)
        broker_config(directory, workdir, port)
        reload_mosquitto(proc, log)
        await all_publish(broker, DEVICES)
        stale = BrokerSettings(host=HOST, port=port, protocol="5", tls=True, ca_file=str(directory / "ca.pem"),
                               cert_file=str(old / "dev-b.pem"), key_file=str(old / "dev-b.key"))
        assert await refused(stale, "dev-b"), "the revoked certificate must stay refused after the re-issue"


@pytest.mark.broker
@pytest.mark.asyncio
async def test_the_acl_alone_denies_a_revoked_identity_everything(tmp_path: Path) -> None:
    # The second layer by itself: dev-b's certificate is still valid (not in the CRL), but its
    # `user dev-b` block with `topic deny #` overrides the %u patterns for it.
    directory = make_pki(tmp_path / "pki")
    acl = tmp_path / "acl"
    acl.write_text(render_acl(FLEET, aggregator=AGGREGATOR, operators=[OPERATOR], denied_devices=["dev-b"]),
                   encoding="utf-8")
    port = find_free_port()
    config = render_config(fleet=FLEET, port=port, tls=pki.server_tls_files(directory), acl_path=acl,
                           crl_file=pki.crl_file(directory))
    with running_mosquitto(tmp_path, config, port) as log:
        broker = Broker(port=port, pki=directory, log=log)
        async with (
            settings_for(broker, AGGREGATOR).client(identifier=AGGREGATOR) as aggregator,
            settings_for(broker, "dev-a").client(identifier="dev-a") as dev_a,
            settings_for(broker, "dev-b").client(identifier="dev-b") as dev_b,
        ):
            await aggregator.subscribe(topics.updates_filter(FLEET), qos=1)
            await aggregator.subscribe(topics.statuses_filter(FLEET), qos=1)
            for device in (dev_a, dev_b):
                await device.subscribe(f"{topics.fleet_prefix(FLEET)}/#", qos=1)
            denied = [(topics.update_topic(FLEET, "dev-b"), token()), (topics.status_topic(FLEET, "dev-b"), token())]
            for message in denied:
                await dev_b.publish(*message, qos=1)
            own = (topics.update_topic(FLEET, "dev-a"), token())
            await dev_a.publish(*own, qos=1)
            to_devices = [(topics.model_topic(FLEET), token()), (topics.receipt_topic(FLEET, "dev-b"), token()),
                          (topics.artifact_topic(FLEET, "ab" * 32), token())]
            for message in to_devices:
                await aggregator.publish(*message, qos=1)
            at_aggregator, _, at_b = await asyncio.gather(
                receive(aggregator, {own}), receive(dev_a, {to_devices[0], to_devices[2]}),
                received_within(dev_b, 1.0))
        assert not set(denied) & at_aggregator
        assert at_b == set()
