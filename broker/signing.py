"""Signed models: Ed25519 keys, the fleet's trust store, and verification.

The aggregator signs every model message with the fleet's private key (a file that never enters
the repository); a signed frame ends with a 64-byte signature over every byte before it, and its
header names the key (``sig.key``: the first 16 hex digits of the sha256 of the raw public key).
Devices are provisioned with the fleet's public key and install only models that verify. A signed
model may announce the next public key (``next_key``); once a device has installed such a model,
models signed with the announced key verify too (key rotation without re-provisioning).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from .errors import ConfigError, Reason, RejectedMessage
from .files import write_atomic

ALGORITHM = "ed25519"


def key_id(public_raw: bytes) -> str:
    """The short name of a public key: the first 16 hex digits of its sha256."""
    return hashlib.sha256(public_raw).hexdigest()[:16]


@dataclass(frozen=True, slots=True)
class SigningKey:
    """The fleet's private signing key (aggregator side)."""

    private: Ed25519PrivateKey = field(repr=False)

    @classmethod
    def generate(cls) -> SigningKey:
        return cls(Ed25519PrivateKey.generate())

    @classmethod
    def from_file(cls, path: str | Path) -> SigningKey:
        try:
            key = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
        except (OSError, ValueError, TypeError) as exc:
            raise ConfigError(f"cannot load the Ed25519 signing key {path}: {exc}", key="signing.key_file") from None
        if not isinstance(key, Ed25519PrivateKey):
            raise ConfigError(f"{path} is not an Ed25519 private key", key="signing.key_file")
        return cls(key)

    @property
    def public_raw(self) -> bytes:
        return self.private.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)

    @property
    def key_id(self) -> str:
        return key_id(self.public_raw)

    def sign(self, data: bytes) -> bytes:
        return self.private.sign(data)

    def write(self, private_path: Path, public_path: Path) -> None:
        """Write the private key (PEM, mode 0600) and the public key (PEM) for provisioning."""
        pem = self.private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                         serialization.NoEncryption())
        private_path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(private_path.with_name(f".{private_path.name}.tmp"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(pem)
        os.replace(private_path.with_name(f".{private_path.name}.tmp"), private_path)
        write_atomic(public_path, public_pem(self.public_raw))


def public_pem(public_raw: bytes) -> bytes:
    return Ed25519PublicKey.from_public_bytes(public_raw).public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def load_public_key(path: str | Path) -> bytes:
    """The raw 32 bytes of an Ed25519 public key in a PEM file."""
    try:
        key = serialization.load_pem_public_key(Path(path).read_bytes())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot load the fleet public key {path}: {exc}", key="fleet_public_key") from None
    if not isinstance(key, Ed25519PublicKey):
        raise ConfigError(f"{path} is not an Ed25519 public key", key="fleet_public_key")
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


class TrustStore:
    """The public keys a device accepts models from, persisted in ``path`` (JSON).

    Starts from the provisioned fleet key; keys announced by verified models are added.
    """

    def __init__(self, path: Path, provisioned: bytes) -> None:
        self.path = Path(path)
        self.keys: dict[str, bytes] = {key_id(provisioned): provisioned}
        if self.path.exists():
            try:
                stored = json.loads(self.path.read_text())
                for hex_key in stored.get("keys", []):
                    raw = bytes.fromhex(hex_key)
                    self.keys[key_id(raw)] = raw
            except (OSError, ValueError) as exc:
                raise ConfigError(f"trust store {self.path} is unreadable ({exc}); remove it to start from the "
                                  "provisioned key only") from None

    def verify(self, signed: memoryview | bytes | None, signature: bytes | None, sig_header: object) -> str:
        """Check a frame's signature; return the key id. Raises ``RejectedMessage(signature)``."""
        if signed is None or signature is None or not isinstance(sig_header, dict):
            raise RejectedMessage(Reason.SIGNATURE, "model is not signed; this device only installs signed models")
        if sig_header.get("alg") != ALGORITHM:
            raise RejectedMessage(Reason.SIGNATURE, f"unsupported signature algorithm {sig_header.get('alg')!r}")
        kid = sig_header.get("key")
        raw = self.keys.get(kid) if isinstance(kid, str) else None
        if raw is None:
            raise RejectedMessage(Reason.SIGNATURE, f"model is signed by unknown key {kid!r}; trusted: {sorted(self.keys)}")
        try:
            Ed25519PublicKey.from_public_bytes(raw).verify(signature, bytes(signed))
        except InvalidSignature:
            raise RejectedMessage(Reason.SIGNATURE, f"signature does not verify with key {kid} (tampered or forged)") from None
        return kid

    def trust(self, public_raw: bytes) -> bool:
        """Add an announced key (persisted atomically); return whether it was new."""
        kid = key_id(public_raw)
        if kid in self.keys:
            return False
        self.keys[kid] = public_raw
        self.path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(self.path, json.dumps({"keys": sorted(k.hex() for k in self.keys.values())}).encode())
        return True
