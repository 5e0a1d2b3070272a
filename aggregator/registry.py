"""The model registry: every published version, in SQLite plus one blob file per version.

A blob is the exact model payload that was published, written atomically (temporary file, fsync,
rename, fsync of the directory) before its row is committed, so a crash leaves either the whole
version or none of it. A restart resumes from the latest row.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedmq.broker.errors import FedmqError
from fedmq.broker.files import write_atomic

SCHEMA = """
CREATE TABLE IF NOT EXISTS versions (
    version     INTEGER PRIMARY KEY,
    parent      INTEGER NOT NULL,
    created     REAL NOT NULL,
    blob        TEXT NOT NULL,
    sha256      TEXT NOT NULL,
    size        INTEGER NOT NULL,
    info        TEXT NOT NULL
);
"""


class RegistryError(FedmqError):
    """The registry on disk is inconsistent (a missing or corrupt blob)."""


@dataclass(frozen=True, slots=True)
class VersionRecord:
    version: int
    parent: int
    created: float
    blob: Path
    sha256: str
    size: int
    info: dict[str, Any]


class ModelRegistry:
    """Versions of the global model under ``state_dir`` (``registry.sqlite3`` and ``models/``)."""

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = Path(state_dir)
        self.blob_dir = self.state_dir / "models"
        self.blob_dir.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(self.state_dir / "registry.sqlite3", isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(SCHEMA)

    def close(self) -> None:
        self._db.close()

    def add(self, version: int, parent: int, payload: bytes, info: dict[str, Any]) -> VersionRecord:
        """Store the payload of ``version``; versions must be added in increasing order, once each."""
        latest = self.latest()
        if latest is not None and version <= latest.version:
            raise RegistryError(f"version {version} is not newer than the registry's latest ({latest.version})")
        blob = self.blob_dir / f"v{version:08d}.fmq"
        write_atomic(blob, payload)
        digest = hashlib.sha256(payload).hexdigest()
        created = time.time()
        self._db.execute(
            "INSERT INTO versions (version, parent, created, blob, sha256, size, info) VALUES (?, ?, ?, ?, ?, ?, ?)",
            (version, parent, created, blob.name, digest, len(payload), json.dumps(info, sort_keys=True)),
        )
        return VersionRecord(version, parent, created, blob, digest, len(payload), info)

    def _record(self, row: tuple[Any, ...]) -> VersionRecord:
        version, parent, created, blob, digest, size, info = row
        return VersionRecord(version, parent, created, self.blob_dir / blob, digest, size, json.loads(info))

    def latest(self) -> VersionRecord | None:
        row = self._db.execute(
            "SELECT version, parent, created, blob, sha256, size, info FROM versions ORDER BY version DESC LIMIT 1"
        ).fetchone()
        return self._record(row) if row else None

    def get(self, version: int) -> VersionRecord | None:
        row = self._db.execute(
            "SELECT version, parent, created, blob, sha256, size, info FROM versions WHERE version = ?", (version,)
        ).fetchone()
        return self._record(row) if row else None

    def versions(self) -> list[VersionRecord]:
        rows = self._db.execute(
            "SELECT version, parent, created, blob, sha256, size, info FROM versions ORDER BY version"
        ).fetchall()
        return [self._record(r) for r in rows]

    def load_payload(self, record: VersionRecord) -> bytes:
        """The stored payload of ``record``, checked against its sha256."""
        try:
            payload = record.blob.read_bytes()
        except FileNotFoundError:
            raise RegistryError(f"blob {record.blob} of version {record.version} is missing") from None
        if hashlib.sha256(payload).hexdigest() != record.sha256:
            raise RegistryError(f"blob {record.blob} of version {record.version} is corrupt (sha256 mismatch)")
        return payload
