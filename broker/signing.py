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
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from .errors import ConfigError, Reason, RejectedMessage
from .files import write_atomic

ALGORITHM = "ed25519"

log = logging.getLogger(__name__)


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
        from .files import check_private_key_file

        check_private_key_file(Path(path), what="the model signing key (signing.key_file)")
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

    def sig_header(self) -> dict[str, Any]:
        """The ``sig`` header field of a frame this key signs."""
        return {"alg": ALGORITHM, "key": self.key_id}

    def write(self, private_path: Path, public_path: Path) -> None:
        """Write the private key (PEM, mode 0600) and the public key (PEM) for provisioning."""
        pem = self.private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                         serialization.NoEncryption())
        from .files import write_private

        private_path.parent.mkdir(parents=True, exist_ok=True)
        write_private(private_path, pem)  # O_EXCL, mode 0600 before any byte; never through a planted path
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
    """The fleet keys a device accepts models from, persisted in ``path`` (JSON): a small root of
    trust in the spirit of TUF.

    - ``current``: the key releases are signed with (at first, the provisioned key);
    - ``next``: the key the current one announced in a model it signed (``next_key``), the
      signed rotation statement; models signed by it verify too;
    - ``retired``: keys that a rotation replaced. Once the device installs a model signed by
      ``next``, that key becomes ``current`` and the old one is retired for good: a model signed
      by a retired key never verifies again, whatever its version.

    So a device trusts at most two keys at a time, and a stolen old key is worth nothing after a
    rotation has reached the device.
    """

    def __init__(self, path: Path, provisioned: bytes) -> None:
        self.path = Path(path)
        self.current: bytes = provisioned
        self.next: bytes | None = None
        self.retired: dict[str, float] = {}  # key id -> when it was retired (unix time)
        # keys of a trust store written before rotations retired keys: which one is current is not
        # recorded there, so all of them verify until the first install says (then the rest retire)
        self.legacy: dict[str, bytes] = {}
        if self.path.exists():
            try:
                self._load(json.loads(self.path.read_text()), provisioned)
            except (OSError, ValueError, KeyError, TypeError) as exc:
                raise ConfigError(f"trust store {self.path} is unreadable ({exc}); remove it to start from the "
                                  "provisioned key only") from None

    def _load(self, stored: dict[str, Any], provisioned: bytes) -> None:
        if "keys" in stored:  # the format before rotation retired keys: provisioned + announced keys
            self.legacy = {key_id(raw): raw for raw in (bytes.fromhex(k) for k in stored["keys"])}
            return
        current = bytes.fromhex(stored["current"])
        retired = {str(k): float(v) for k, v in stored.get("retired", {}).items()}
        if key_id(provisioned) != key_id(current) and key_id(provisioned) not in retired and (
                stored.get("next") is None or bytes.fromhex(stored["next"]) != provisioned):
            # the operator provisioned a new fleet key on purpose: it replaces what was stored
            log.warning("trust store %s names key %s, but the provisioned fleet key is %s: starting from the "
                        "provisioned key", self.path, key_id(current), key_id(provisioned))
            self.retired = retired
            return
        self.current = current
        self.next = bytes.fromhex(stored["next"]) if stored.get("next") else None
        self.retired = retired

    @property
    def keys(self) -> dict[str, bytes]:
        """The keys that verify now, by key id."""
        trusted = dict(self.legacy)
        trusted[key_id(self.current)] = self.current
        if self.next is not None:
            trusted[key_id(self.next)] = self.next
        return trusted

    def verify(self, signed: memoryview | bytes | None, signature: bytes | None, sig_header: object) -> str:
        """Check a frame's signature; return the key id. Raises ``RejectedMessage(signature)``."""
        if signed is None or signature is None or not isinstance(sig_header, dict):
            raise RejectedMessage(Reason.SIGNATURE, "model is not signed; this device only installs signed models")
        if sig_header.get("alg") != ALGORITHM:
            raise RejectedMessage(Reason.SIGNATURE, f"unsupported signature algorithm {sig_header.get('alg')!r}")
        kid = sig_header.get("key")
        if isinstance(kid, str) and kid in self.retired:
            raise RejectedMessage(Reason.SIGNATURE, f"model is signed by key {kid}, which a key rotation retired; "
                                  f"trusted now: {sorted(self.keys)}")
        raw = self.keys.get(kid) if isinstance(kid, str) else None
        if raw is None:
            raise RejectedMessage(Reason.SIGNATURE, f"model is signed by unknown key {kid!r}; trusted: {sorted(self.keys)}")
        try:
            Ed25519PublicKey.from_public_bytes(raw).verify(signature, bytes(signed))
        except InvalidSignature:
            raise RejectedMessage(Reason.SIGNATURE, f"signature does not verify with key {kid} (tampered or forged)") from None
        return kid

    def installed(self, signer_kid: str, announced: bytes | None) -> list[str]:
        """Record that a model signed by ``signer_kid`` (verified) announcing ``announced`` was
        installed: rotate when it was signed by the next key, remember a newly announced key.
        Returns what changed, for the log; persists atomically when anything did."""
        changes: list[str] = []
        if self.legacy:
            changes.append(self.settle(signer_kid, announced))
        if self.next is not None and signer_kid == key_id(self.next) and signer_kid != key_id(self.current):
            old = key_id(self.current)
            self.retired[old] = time.time()
            self.current, self.next = self.next, None
            changes.append(f"key {signer_kid} is now the fleet key; key {old} is retired")
        if announced is not None and key_id(announced) != key_id(self.current) and key_id(announced) not in self.retired \
                and (self.next is None or key_id(self.next) != key_id(announced)):
            self.next = announced
            changes.append(f"key {key_id(announced)} announced as the next fleet key")
        if changes:
            self._save()
        return changes

    def settle(self, signer_kid: str, announced: bytes | None) -> str:
        """Resolve a trust store of the older format: ``signer_kid`` signed the newest installed
        model (the agent calls this at start-up with the model on disk, else the first install
        does), so it is the current key and ``announced`` the next one; the other keys retire."""
        if signer_kid in self.legacy:
            self.current = self.legacy[signer_kid]
        if announced is not None and key_id(announced) != key_id(self.current):
            self.next = announced
        now = time.time()
        for kid in self.legacy:
            if kid not in (key_id(self.current), key_id(self.next) if self.next is not None else ""):
                self.retired[kid] = now
        self.legacy = {}
        self._save()
        return (f"key {key_id(self.current)} is the fleet key"
                + (f", {key_id(self.next)} the announced next one" if self.next is not None else "")
                + "; the other keys of the old trust store are retired")

    def _save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(self.path, json.dumps({
            "current": self.current.hex(), "next": self.next.hex() if self.next else None,
            "retired": self.retired}, sort_keys=True).encode())
