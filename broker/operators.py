"""Operator signatures: ops requests and fleet commands signed end to end by an operator key.

The broker ACL says who may *publish* a request or a command, but a broker that has been taken
over publishes whatever it likes. So an operator signs what it sends with the private key of its
client certificate (``fedmq pki issue-client NAME --role operator``: ECDSA P-256, issued by the
fleet CA), and puts that certificate in the frame's ``sig`` header::

    sig = {"alg": "ecdsa-p256", "cert": <the operator certificate, DER>}

followed by the 64-byte signature (r || s, big-endian, 32 bytes each) over every byte before it
(:mod:`.wire`, signed frames). The aggregator and the devices hold the fleet CA certificate, the
same file they use to check the broker's TLS certificate, and accept a signature only when

- the certificate was issued by that CA, is valid now, and is an operator's (OU ``operator``,
  extended key usage clientAuth): a device's or the aggregator's certificate signs nothing here;
- its serial is not in the CRL, when one is configured (``fedmq pki revoke``);
- the signature verifies over the frame.

Freshness and replay are the receivers' business (``issued_at`` in the signed header): the
aggregator takes requests issued at most :data:`REQUEST_WINDOW_S` ago and remembers their ids
for that long; a device takes commands newer than the one in force and not from the future.
"""

from __future__ import annotations

import datetime
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature, encode_dss_signature
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from .errors import ConfigError, Reason, RejectedMessage

log = logging.getLogger(__name__)

ALGORITHM = "ecdsa-p256"
OPERATOR_UNIT = "operator"
#: How old a signed ops request may be when it arrives (by the aggregator's clock).
REQUEST_WINDOW_S = 300.0
_COORDINATE_BYTES = 32


def _load_certificate(path: str | Path, what: str) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(Path(path).read_bytes())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read {what} {path}: {exc}") from None


@dataclass(frozen=True, slots=True)
class OperatorSigner:
    """An operator's certificate and private key (the ops CLI side)."""

    certificate: x509.Certificate = field(repr=False)
    private: ec.EllipticCurvePrivateKey = field(repr=False)

    @classmethod
    def from_files(cls, cert_file: str | Path, key_file: str | Path) -> OperatorSigner:
        """Load an operator identity; :class:`ConfigError` when it is not one that can sign."""
        from .files import check_private_key_file

        certificate = _load_certificate(cert_file, "the operator certificate")
        check_private_key_file(Path(key_file), what="the operator's private key")
        try:
            key = serialization.load_pem_private_key(Path(key_file).read_bytes(), password=None)
        except (OSError, ValueError, TypeError) as exc:
            raise ConfigError(f"cannot read the operator's private key {key_file}: {exc}") from None
        if not isinstance(key, ec.EllipticCurvePrivateKey) or not isinstance(key.curve, ec.SECP256R1):
            raise ConfigError(f"{key_file} is not an ECDSA P-256 key (issue operator identities with `fedmq pki issue-client`)")
        if key.public_key().public_numbers() != certificate.public_key().public_numbers():  # type: ignore[union-attr]
            raise ConfigError(f"{key_file} is not the private key of {cert_file}")
        units = [a.value for a in certificate.subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)]
        if OPERATOR_UNIT not in units:
            raise ConfigError(f"{cert_file} is not an operator certificate (OU {units}); issue one with "
                              "`fedmq pki issue-client NAME --role operator`")
        return cls(certificate, key)

    @property
    def name(self) -> str:
        return str(self.certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value)

    def sig_header(self) -> dict[str, Any]:
        return {"alg": ALGORITHM, "cert": self.certificate.public_bytes(serialization.Encoding.DER)}

    def sign(self, data: bytes) -> bytes:
        r, s = decode_dss_signature(self.private.sign(data, ec.ECDSA(hashes.SHA256())))
        return r.to_bytes(_COORDINATE_BYTES, "big") + s.to_bytes(_COORDINATE_BYTES, "big")


class OperatorVerifier:
    """Checks operator signatures against the fleet CA (and its CRL, when given)."""

    def __init__(self, ca: x509.Certificate, *, crl_file: Path | None = None) -> None:
        self.ca = ca
        self.crl_file = crl_file
        self._crl: tuple[float, frozenset[int]] | None = None  # (file mtime, revoked serials)
        self._trusted: dict[bytes, tuple[str, x509.Certificate]] = {}  # DER -> (name, cert) already checked

    @classmethod
    def from_files(cls, ca_file: str | Path, crl_file: str | Path | None = None) -> OperatorVerifier:
        return cls(_load_certificate(ca_file, "the fleet CA certificate"),
                   crl_file=Path(crl_file) if crl_file else None)

    def _revoked(self) -> frozenset[int]:
        """The CRL's serials, re-read when the file changes (``fedmq pki revoke`` rewrites it)."""
        if self.crl_file is None:
            return frozenset()
        try:
            mtime = self.crl_file.stat().st_mtime
        except FileNotFoundError:
            return frozenset()
        if self._crl is None or self._crl[0] != mtime:
            try:
                crl = x509.load_pem_x509_crl(self.crl_file.read_bytes())
            except (OSError, ValueError) as exc:
                # a CRL that cannot be read must not let a revoked operator back in
                raise RejectedMessage(Reason.UNAUTHENTICATED, f"the CRL {self.crl_file} is unreadable: {exc}") from None
            if not crl.is_signature_valid(self.ca.public_key()):  # type: ignore[arg-type]
                raise RejectedMessage(Reason.UNAUTHENTICATED, f"the CRL {self.crl_file} is not signed by the fleet CA")
            self._crl = (mtime, frozenset(entry.serial_number for entry in crl))
            self._trusted.clear()
        return self._crl[1]

    def _certificate(self, der: object, now: float) -> tuple[str, x509.Certificate]:
        if not isinstance(der, bytes):
            raise RejectedMessage(Reason.UNAUTHENTICATED, "sig.cert must be the operator certificate (DER bytes)")
        revoked = self._revoked()
        cached = self._trusted.get(der)
        if cached is None:
            try:
                cert = x509.load_der_x509_certificate(der)
                cert.verify_directly_issued_by(self.ca)
            except (ValueError, TypeError, InvalidSignature) as exc:
                raise RejectedMessage(Reason.UNAUTHENTICATED,
                                      f"the signing certificate is not issued by the fleet CA: {exc or type(exc).__name__}") from None
            units = [a.value for a in cert.subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)]
            if OPERATOR_UNIT not in units:
                raise RejectedMessage(Reason.UNAUTHENTICATED, f"the signing certificate is not an operator's (OU {units})")
            try:
                usage = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
            except x509.ExtensionNotFound:
                usage = None
            if usage is None or ExtendedKeyUsageOID.CLIENT_AUTH not in usage:
                raise RejectedMessage(Reason.UNAUTHENTICATED, "the signing certificate is not a client certificate")
            names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
            cached = (str(names[0].value) if names else "?", cert)
            if len(self._trusted) > 1000:
                self._trusted.clear()
            self._trusted[der] = cached
        name, cert = cached
        moment = datetime.datetime.fromtimestamp(now, datetime.UTC)
        if not cert.not_valid_before_utc <= moment <= cert.not_valid_after_utc:
            raise RejectedMessage(Reason.UNAUTHENTICATED, f"operator certificate {name} is not valid now "
                                  f"({cert.not_valid_before_utc:%Y-%m-%d} to {cert.not_valid_after_utc:%Y-%m-%d})")
        if cert.serial_number in revoked:
            raise RejectedMessage(Reason.UNAUTHENTICATED, f"operator certificate {name} is revoked")
        return name, cert

    def verify(self, signed_by: tuple[memoryview, bytes, Mapping[str, Any]] | None, *, now: float) -> str:
        """Check a decoded message's ``signed_by``; return the operator's name (certificate CN).

        Raises ``RejectedMessage(unauthenticated)`` naming what is wrong.
        """
        if signed_by is None:
            raise RejectedMessage(Reason.UNAUTHENTICATED, "not signed by an operator key; sign it with an operator "
                                  "identity from `fedmq pki issue-client NAME --role operator` (--cert-file/--key-file)")
        signed, signature, sig = signed_by
        if sig.get("alg") != ALGORITHM:
            raise RejectedMessage(Reason.UNAUTHENTICATED, f"unsupported operator signature algorithm {sig.get('alg')!r}")
        name, cert = self._certificate(sig.get("cert"), now)
        r = int.from_bytes(signature[:_COORDINATE_BYTES], "big")
        s = int.from_bytes(signature[_COORDINATE_BYTES:], "big")
        try:
            cert.public_key().verify(encode_dss_signature(r, s), bytes(signed), ec.ECDSA(hashes.SHA256()))  # type: ignore[call-arg, arg-type]
        except (InvalidSignature, ValueError, TypeError):
            raise RejectedMessage(Reason.UNAUTHENTICATED, f"the signature of operator {name} does not verify "
                                  "(tampered or forged)") from None
        return name
