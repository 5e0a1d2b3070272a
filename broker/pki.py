"""A small fleet PKI: one CA per fleet, a broker (server) certificate, device and client certificates.

Layout under one directory (what ``deploy/`` and ``fedmq broker config`` expect)::

    ca.pem   ca.key                       the fleet CA (key 0600)
    server/server.pem  server/server.key  the broker's TLS identity (serverAuth)
    devices/<device>.pem  devices/<device>.key     one per device (clientAuth, CN = device id)
    clients/<name>.pem    clients/<name>.key       aggregator and operator identities (clientAuth, CN = name)
    crl.pem  revoked.json                 revoked device certificates: the CA-signed CRL Mosquitto
                                          checks (crlfile), and the same with names, times, reasons

Keys are ECDSA P-256, unencrypted PKCS#8 PEM: every OpenSSL that Mosquitto links accepts them for
TLS, and they are small and fast on a Raspberry Pi. Private keys are written atomically with mode
0600 from the first byte (never chmod-ed after the fact), certificates 0644.

The broker takes a client's identity from its certificate: with Mosquitto's
``require_certificate true`` and ``use_identity_as_username true`` the MQTT username is the
certificate's CN, which is why a device certificate's CN is the device id (= MQTT client id =
the ``{device}`` topic level). A device id and a client name share that one namespace, so this
module refuses to issue a device certificate under a name already used by a client and vice versa.

:func:`write_password_file` is the simpler alternative to certificates: a Mosquitto
``password_file`` in the ``$7$`` (PBKDF2-SHA512) format that ``mosquitto_passwd`` writes in 2.0.
"""

from __future__ import annotations

import base64
import datetime
import grp
import hashlib
import ipaddress
import json
import logging
import os
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from .errors import FedmqError
from .files import write_private
from .mosquitto_config import TlsFiles
from .topics import TopicError, check_device, check_name

logger = logging.getLogger(__name__)

CA_CERT = "ca.pem"
CA_KEY = "ca.key"
SERVER_DIR = "server"
DEVICES_DIR = "devices"
CLIENTS_DIR = "clients"
CRL_FILE = "crl.pem"
REVOKED_FILE = "revoked.json"

KEY_MODE = 0o600
GROUP_KEY_MODE = 0o640  # the server key with key_group: readable by the broker's group
CERT_MODE = 0o644
DIR_MODE = 0o755  # the broker's user must traverse to server/; the keys themselves stay 0600

#: Iterations of ``mosquitto_passwd`` 2.0 (``PW_DEFAULT_ITERATIONS``). Mosquitto hashes the
#: password on every CONNECT, so this is paid per connection, not once.
PASSWORD_ITERATIONS = 101
_PASSWORD_SALT_BYTES = 12  # Mosquitto 2.0 refuses (drops) an entry whose salt is not 12 bytes
_PASSWORD_HASH_BYTES = 64  # ... or whose hash is not 64 bytes (SHA-512)

# Certificates start a little in the past so that a device whose clock lags the CA's host by a few
# minutes still accepts them (Pis without an RTC boot with a stale clock until NTP catches up).
_BACKDATE = datetime.timedelta(minutes=5)

Role = Literal["aggregator", "operator"]
ROLES: tuple[str, ...] = ("aggregator", "operator")


class PkiError(FedmqError):
    """A certificate, key or password file cannot be created: bad name, missing CA, file exists, ..."""


@dataclass(frozen=True, slots=True)
class CaFiles:
    """The fleet CA: its certificate (share it with every client and the broker) and private key."""

    cert: Path
    key: Path


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def _write_file(path: Path, data: bytes, mode: int, gid: int = -1) -> None:
    """:func:`~fedmq.broker.files.write_private` with exactly ``mode`` (and group ``gid``), creating the directory."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_private(path, data, mode, gid)
    except OSError as exc:
        raise PkiError(f"cannot write {path}: {exc}") from exc


def _ensure_dir(path: Path) -> None:
    # A directory that already exists keeps the mode its owner gave it.
    if path.is_dir():
        return
    try:
        path.mkdir(parents=True)
        path.chmod(DIR_MODE)
    except OSError as exc:
        raise PkiError(f"cannot create directory {path}: {exc}") from exc


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())


def _check_days(days: int) -> int:
    if not isinstance(days, int) or isinstance(days, bool) or days < 1:
        raise PkiError(f"days must be a positive integer, got {days!r}")
    return days


def _refuse_existing(paths: tuple[Path, ...], what: str, force: bool) -> None:
    existing = [str(p) for p in paths if p.exists()]
    if existing and not force:
        raise PkiError(f"{what} already exists ({', '.join(existing)}); pass force=True to replace it")


def ca_files(directory: str | os.PathLike[str]) -> CaFiles:
    """The CA file paths under ``directory`` (whether or not they exist)."""
    base = Path(directory)
    return CaFiles(cert=base / CA_CERT, key=base / CA_KEY)


def init_ca(directory: str | os.PathLike[str], *, fleet: str, days: int = 3650, force: bool = False) -> CaFiles:
    """Create the fleet CA (``ca.pem``, ``ca.key``) in ``directory``.

    Refuses to replace an existing CA unless ``force``: every certificate it issued would stop
    verifying against the new one.
    """
    try:
        check_name(fleet, "fleet")
    except TopicError as exc:
        raise PkiError(str(exc)) from exc
    _check_days(days)
    files = ca_files(directory)
    _refuse_existing((files.cert, files.key), "a CA", force)
    _ensure_dir(files.cert.parent)

    key = _new_key()
    name = x509.Name([
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedmq"),
        x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, fleet),
        x509.NameAttribute(NameOID.COMMON_NAME, f"fedmq {fleet} CA"),
    ])
    now = _now()
    public = key.public_key()
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _BACKDATE)
        .not_valid_after(now + datetime.timedelta(days=days))
        # path_length=0: the CA signs leaf certificates only, never another CA.
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False, content_commitment=False, key_encipherment=False, data_encipherment=False,
                key_agreement=False, key_cert_sign=True, crl_sign=True, encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(public), critical=False)
        .sign(key, hashes.SHA256())
    )
    # Key first: a crash between the two writes leaves no certificate without its key.
    _write_file(files.key, _key_pem(key), KEY_MODE)
    _write_file(files.cert, cert.public_bytes(serialization.Encoding.PEM), CERT_MODE)
    # An empty CRL from the start: a broker config can always name one (a new CA revokes nothing
    # of the old one's: the old certificates no longer verify at all).
    _write_crl(Path(directory), cert, key, [], number=1)
    logger.info("Created fleet CA %s for fleet %s", files.cert, fleet)
    return files


def load_ca(directory: str | os.PathLike[str]) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """Read the CA certificate and key from ``directory``; :class:`PkiError` when missing or unusable."""
    files = ca_files(directory)
    try:
        cert = x509.load_pem_x509_certificate(files.cert.read_bytes())
        key = serialization.load_pem_private_key(files.key.read_bytes(), password=None)
    except FileNotFoundError as exc:
        raise PkiError(f"no CA in {directory}: {exc.filename} is missing (run init_ca first)") from exc
    except (OSError, ValueError, TypeError) as exc:
        raise PkiError(f"cannot read the CA in {directory}: {exc}") from exc
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise PkiError(f"the CA key {files.key} is not an EC key")
    if key.public_key().public_numbers() != cert.public_key().public_numbers():  # type: ignore[union-attr]
        raise PkiError(f"{files.key} is not the key of {files.cert}")
    return cert, key


def _issue(
    directory: str | os.PathLike[str],
    *,
    common_name: str,
    unit: str,
    usage: x509.ObjectIdentifier,
    cert_path: Path,
    key_path: Path,
    days: int,
    san: list[x509.GeneralName] | None = None,
    key_gid: int = -1,
) -> tuple[Path, Path]:
    ca_cert, ca_key = load_ca(directory)
    key = _new_key()
    public = key.public_key()
    now = _now()
    not_after = now + datetime.timedelta(days=days)
    if not_after > ca_cert.not_valid_after_utc:
        # A certificate outliving its CA would fail verification at the CA's end anyway.
        not_after = ca_cert.not_valid_after_utc
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedmq"),
            x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, unit),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]))
        .issuer_name(ca_cert.subject)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _BACKDATE)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False, data_encipherment=False,
                key_agreement=False, key_cert_sign=False, crl_sign=False, encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(
                ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
            ),
            critical=False,
        )
    )
    if san:
        builder = builder.add_extension(x509.SubjectAlternativeName(san), critical=False)
    cert = builder.sign(ca_key, hashes.SHA256())
    _ensure_dir(cert_path.parent)
    _write_file(key_path, _key_pem(key), KEY_MODE if key_gid == -1 else GROUP_KEY_MODE, key_gid)
    _write_file(cert_path, cert.public_bytes(serialization.Encoding.PEM), CERT_MODE)
    logger.info("Issued %s certificate %s (CN=%s)", unit, cert_path, common_name)
    return cert_path, key_path


def issue_server(
    directory: str | os.PathLike[str],
    *,
    hostnames: list[str],
    ips: list[str] | None = None,
    days: int = 825,
    key_group: str | None = None,
    force: bool = False,
) -> tuple[Path, Path]:
    """Issue the broker's certificate (``server/server.pem``, ``server/server.key``).

    ``hostnames`` become DNS SAN entries (the first also the CN) and ``ips`` (default
    ``["127.0.0.1"]``) IP SAN entries: clients check the name they dial against these.

    Mosquitto 2.0 started as root reads its TLS files *after* dropping to its ``user``
    (``mosquitto`` on Debian), so a root-owned 0600 key stops it at start-up ("Unable to load
    server key file"). ``key_group="mosquitto"`` writes the key 0640 with that group instead
    (needs root, or membership of the group).
    """
    ips = ["127.0.0.1"] if ips is None else list(ips)
    _check_days(days)
    key_gid = -1
    if key_group is not None:
        try:
            key_gid = grp.getgrnam(key_group).gr_gid
        except KeyError:
            raise PkiError(f"no group {key_group!r} on this machine (key_group)") from None
    if not hostnames and not ips:
        raise PkiError("a server certificate needs at least one hostname or IP address")
    san: list[x509.GeneralName] = []
    for host in hostnames:
        if not isinstance(host, str) or not host or any(c.isspace() for c in host) or "/" in host:
            raise PkiError(f"invalid hostname {host!r}")
        try:
            ipaddress.ip_address(host)
        except ValueError:
            pass
        else:
            raise PkiError(f"{host!r} is an IP address: pass it in ips, not hostnames")
        try:
            san.append(x509.DNSName(host.encode("idna").decode("ascii")))
        except UnicodeError as exc:
            raise PkiError(f"invalid hostname {host!r}: {exc}") from exc
    for ip in ips:
        try:
            san.append(x509.IPAddress(ipaddress.ip_address(ip)))
        except ValueError as exc:
            raise PkiError(f"invalid IP address {ip!r}") from exc
    base = Path(directory) / SERVER_DIR
    cert_path, key_path = base / "server.pem", base / "server.key"
    _refuse_existing((cert_path, key_path), "a server certificate", force)
    common_name = hostnames[0] if hostnames else ips[0]
    return _issue(directory, common_name=common_name, unit="broker", usage=ExtendedKeyUsageOID.SERVER_AUTH,
                  cert_path=cert_path, key_path=key_path, days=days, san=san, key_gid=key_gid)


def device_paths(directory: str | os.PathLike[str], device_id: str) -> tuple[Path, Path]:
    """``(cert, key)`` paths of a device under ``directory``."""
    base = Path(directory) / DEVICES_DIR
    return base / f"{device_id}.pem", base / f"{device_id}.key"


def client_paths(directory: str | os.PathLike[str], name: str) -> tuple[Path, Path]:
    """``(cert, key)`` paths of an aggregator or operator identity under ``directory``."""
    base = Path(directory) / CLIENTS_DIR
    return base / f"{name}.pem", base / f"{name}.key"


def issue_device(
    directory: str | os.PathLike[str], device_id: str, *, days: int = 825, force: bool = False
) -> tuple[Path, Path]:
    """Issue ``devices/<device_id>.pem|key``: CN = device id = MQTT client id, clientAuth.

    ``force`` replaces an existing certificate and key; the replaced certificate stays valid
    until it expires unless it was revoked first (:func:`revoke`). Each certificate has a new
    random serial, so re-issuing a revoked device id gives it a certificate the CRL does not list.
    """
    try:
        check_device(device_id)
    except TopicError as exc:
        raise PkiError(str(exc)) from exc
    _check_days(days)
    if any(p.exists() for p in client_paths(directory, device_id)):
        raise PkiError(f"{device_id!r} is already an aggregator/operator identity; a device cannot share its name")
    cert_path, key_path = device_paths(directory, device_id)
    _refuse_existing((cert_path, key_path), f"a certificate for device {device_id!r}", force)
    return _issue(directory, common_name=device_id, unit="device", usage=ExtendedKeyUsageOID.CLIENT_AUTH,
                  cert_path=cert_path, key_path=key_path, days=days)


def issue_client(
    directory: str | os.PathLike[str], name: str, *, role: Role, days: int = 825, force: bool = False
) -> tuple[Path, Path]:
    """Issue ``clients/<name>.pem|key`` for the aggregator or an operator: CN = name, clientAuth.

    The role is recorded in the certificate (OU) for people reading it; the broker authorises by
    CN through the ACL file (:func:`fedmq.broker.mosquitto_config.render_acl`).
    """
    if role not in ROLES:
        raise PkiError(f"role must be one of {list(ROLES)}, got {role!r}")
    try:
        check_name(name, f"{role} name")
    except TopicError as exc:
        raise PkiError(str(exc)) from exc
    _check_days(days)
    if any(p.exists() for p in device_paths(directory, name)):
        raise PkiError(f"{name!r} is already a device id; an {role} cannot share its name")
    cert_path, key_path = client_paths(directory, name)
    _refuse_existing((cert_path, key_path), f"a certificate for {name!r}", force)
    return _issue(directory, common_name=name, unit=role, usage=ExtendedKeyUsageOID.CLIENT_AUTH,
                  cert_path=cert_path, key_path=key_path, days=days)


@dataclass(frozen=True, slots=True)
class Revocation:
    """One revoked device certificate, as recorded in ``revoked.json``."""

    device: str
    serial: int
    revoked_at: datetime.datetime
    reason: str


def _crl_path(directory: str | os.PathLike[str]) -> Path:
    return Path(directory).resolve() / CRL_FILE


def _write_crl(directory: Path, ca_cert: x509.Certificate, ca_key: ec.EllipticCurvePrivateKey,
               entries: list[x509.RevokedCertificate], *, number: int) -> None:
    now = _now()
    # nextUpdate = the CA's own expiry. OpenSSL (so Mosquitto's crlfile check) refuses *every*
    # client certificate once the CRL it checks against has expired, and nobody re-signs this
    # CRL on a schedule: a short nextUpdate would lock the whole fleet out one day. Past the CA's
    # expiry nothing verifies anyway. thisUpdate is backdated like the certificates: a broker
    # whose clock lags the PKI host would otherwise find the CRL "not yet valid", same lock-out.
    next_update = max(ca_cert.not_valid_after_utc, now + datetime.timedelta(days=1))
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca_cert.subject)
        .last_update(now - _BACKDATE)
        .next_update(next_update)
        .add_extension(x509.CRLNumber(number), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(
                ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
            ),
            critical=False,
        )
    )
    for entry in entries:
        builder = builder.add_revoked_certificate(entry)
    crl = builder.sign(ca_key, hashes.SHA256())
    _write_file(directory / CRL_FILE, crl.public_bytes(serialization.Encoding.PEM), CERT_MODE)


def load_crl(directory: str | os.PathLike[str]) -> x509.CertificateRevocationList | None:
    """The CRL of the PKI in ``directory`` (``None`` when there is no ``crl.pem``), checked against ``ca.pem``.

    :class:`PkiError` when it is unreadable, not issued by this CA, or its signature does not verify
    (Mosquitto would then refuse every client certificate).
    """
    path = Path(directory) / CRL_FILE
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise PkiError(f"cannot read {path}: {exc}") from exc
    ca_file = Path(directory) / CA_CERT
    try:
        crl = x509.load_pem_x509_crl(data)
        ca_cert = x509.load_pem_x509_certificate(ca_file.read_bytes())
    except (OSError, ValueError) as exc:
        raise PkiError(f"cannot read the CRL {path} or the CA {ca_file}: {exc}") from exc
    if crl.issuer != ca_cert.subject or not crl.is_signature_valid(ca_cert.public_key()):  # type: ignore[arg-type]
        raise PkiError(f"{path} is not signed by the CA {ca_file} (was the CA replaced?); remove it and run "
                       "`fedmq pki revoke` again for the devices to revoke, or `fedmq broker config` to recreate it empty")
    return crl


def crl_file(directory: str | os.PathLike[str]) -> Path:
    """The absolute path of the PKI's CRL (``crl.pem``), for Mosquitto's ``crlfile``.

    A PKI directory made before fedmq had revocation has no CRL: an empty one is created then
    (that needs the CA key; without it, copy ``crl.pem`` from the PKI host). The CRL is checked
    against ``ca.pem`` (:func:`load_crl`).
    """
    path = _crl_path(directory)
    if load_crl(directory) is None:
        try:
            ca_cert, ca_key = load_ca(directory)
        except PkiError as exc:
            raise PkiError(f"no {path} and the CA key is not here to create it ({exc}); copy crl.pem from "
                           "the PKI directory that holds ca.key, or run `fedmq broker config --pki DIR` there") from exc
        _write_crl(path.parent, ca_cert, ca_key, [], number=1)
        logger.info("Created an empty CRL %s", path)
    return path


def _serial_hex(serial: int) -> str:
    return f"{serial:X}"  # as `openssl x509 -noout -serial` prints it


def revoked_devices(directory: str | os.PathLike[str]) -> tuple[Revocation, ...]:
    """Every revocation recorded in ``revoked.json`` of ``directory``, oldest first (none when absent).

    The file, ``{"revoked": [{"device", "serial" (hex), "revoked_at" (ISO 8601 UTC), "reason"}]}``,
    is the readable side of ``crl.pem``: an entry names the device *certificate* that was revoked.
    A device id re-issued since then has a new certificate that is valid again; see
    :func:`revoked_device_ids` for the ids revoked now.
    """
    path = Path(directory) / REVOKED_FILE
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return ()
    except (OSError, ValueError) as exc:
        raise PkiError(f"cannot read {path}: {exc}") from exc
    try:
        return tuple(
            Revocation(device=str(entry["device"]), serial=int(entry["serial"], 16),
                       revoked_at=datetime.datetime.fromisoformat(entry["revoked_at"]), reason=str(entry["reason"]))
            for entry in document["revoked"]
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise PkiError(f"{path} is not a fedmq revocation list ({exc!r})") from exc


def _write_revoked(directory: Path, revocations: tuple[Revocation, ...]) -> None:
    document = {"revoked": [
        {"device": r.device, "serial": _serial_hex(r.serial), "revoked_at": r.revoked_at.isoformat(), "reason": r.reason}
        for r in revocations
    ]}
    _write_file(directory / REVOKED_FILE, (json.dumps(document, indent=2) + "\n").encode("utf-8"), CERT_MODE)


def revoked_device_ids(directory: str | os.PathLike[str]) -> list[str]:
    """The device ids revoked now: a revocation is recorded and the device has no newer certificate.

    A device id re-issued after its revocation (``issue_device(force=True)``) is not in the list.
    """
    records = revoked_devices(directory)
    current: list[str] = []
    for device in sorted({r.device for r in records}):
        cert_path, _ = device_paths(directory, device)
        try:
            serial = x509.load_pem_x509_certificate(cert_path.read_bytes()).serial_number
        except FileNotFoundError:
            current.append(device)  # certificate removed: the revocation stands
            continue
        except (OSError, ValueError) as exc:
            raise PkiError(f"cannot read {cert_path}: {exc}") from exc
        if any(r.device == device and r.serial == serial for r in records):
            current.append(device)
    return current


def revoke(directory: str | os.PathLike[str], device_id: str, *, reason: str = "unspecified") -> Revocation:
    """Revoke the current certificate of ``device_id``: add its serial to ``crl.pem`` and ``revoked.json``.

    The CRL keeps every earlier revocation, is re-signed by the CA key (thisUpdate now, nextUpdate
    the CA's expiry: see the comment in the code) and written 0644 atomically; ``reason`` is free
    text kept in ``revoked.json`` only. Revoking a certificate that is already revoked changes
    nothing and returns the earlier record.

    When it takes effect, as measured with Mosquitto 2.0.11 and the files of ``fedmq broker config``
    (``tests/test_revocation.py`` checks it):

    * Mosquitto reads ``crlfile`` when it starts and when it reloads its configuration (SIGHUP,
      ``systemctl reload mosquitto``), never in between: until then the revoked certificate still
      connects. After the reload its TLS handshake fails ("certificate verify failed").
    * A connection opened before the reload is *not* closed by it, and the CRL alone leaves it
      every right: it still publishes. The regenerated ACL (``fedmq broker config`` denies the
      ids of :func:`revoked_device_ids` every topic) is reloaded by the same SIGHUP and applies to
      open connections at once: the revoked device's publishes are dropped and nothing more is
      delivered to it. Only a restart closes that connection.
    * A reload that cannot read the CRL keeps the previous one (the log says "Unable to load
      certificate revocation file"); a start without it fails. An expired or not-yet-valid CRL
      makes Mosquitto refuse *every* client certificate, hence nextUpdate = the CA's expiry.

    :class:`PkiError` for an unknown device id or a certificate this CA did not issue.
    """
    try:
        check_device(device_id)
    except TopicError as exc:
        raise PkiError(str(exc)) from exc
    if not isinstance(reason, str) or not reason.strip() or not reason.isprintable() or len(reason) > 200:
        raise PkiError(f"reason must be a short line of printable text, got {reason!r}")
    cert_path, _ = device_paths(directory, device_id)
    try:
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    except FileNotFoundError:
        raise PkiError(f"no certificate for device {device_id!r} ({cert_path} is missing): check the id against "
                       f"the files in {cert_path.parent}; identities in {Path(directory) / CLIENTS_DIR} are "
                       "not devices") from None
    except (OSError, ValueError) as exc:
        raise PkiError(f"cannot read {cert_path}: {exc}") from exc
    ca_cert, ca_key = load_ca(directory)
    try:
        cert.verify_directly_issued_by(ca_cert)
    except (ValueError, TypeError, InvalidSignature) as exc:
        raise PkiError(f"{cert_path} was not issued by the CA in {directory}; nothing to revoke there") from exc

    base = Path(directory)
    crl = load_crl(base)
    entries = list(crl) if crl is not None else []
    now = _now()
    if not any(entry.serial_number == cert.serial_number for entry in entries):
        entries.append(x509.RevokedCertificateBuilder().serial_number(cert.serial_number).revocation_date(now).build())
        number = 1
        if crl is not None:
            try:
                number = crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number + 1
            except x509.ExtensionNotFound:
                number = len(entries)
        # CRL first: it is what the broker enforces; revoked.json can be completed by a re-run.
        _write_crl(base, ca_cert, ca_key, entries, number=number)
    records = revoked_devices(base)
    for record in records:
        if record.serial == cert.serial_number:
            logger.info("Certificate %s of device %s was already revoked", _serial_hex(record.serial), device_id)
            return record
    record = Revocation(device=device_id, serial=cert.serial_number, revoked_at=now, reason=reason)
    _write_revoked(base, (*records, record))
    logger.warning("Revoked the certificate %s of device %s (%s)", _serial_hex(cert.serial_number), device_id, reason)
    return record


def server_tls_files(directory: str | os.PathLike[str]) -> TlsFiles:
    """The broker's TLS files in a PKI directory, as :func:`~fedmq.broker.mosquitto_config.render_config` takes them."""
    base = Path(directory).resolve()
    files = TlsFiles(ca_file=base / CA_CERT, cert_file=base / SERVER_DIR / "server.pem",
                     key_file=base / SERVER_DIR / "server.key")
    missing = [str(p) for p in (files.ca_file, files.cert_file, files.key_file) if not p.is_file()]
    if missing:
        raise PkiError(f"missing in the PKI directory: {', '.join(missing)} (run init_ca and issue_server)")
    return files


def password_hash(password: str, *, iterations: int = PASSWORD_ITERATIONS, salt: bytes | None = None) -> str:
    """Hash ``password`` the way ``mosquitto_passwd`` 2.0 does: ``$7$<iterations>$<b64 salt>$<b64 hash>``.

    PBKDF2-HMAC-SHA512 over the UTF-8 password with a 12-byte salt, 64-byte result, standard
    base64 with padding.
    """
    if not isinstance(password, str) or not password:
        raise PkiError("a password must be a non-empty string")
    if "\0" in password:
        raise PkiError("a password cannot contain NUL characters (Mosquitto stops at the first)")
    if not isinstance(iterations, int) or isinstance(iterations, bool) or iterations < 1:
        raise PkiError(f"iterations must be a positive integer, got {iterations!r}")
    salt = secrets.token_bytes(_PASSWORD_SALT_BYTES) if salt is None else salt
    if len(salt) != _PASSWORD_SALT_BYTES:
        raise PkiError(f"Mosquitto needs a {_PASSWORD_SALT_BYTES}-byte salt, got {len(salt)} bytes")
    digest = hashlib.pbkdf2_hmac("sha512", password.encode("utf-8"), salt, iterations, _PASSWORD_HASH_BYTES)
    return f"$7${iterations}${base64.b64encode(salt).decode('ascii')}${base64.b64encode(digest).decode('ascii')}"


def write_password_file(
    path: str | os.PathLike[str],
    users: dict[str, str],
    *,
    iterations: int = PASSWORD_ITERATIONS,
    mode: int = 0o640,
) -> Path:
    """Write a Mosquitto ``password_file`` for ``users`` (username -> password), atomically.

    Usernames follow the fleet naming rules (they are device ids, the aggregator's and the
    operators' names). ``mode`` defaults to 0640: the hashes are offline-guessable, so give the
    file to the broker's group (``chgrp mosquitto``) rather than making it world-readable.
    """
    if not users:
        raise PkiError("a password file needs at least one user")
    lines = []
    for username, password in sorted(users.items()):
        try:
            check_name(username, "username")
        except TopicError as exc:
            raise PkiError(str(exc)) from exc
        lines.append(f"{username}:{password_hash(password, iterations=iterations)}\n")
    target = Path(path)
    _write_file(target, "".join(lines).encode("ascii"), mode)
    return target
