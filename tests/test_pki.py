"""The fleet PKI: chains, names, key usages, file modes, refusals, and Mosquitto password hashes."""

from __future__ import annotations

import base64
import datetime
import grp
import hashlib
import ipaddress
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from cryptography.x509.verification import (
    ClientVerifier,
    Criticality,
    DNSName,
    ExtensionPolicy,
    IPAddress,
    PolicyBuilder,
    Store,
    VerificationError,
)

from fedmq.broker import pki
from fedmq.broker.errors import FedmqError
from fedmq.broker.mosquitto_config import TlsFiles
from fedmq.broker.pki import PkiError

FLEET = "pkifleet"


def load_cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def common_name(cert: x509.Certificate) -> str:
    (attribute,) = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(attribute.value)


def usages(cert: x509.Certificate) -> list[x509.ObjectIdentifier]:
    return list(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)


def mode(path: Path) -> int:
    return path.stat().st_mode & 0o777


def store_of(directory: Path) -> Store:
    return Store([load_cert(directory / "ca.pem")])


def client_verifier(directory: Path) -> ClientVerifier:
    """cryptography's client verifier with the Web PKI rules, except that a client certificate
    may go without a subjectAltName: fleet identities live in the CN (Mosquitto reads the CN)."""
    leaf = ExtensionPolicy.webpki_defaults_ee().may_be_present(x509.SubjectAlternativeName, Criticality.AGNOSTIC, None)
    builder = PolicyBuilder().store(store_of(directory))
    return builder.extension_policies(ca_policy=ExtensionPolicy.webpki_defaults_ca(), ee_policy=leaf).build_client_verifier()


def openssl_verify(ca: Path, cert: Path, purpose: str) -> subprocess.CompletedProcess[str]:
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.fail("the openssl command is needed to cross-check the chains (apt-get install openssl)")
    return subprocess.run([openssl, "verify", "-CAfile", str(ca), "-purpose", purpose, str(cert)],
                          capture_output=True, text=True, timeout=10, check=False)


@pytest.fixture
def ca_dir(tmp_path: Path) -> Path:
    directory = tmp_path / "pki"
    pki.init_ca(directory, fleet=FLEET)
    return directory




def test_init_ca_is_a_self_signed_p256_ca_with_a_private_key(tmp_path: Path) -> None:
    files = pki.init_ca(tmp_path / "pki", fleet=FLEET, days=30)
    assert files == pki.CaFiles(cert=tmp_path / "pki" / "ca.pem", key=tmp_path / "pki" / "ca.key")
    ca = load_cert(files.cert)
    ca.verify_directly_issued_by(ca)
    assert common_name(ca) == f"fedmq {FLEET} CA"
    constraints = ca.extensions.get_extension_for_class(x509.BasicConstraints)
    assert constraints.critical and constraints.value.ca and constraints.value.path_length == 0
    key_usage = ca.extensions.get_extension_for_class(x509.KeyUsage).value
    assert key_usage.key_cert_sign and key_usage.crl_sign and not key_usage.digital_signature
    public = ca.public_key()
    assert isinstance(public, ec.EllipticCurvePublicKey) and public.curve.name == "secp256r1"
    lifetime = ca.not_valid_after_utc - ca.not_valid_before_utc
    assert datetime.timedelta(days=30) < lifetime < datetime.timedelta(days=30, minutes=10)
    key = serialization.load_pem_private_key(files.key.read_bytes(), password=None)
    assert key.public_key() == public
    assert (mode(files.key), mode(files.cert)) == (0o600, 0o644)


def test_init_ca_refuses_to_replace_a_ca_unless_forced(ca_dir: Path) -> None:
    before = (ca_dir / "ca.pem").read_bytes(), (ca_dir / "ca.key").read_bytes()
    with pytest.raises(PkiError, match="already exists"):
        pki.init_ca(ca_dir, fleet=FLEET)
    assert ((ca_dir / "ca.pem").read_bytes(), (ca_dir / "ca.key").read_bytes()) == before
    pki.init_ca(ca_dir, fleet=FLEET, force=True)
    assert (ca_dir / "ca.key").read_bytes() != before[1]
    (ca_dir / "ca.pem").unlink()  # a half CA (key without certificate) is still a CA to keep
    with pytest.raises(PkiError, match="already exists"):
        pki.init_ca(ca_dir, fleet=FLEET)


def test_server_certificate_names_the_broker_and_chains_to_the_ca(ca_dir: Path) -> None:
    cert_path, key_path = pki.issue_server(ca_dir, hostnames=["broker.example", "localhost"], ips=["127.0.0.1", "::1"])
    assert (cert_path, key_path) == (ca_dir / "server" / "server.pem", ca_dir / "server" / "server.key")
    cert = load_cert(cert_path)
    assert common_name(cert) == "broker.example"
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["broker.example", "localhost"]
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1"), ipaddress.ip_address("::1")]
    assert usages(cert) == [ExtendedKeyUsageOID.SERVER_AUTH]
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    verifier = PolicyBuilder().store(store_of(ca_dir)).build_server_verifier(DNSName("broker.example"))
    assert verifier.verify(cert, [])[-1] == load_cert(ca_dir / "ca.pem")
    PolicyBuilder().store(store_of(ca_dir)).build_server_verifier(IPAddress(ipaddress.ip_address("127.0.0.1"))).verify(cert, [])
    with pytest.raises(VerificationError):
        PolicyBuilder().store(store_of(ca_dir)).build_server_verifier(DNSName("elsewhere.example")).verify(cert, [])
    assert openssl_verify(ca_dir / "ca.pem", cert_path, "sslserver").returncode == 0
    assert openssl_verify(ca_dir / "ca.pem", cert_path, "sslclient").returncode != 0, "a server cert is no client identity"
    assert (mode(key_path), mode(cert_path)) == (0o600, 0o644)
    assert mode(ca_dir / "server") == 0o755


def test_server_certificate_default_ip_and_bad_names(ca_dir: Path) -> None:
    cert = load_cert(pki.issue_server(ca_dir, hostnames=["localhost"])[0])
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1")]
    for hostnames, ips in ((["bad host"], []), (["127.0.0.1"], []), (["ok"], ["not-an-ip"]), ([], [])):
        with pytest.raises(PkiError):
            pki.issue_server(ca_dir, hostnames=hostnames, ips=ips, force=True)


def test_device_certificate_cn_is_the_device_id_for_client_auth(ca_dir: Path) -> None:
    cert_path, key_path = pki.issue_device(ca_dir, "pi-kitchen-01", days=90)
    assert (cert_path, key_path) == (ca_dir / "devices" / "pi-kitchen-01.pem", ca_dir / "devices" / "pi-kitchen-01.key")
    cert = load_cert(cert_path)
    assert common_name(cert) == "pi-kitchen-01"
    assert usages(cert) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    assert cert.issuer == load_cert(ca_dir / "ca.pem").subject
    verified = client_verifier(ca_dir).verify(cert, [])
    assert verified.chain[-1] == load_cert(ca_dir / "ca.pem")
    assert openssl_verify(ca_dir / "ca.pem", cert_path, "sslclient").returncode == 0
    assert openssl_verify(ca_dir / "ca.pem", cert_path, "sslserver").returncode != 0, "a device cert cannot serve TLS"
    key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    assert key.public_key() == cert.public_key()
    assert (mode(key_path), mode(cert_path)) == (0o600, 0o644)
    lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
    assert datetime.timedelta(days=90) < lifetime < datetime.timedelta(days=90, minutes=10)


def test_a_certificate_from_another_ca_does_not_verify(ca_dir: Path, tmp_path: Path) -> None:
    rogue = tmp_path / "rogue"
    pki.init_ca(rogue, fleet=FLEET)
    cert_path, _ = pki.issue_device(rogue, "dev-a")
    with pytest.raises(VerificationError):
        client_verifier(ca_dir).verify(load_cert(cert_path), [])
    assert openssl_verify(ca_dir / "ca.pem", cert_path, "sslclient").returncode != 0


def test_certificates_never_outlive_their_ca(tmp_path: Path) -> None:
    pki.init_ca(tmp_path, fleet=FLEET, days=10)
    cert = load_cert(pki.issue_device(tmp_path, "dev-a", days=825)[0])
    assert cert.not_valid_after_utc <= load_cert(tmp_path / "ca.pem").not_valid_after_utc


@pytest.mark.parametrize("device_id", ["", "all", "a/b", "dev+", "dev#", "dev a", "../etc", ".hidden", "x" * 65, "dév"])
def test_invalid_device_ids_are_rejected_before_anything_is_written(ca_dir: Path, device_id: str) -> None:
    with pytest.raises(PkiError):
        pki.issue_device(ca_dir, device_id)
    assert not (ca_dir / "devices").exists()


def test_client_identities_for_aggregator_and_operator(ca_dir: Path) -> None:
    for name, role in (("aggregator", "aggregator"), ("ops-alice", "operator")):
        cert_path, key_path = pki.issue_client(ca_dir, name, role=role)  # type: ignore[arg-type]
        assert (cert_path, key_path) == (ca_dir / "clients" / f"{name}.pem", ca_dir / "clients" / f"{name}.key")
        cert = load_cert(cert_path)
        assert common_name(cert) == name
        (unit,) = cert.subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)
        assert unit.value == role
        assert usages(cert) == [ExtendedKeyUsageOID.CLIENT_AUTH]
        client_verifier(ca_dir).verify(cert, [])
        assert mode(key_path) == 0o600
    with pytest.raises(PkiError, match="role"):
        pki.issue_client(ca_dir, "root", role="admin")  # type: ignore[arg-type]
    with pytest.raises(PkiError):
        pki.issue_client(ca_dir, "bad/name", role="operator")


def test_devices_and_clients_share_one_namespace(ca_dir: Path) -> None:
    pki.issue_client(ca_dir, "aggregator", role="aggregator")
    with pytest.raises(PkiError, match="already"):
        pki.issue_device(ca_dir, "aggregator")
    pki.issue_device(ca_dir, "dev-a")
    with pytest.raises(PkiError, match="already"):
        pki.issue_client(ca_dir, "dev-a", role="operator")


def test_reissuing_an_identity_needs_force(ca_dir: Path) -> None:
    cert_path, key_path = pki.issue_device(ca_dir, "dev-a")
    key = key_path.read_bytes()
    with pytest.raises(PkiError, match="already exists"):
        pki.issue_device(ca_dir, "dev-a")
    assert key_path.read_bytes() == key
    pki.issue_device(ca_dir, "dev-a", force=True)
    assert key_path.read_bytes() != key
    pki.issue_server(ca_dir, hostnames=["localhost"])
    with pytest.raises(PkiError, match="already exists"):
        pki.issue_server(ca_dir, hostnames=["localhost"])


def test_modes_are_exact_whatever_the_umask(tmp_path: Path, umask_0: None) -> None:
    pki.init_ca(tmp_path, fleet=FLEET)
    cert_path, key_path = pki.issue_device(tmp_path, "dev-a")
    assert (mode(tmp_path / "ca.key"), mode(key_path), mode(cert_path)) == (0o600, 0o600, 0o644)
    os.umask(0o077)
    cert_path, key_path = pki.issue_device(tmp_path, "dev-b")
    assert (mode(key_path), mode(cert_path)) == (0o600, 0o644)
    assert not [p for p in tmp_path.rglob(".*.tmp")], "no temporary file left behind"


def test_server_key_can_be_given_to_the_broker_group(ca_dir: Path) -> None:
    # Mosquitto reads its key after dropping to its own user: key_group makes the key 0640 for it.
    group = "mosquitto" if os.geteuid() == 0 and _group_exists("mosquitto") else grp.getgrgid(os.getegid()).gr_name
    _, key_path = pki.issue_server(ca_dir, hostnames=["localhost"], key_group=group)
    assert mode(key_path) == 0o640
    assert key_path.stat().st_gid == grp.getgrnam(group).gr_gid
    with pytest.raises(PkiError, match="no group"):
        pki.issue_server(ca_dir, hostnames=["localhost"], key_group="no-such-group-fedmq", force=True)


def _group_exists(name: str) -> bool:
    try:
        grp.getgrnam(name)
    except KeyError:
        return False
    return True


def test_issuing_without_a_ca_or_with_a_mismatched_key_fails_clearly(tmp_path: Path) -> None:
    with pytest.raises(PkiError, match="no CA"):
        pki.issue_device(tmp_path, "dev-a")
    pki.init_ca(tmp_path / "one", fleet=FLEET)
    pki.init_ca(tmp_path / "two", fleet=FLEET)
    shutil.copy(tmp_path / "two" / "ca.key", tmp_path / "one" / "ca.key")
    with pytest.raises(PkiError, match="not the key"):
        pki.issue_device(tmp_path / "one", "dev-a")
    assert issubclass(PkiError, FedmqError)
    for bad_days in (0, -1, True):
        with pytest.raises(PkiError, match="days"):
            pki.init_ca(tmp_path / "three", fleet=FLEET, days=bad_days)
    with pytest.raises(PkiError, match="fleet"):
        pki.init_ca(tmp_path / "four", fleet="bad fleet")


def test_server_tls_files_point_into_the_layout(ca_dir: Path) -> None:
    with pytest.raises(PkiError, match="missing"):
        pki.server_tls_files(ca_dir)
    pki.issue_server(ca_dir, hostnames=["localhost"])
    assert pki.server_tls_files(ca_dir) == TlsFiles(
        ca_file=ca_dir.resolve() / "ca.pem",
        cert_file=ca_dir.resolve() / "server" / "server.pem",
        key_file=ca_dir.resolve() / "server" / "server.key",
    )


def test_password_hash_is_the_mosquitto_passwd_format(tmp_path: Path) -> None:
    # Cross-check against the reference tool: same salt and iterations must give the same line.
    tool = shutil.which("mosquitto_passwd") or "/usr/bin/mosquitto_passwd"
    if not os.access(tool, os.X_OK):
        pytest.fail("mosquitto_passwd is needed (it ships with the mosquitto package)")
    reference = tmp_path / "reference"
    subprocess.run([tool, "-c", "-b", str(reference), "dev-a", "s3cret pässword"], check=True, timeout=10,
                   capture_output=True)
    user, hashed = reference.read_text().strip().split(":", 1)
    _, kind, iterations, salt, _ = hashed.split("$")
    assert (user, kind) == ("dev-a", "7")
    assert pki.password_hash("s3cret pässword", iterations=int(iterations), salt=base64.b64decode(salt)) == hashed

    ours = pki.password_hash("pw")
    _, kind, iterations, salt, digest = ours.split("$")
    assert (kind, int(iterations)) == ("7", pki.PASSWORD_ITERATIONS)
    raw_salt = base64.b64decode(salt, validate=True)
    assert len(raw_salt) == 12
    assert base64.b64decode(digest, validate=True) == hashlib.pbkdf2_hmac("sha512", b"pw", raw_salt, int(iterations))
    assert pki.password_hash("pw") != ours, "a fresh salt each time"
    for bad in ("", "a\0b"):
        with pytest.raises(PkiError):
            pki.password_hash(bad)
    with pytest.raises(PkiError, match="12-byte"):
        pki.password_hash("pw", salt=b"short")


def test_write_password_file(tmp_path: Path) -> None:
    path = pki.write_password_file(tmp_path / "passwd", {"dev-b": "two", "aggregator": "one"}, iterations=5)
    lines = path.read_text().splitlines()
    assert [line.split(":")[0] for line in lines] == ["aggregator", "dev-b"]
    assert all(line.split(":")[1].startswith("$7$5$") for line in lines)
    assert mode(path) == 0o640
    for users in ({}, {"bad:name": "x"}, {"a b": "x"}, {"dev#": "x"}, {"ok": ""}):
        with pytest.raises(PkiError):
            pki.write_password_file(tmp_path / "other", users)
    assert not (tmp_path / "other").exists()
