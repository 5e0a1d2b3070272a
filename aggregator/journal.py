"""The aggregator's write-ahead journal: every accepted update, on disk before its receipt.

One append-only file per round (``v00000007.log`` holds the updates accepted for version 7).
A record is ``<length u32><crc32 u32><device length u16><device><payload>``, little-endian; the
file is fsynced after each append, before the receipt goes out, or once for a whole batch of
appends inside :meth:`UpdateJournal.group_commit` (the caller then sends the batch's receipts after
the block). On restart the open round is
rebuilt by replaying its file, and the (device, update id) pairs of the last few rounds are read
back for de-duplication. A record cut short by a crash (never acknowledged) is truncated away.
"""

from __future__ import annotations

import logging
import os
import struct
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from fedmq.broker.errors import FedmqError

log = logging.getLogger(__name__)

try:  # the same CRC-32, computed with carry-less multiplication: about 4x faster than zlib's
    from zlib_ng.zlib_ng import crc32
except ImportError:  # pip install 'fedmq[fast]'
    from zlib import crc32

_HEAD = struct.Struct("<II")
_DEVICE = struct.Struct("<H")
MAX_RECORD = 1 << 30


class JournalError(FedmqError):
    """The journal cannot be written (disk full, permissions): the update is not accepted."""


class UpdateJournal:
    """Journal files under ``directory``; ``keep_rounds`` closed rounds are kept for de-duplication."""

    def __init__(self, directory: Path, *, keep_rounds: int = 3, fsync: bool = True) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.keep_rounds = keep_rounds
        self.fsync = fsync
        self._file: int | None = None
        self._group = False       # inside group_commit(): appends leave the fsync to the block's end
        self._unsynced = False
        self.version = 0

    def path(self, version: int) -> Path:
        return self.directory / f"v{version:08d}.log"

    def open_round(self, version: int) -> list[tuple[str, bytes]]:
        """Start (or resume) the journal of ``version``'s round; return the records it already has."""
        self.close()
        path = self.path(version)
        records, valid_end = self._scan(path) if path.exists() else ([], 0)
        self._file = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
        size = os.fstat(self._file).st_size
        if size != valid_end:
            log.warning("journal %s: dropping %d bytes of a record cut short by a crash", path, size - valid_end)
            os.ftruncate(self._file, valid_end)
            os.fsync(self._file)
        os.lseek(self._file, valid_end, os.SEEK_SET)
        self.version = version
        self._sync_directory()
        return records

    def append(self, device: str, payload: bytes) -> None:
        """Write one accepted update durably (fsync) before it is acknowledged.

        Inside :meth:`group_commit` the record is written now and fsynced when the block ends.
        """
        if self._file is None:
            raise JournalError("journal is not open")
        name = device.encode()
        prefix = _DEVICE.pack(len(name)) + name
        # writev and a chained crc32: the payload (megabytes) is never copied into a record buffer
        head = _HEAD.pack(len(prefix) + len(payload), crc32(payload, crc32(prefix)))
        size = len(head) + len(prefix) + len(payload)
        position = os.lseek(self._file, 0, os.SEEK_CUR)
        try:
            written = os.writev(self._file, [head, prefix, payload])
            if written != size:
                raise OSError(f"short write ({written} of {size} bytes)")
            if self._group:
                self._unsynced = True
            elif self.fsync:
                os.fsync(self._file)
        except OSError as exc:
            # leave no partial record behind: the next append must start on a record boundary
            os.ftruncate(self._file, position)
            os.lseek(self._file, position, os.SEEK_SET)
            raise JournalError(f"cannot write the journal {self.path(self.version)}: {exc}") from exc

    @contextmanager
    def group_commit(self) -> Iterator[None]:
        """Make the appends inside the block durable with one fsync when it ends.

        For a caller that acknowledges updates in batches: send the receipts of the batch only
        after the block. If that fsync fails, :class:`JournalError` leaves the block and none of
        the batch may be acknowledged; after a failed fsync the kernel may have dropped the
        written pages, so the caller should stop (a restart replays what reached the disk).
        """
        if self._group:
            raise RuntimeError("group_commit() blocks do not nest")
        self._group = True
        try:
            yield
        finally:
            self._group = False
            self.sync()

    def sync(self) -> None:
        """fsync the appends not yet made durable (a no-op when there are none)."""
        if self._file is None or not self._unsynced or not self.fsync:
            self._unsynced = False
            return
        try:
            os.fsync(self._file)
        except OSError as exc:
            raise JournalError(f"cannot sync the journal {self.path(self.version)}: {exc}") from exc
        self._unsynced = False

    def closed_rounds(self) -> Iterator[tuple[int, list[tuple[str, bytes]]]]:
        """(version, records) of the kept journals of rounds before the open one."""
        for path in sorted(self.directory.glob("v*.log")):
            version = int(path.stem[1:])
            if version < self.version:
                yield version, self._scan(path)[0]

    def prune(self) -> None:
        """Delete journals of rounds older than ``keep_rounds`` before the open one."""
        for path in self.directory.glob("v*.log"):
            if int(path.stem[1:]) < self.version - self.keep_rounds:
                path.unlink(missing_ok=True)

    def close(self) -> None:
        if self._file is not None:
            if self._unsynced:
                self.sync()
            os.close(self._file)
            self._file = None

    def _sync_directory(self) -> None:
        fd = os.open(self.directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    @staticmethod
    def _scan(path: Path) -> tuple[list[tuple[str, bytes]], int]:
        """The whole records of ``path`` and the offset where they end."""
        data = path.read_bytes()
        records: list[tuple[str, bytes]] = []
        offset = 0
        while offset + _HEAD.size <= len(data):
            length, crc = _HEAD.unpack_from(data, offset)
            start = offset + _HEAD.size
            end = start + length
            if length > MAX_RECORD or end > len(data) or length < _DEVICE.size:
                break
            body = data[start:end]
            if crc32(body) != crc:
                break
            (name_len,) = _DEVICE.unpack_from(body)
            device = body[_DEVICE.size:_DEVICE.size + name_len].decode(errors="replace")
            records.append((device, bytes(body[_DEVICE.size + name_len:])))
            offset = end
        return records, offset
