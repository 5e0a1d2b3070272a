"""The aggregator's write-ahead journal: every accepted update, on disk before its receipt.

One append-only file per round (``v00000007.log`` holds the updates accepted for version 7).
A record is ``<length u32><crc32 u32><device length u16><device><payload>``, little-endian; the
file is fsynced after each append, before the receipt goes out, or once for a whole batch of
appends inside :meth:`UpdateJournal.group_commit` (the caller then sends the batch's receipts after
the block). On restart the open round is
rebuilt by replaying its file, and the (device, update id) pairs of the last few rounds are read
back for de-duplication. A record cut short by a crash (never acknowledged) is truncated away.

Where the file system allows it, records are written with ``O_DIRECT`` (see :class:`_DirectAppender`):
the payloads go from one reused, page-aligned buffer straight to the disk instead of through
freshly allocated page-cache pages, which cost more CPU than the copy itself and would fill the
page cache with data that is read back only after a crash. Direct writes cover whole 4 KiB blocks,
so between appends the file ends in zero padding; :meth:`UpdateJournal.close` trims it, and a
restart after a crash trims it like a torn record. Inside a group commit, small records are
gathered and written together (each direct write is a disk write), large ones on their own in a
writer thread while the caller goes on; the group's fsync comes after all of them.
``FEDMQ_JOURNAL_DIRECT=0`` writes through the page cache instead (the format is the same either
way).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import mmap
import os
import struct
import threading
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import NoReturn

import numpy as np

from fedmq.broker.errors import FedmqError

log = logging.getLogger(__name__)

try:  # the same CRC-32, computed with carry-less multiplication: about 4x faster than zlib's
    from zlib_ng.zlib_ng import crc32
except ImportError:  # pip install 'fedmq[fast]'
    from zlib import crc32

_HEAD = struct.Struct("<II")
_DEVICE = struct.Struct("<H")
MAX_RECORD = 1 << 30
#: Parts of a record at least this large are copied into the O_DIRECT buffer by numpy, which
#: releases the GIL (measured: a 4 MB slice assignment to an mmap holds it for 0.5 ms).
_COPY_WITHOUT_GIL = 64 * 1024
#: O_DIRECT writes whole blocks from an aligned buffer at an aligned offset: 4 KiB covers every
#: logical block size Linux file systems use.
BLOCK = 4096
#: Inside a group commit, records are gathered in the O_DIRECT buffer and written once this many
#: bytes wait (or when the group ends): without a page cache, each write is a disk write, and a
#: group of small updates would otherwise cost one each.
COALESCE = 1 << 20


def _direct_wanted() -> bool:
    return hasattr(os, "O_DIRECT") and os.environ.get("FEDMQ_JOURNAL_DIRECT", "1") != "0"


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
        self._direct: _DirectAppender | None = None
        self._broken: str | None = None  # a deferred write failed: nothing more until reopened
        self.version = 0

    @property
    def direct(self) -> bool:
        """Whether the open round's appends go to the disk with O_DIRECT."""
        return self._direct is not None

    def path(self, version: int) -> Path:
        return self.directory / f"v{version:08d}.log"

    def open_round(self, version: int) -> list[tuple[str, bytes]]:
        """Start (or resume) the journal of ``version``'s round; return the records it already has."""
        self.close()
        self._broken = None
        path = self.path(version)
        records, valid_end, padding_only = self._scan(path) if path.exists() else ([], 0, True)
        self._file = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)  # read: the last partial block, for O_DIRECT
        size = os.fstat(self._file).st_size
        if size != valid_end:
            if padding_only:
                log.debug("journal %s: trimming %d bytes of block padding", path, size - valid_end)
            else:
                log.warning("journal %s: dropping %d bytes of a record cut short by a crash", path, size - valid_end)
            os.ftruncate(self._file, valid_end)
            os.fsync(self._file)
        os.lseek(self._file, valid_end, os.SEEK_SET)
        self.version = version
        self._sync_directory()
        if _direct_wanted():
            self._direct = _DirectAppender.open(path, self._file, valid_end)
        return records

    def append(self, device: str, payload: bytes) -> None:
        """Write one accepted update durably (fsync) before it is acknowledged.

        Inside :meth:`group_commit` the record is written now and fsynced when the block ends.
        """
        if self._file is None:
            raise JournalError("journal is not open")
        if self._broken is not None:
            raise JournalError(self._broken)
        name = device.encode()
        prefix = _DEVICE.pack(len(name)) + name
        # a chained crc32, and writev or one copy into the direct buffer: the payload (megabytes)
        # is never joined into a record first
        head = _HEAD.pack(len(prefix) + len(payload), crc32(payload, crc32(prefix)))
        size = len(head) + len(prefix) + len(payload)
        position = self._direct.end if self._direct is not None else os.lseek(self._file, 0, os.SEEK_CUR)
        try:
            if self._direct is not None:
                try:
                    # in a group, the disk write overlaps the caller's next update (the group's
                    # sync waits for it); the first write of a file is waited for: a file system
                    # that refuses O_DIRECT writes says so there, and falls back below
                    self._direct.append((head, prefix, payload), deferred=self._group and self._direct.writes > 0)
                except _DeferredWriteError:
                    raise
                except OSError as exc:
                    if exc.errno != errno.EINVAL:
                        raise
                    # the file system took the O_DIRECT open but refuses the writes: page cache from now on
                    log.info("journal %s: O_DIRECT writes refused (%s); writing through the page cache", self.path(self.version), exc)
                    self._leave_direct()
                    self._write_buffered(head, prefix, payload, size)
            else:
                self._write_buffered(head, prefix, payload, size)
            if self._group:
                self._unsynced = True
            elif self.fsync:
                os.fsync(self._file)
        except _DeferredWriteError as exc:
            self._fail_deferred(exc)
        except OSError as exc:
            # leave no partial record behind: the next append must start on a record boundary
            os.ftruncate(self._file, position)
            os.lseek(self._file, position, os.SEEK_SET)
            raise JournalError(f"cannot write the journal {self.path(self.version)}: {exc}") from exc

    def _fail_deferred(self, exc: _DeferredWriteError) -> NoReturn:
        """An earlier record of this group is not on disk although it was appended: refuse every
        later append and sync, so that none of the group is acknowledged (a restart replays what
        reached the disk)."""
        self._broken = (f"cannot write the journal {self.path(self.version)}: {exc.strerror or exc}; "
                        "it takes no more updates until the aggregator restarts")
        raise JournalError(self._broken) from exc

    def _write_buffered(self, head: bytes, prefix: bytes, payload: bytes, size: int) -> None:
        written = os.writev(self._file, [head, prefix, payload])  # type: ignore[arg-type]
        if written != size:
            raise OSError(f"short write ({written} of {size} bytes)")

    def _leave_direct(self) -> None:
        """Back to page-cache writes at the end of the records (the padding goes)."""
        if self._direct is None or self._file is None:
            return
        direct, self._direct = self._direct, None
        direct.close()  # raises if the write in flight failed: the file stays as it is, a restart trims it
        os.ftruncate(self._file, direct.end)
        os.lseek(self._file, direct.end, os.SEEK_SET)

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
        if self._broken is not None:
            raise JournalError(self._broken)
        if self._direct is not None:
            try:
                self._direct.flush()  # the records a group gathered, then every write done
            except _DeferredWriteError as exc:
                self._fail_deferred(exc)
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
        """Make the appends durable and close; raises :class:`JournalError` (after closing) if
        an fsync fails. A journal a failed write already broke (the caller was told) is closed as
        it is: a restart trims what did not reach the disk."""
        if self._file is None:
            return
        try:
            if self._direct is not None and self._broken is not None:
                direct, self._direct = self._direct, None
                with contextlib.suppress(OSError):  # the failure was reported already
                    direct.close(write_held=False)
            elif self._direct is not None:
                try:
                    self._leave_direct()  # a closed journal ends at its last record
                    self._unsynced = True
                except _DeferredWriteError as exc:  # (a group's sync has waited for it: not seen here)
                    self._broken = f"cannot write the journal {self.path(self.version)}: {exc}"
            if self._broken is not None:
                log.warning("closing the journal %s after a failed write: %s", self.path(self.version), self._broken)
            elif self._unsynced:
                self.sync()
        finally:
            os.close(self._file)
            self._file = None

    def _sync_directory(self) -> None:
        fd = os.open(self.directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    @staticmethod
    def _scan(path: Path) -> tuple[list[tuple[str, bytes]], int, bool]:
        """The whole records of ``path``, the offset where they end, and whether what follows is
        only zeros (O_DIRECT block padding, not a torn record)."""
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
        return records, offset, data.count(0, offset) == len(data) - offset


class _DeferredWriteError(OSError):
    """A write that :meth:`_DirectAppender.append` left running failed: its record was already
    counted as appended."""


class _DirectAppender:
    """Appends records to a journal file opened with ``O_DIRECT``.

    Every write covers whole blocks from a page-aligned buffer (two of them, reused and grown to
    the largest write): the partial block at the end of the records, then the new records, then
    zeros to the block boundary. ``end`` is where the written records end; the file may be longer
    by the padding. A failed write leaves ``end`` where it was, so the next write covers the same
    block again (the caller also truncates the file back to ``end``).

    ``append(..., deferred=True)`` (inside a group commit) may return before its record is on the
    disk: records are gathered in the buffer until :data:`COALESCE` bytes wait, and then written in
    a writer thread while the caller goes on (one write in flight at most). Small records thus
    cost one disk write per group instead of one each; a large one is written on its own,
    overlapping the caller's next update. :meth:`flush` writes what waits and waits for it; it, and
    the next write, raise :class:`_DeferredWriteError` if a deferred write failed.
    """

    def __init__(self, fd: int, end: int, tail: bytes) -> None:
        self.fd = fd
        self.end = end
        self.writes = 0
        self._tail = bytes(tail)  # the last, partial block of the written records
        self._held = 0  # bytes of records gathered after the tail in the current buffer, not written yet
        self._buffers = [mmap.mmap(-1, 1 << 20), mmap.mmap(-1, 1 << 20)]  # anonymous maps are page aligned
        self._next = 0  # the buffer records go into; the other may be in flight
        self._in_flight: Future[None] | None = None

    @classmethod
    def open(cls, path: Path, file: int, end: int) -> _DirectAppender | None:
        try:
            fd = os.open(path, os.O_WRONLY | os.O_DIRECT)  # type: ignore[attr-defined]
        except OSError as exc:  # tmpfs and some others: no O_DIRECT
            log.debug("journal %s: no O_DIRECT (%s); writing through the page cache", path, exc)
            return None
        base = end - end % BLOCK
        return cls(fd, end, os.pread(file, end - base, base))

    def append(self, parts: tuple[bytes, ...], *, deferred: bool = False) -> None:
        """Add a record; without ``deferred`` it is on the disk when this returns."""
        tail = self._tail
        held_before = self._held
        start = len(tail) + held_before
        size = start + sum(len(p) for p in parts)
        padded = -(-size // BLOCK) * BLOCK
        buffer = self._buffers[self._next]
        if padded > len(buffer):
            grown = mmap.mmap(-1, max(padded, 2 * len(buffer)))
            grown[:start] = buffer[:start]  # the tail and the records gathered so far
            buffer.close()
            buffer = self._buffers[self._next] = grown
        if held_before == 0:
            buffer[:len(tail)] = tail
        at = start
        for part in parts:
            if len(part) >= _COPY_WITHOUT_GIL:
                # numpy copies without the GIL (a slice assignment to the mmap holds it): the event
                # loop goes on reading while a 4 MB payload is copied
                target = np.frombuffer(buffer, np.uint8, len(part), at)
                np.copyto(target, np.frombuffer(part, np.uint8))
                del target  # the view pins the map: it must go before the map may be closed
            else:
                buffer[at:at + len(part)] = part
            at += len(part)
        self._held = size - len(tail)
        if deferred and self._held < COALESCE:
            return
        try:
            self._write_held(deferred=deferred)
        except _DeferredWriteError:
            raise
        except OSError as exc:  # only a write made here, not in the writer thread
            if held_before:
                raise _DeferredWriteError(exc.errno, f"gathered records could not be written: {exc}") from exc
            self._held = 0  # this record alone is refused; the caller truncates the file back to end
            raise

    def flush(self) -> None:
        """Write the gathered records and wait until every write is done.

        Raises :class:`_DeferredWriteError` if one fails: those records were counted as appended.
        """
        try:
            self._write_held(deferred=False)
        except _DeferredWriteError:
            raise
        except OSError as exc:
            raise _DeferredWriteError(exc.errno, f"gathered records could not be written: {exc}") from exc

    def _write_held(self, *, deferred: bool) -> None:
        self.wait()  # the write in flight (from the other buffer) must be on disk before this one
        if self._held == 0:
            return
        tail = self._tail
        size = len(tail) + self._held
        padded = -(-size // BLOCK) * BLOCK
        buffer = self._buffers[self._next]
        buffer[size:padded] = bytes(padded - size)
        base = self.end - len(tail)
        if deferred:
            self._in_flight = _writer().submit(self._write, buffer, padded, base)
        else:
            self._write(buffer, padded, base)
        self.end = base + size
        self._tail = bytes(buffer[size - size % BLOCK:size])
        self._held = 0
        self._next = 1 - self._next
        self.writes += 1

    def _write(self, buffer: mmap.mmap, padded: int, base: int) -> None:
        with memoryview(buffer) as view, view[:padded] as blocks:  # released even if the write raises
            written = os.pwrite(self.fd, blocks, base)
        if written != padded:
            raise OSError(f"short write ({written} of {padded} bytes)")

    def wait(self) -> None:
        """Wait for the write in flight; raise :class:`_DeferredWriteError` if it failed."""
        in_flight, self._in_flight = self._in_flight, None
        if in_flight is None:
            return
        try:
            in_flight.result()
        except OSError as exc:
            raise _DeferredWriteError(exc.errno, f"an earlier record's write failed: {exc}") from exc

    def close(self, *, write_held: bool = True) -> None:
        """Write what is gathered (unless ``write_held`` is false: a broken journal's records stay
        off the disk) and close."""
        try:
            if write_held:
                self.flush()
            else:
                self.wait()
        finally:
            for buffer in self._buffers:
                buffer.close()
            os.close(self.fd)


_writer_pool: ThreadPoolExecutor | None = None
_writer_lock = threading.Lock()


def _writer() -> ThreadPoolExecutor:
    """The one thread that runs deferred journal writes (created on first use)."""
    global _writer_pool
    with _writer_lock:
        if _writer_pool is None:
            _writer_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fedmq-journal")
        return _writer_pool
