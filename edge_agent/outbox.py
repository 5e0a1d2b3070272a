"""The agent's outbox: finished updates on disk until the aggregator's receipt arrives.

Each entry is one file ``<update_id>.fmq`` holding the exact payload, written atomically, so an
update survives agent restarts and broker outages and is re-sent byte for byte.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

from fedmq.broker.errors import RejectedMessage
from fedmq.broker.files import write_atomic
from fedmq.broker.messages import UpdateMessage, decode_message

log = logging.getLogger(__name__)


@dataclass(slots=True)
class OutboxEntry:
    update_id: str
    base_version: int
    payload: bytes
    attempts: int = 0
    next_attempt: float = 0.0      # monotonic time of the next (re-)send; 0 = now


class Outbox:
    """Pending updates under ``directory``, oldest first."""

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self._entries: dict[str, OutboxEntry] = {}
        for path in sorted(self.directory.glob("*.fmq"), key=lambda p: p.stat().st_mtime):
            try:
                payload = path.read_bytes()
                update = decode_message(payload, max_bytes=len(payload) + 1, expect=UpdateMessage)
            except (OSError, RejectedMessage) as exc:
                log.warning("discarding unreadable outbox file %s: %s", path, exc)
                path.unlink(missing_ok=True)
                continue
            self._entries[update.update_id] = OutboxEntry(update.update_id, update.base_version, payload)
        if self._entries:
            log.info("outbox holds %d update(s) from before the restart", len(self._entries))

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, update_id: str) -> bool:
        return update_id in self._entries

    def put(self, update: UpdateMessage, payload: bytes) -> OutboxEntry:
        self.store(update, payload)
        return self.register(update, payload)

    def store(self, update: UpdateMessage, payload: bytes) -> None:
        """The disk half of :meth:`put` (fsync included): safe to run in a worker thread."""
        write_atomic(self.directory / f"{update.update_id}.fmq", payload)

    def register(self, update: UpdateMessage, payload: bytes) -> OutboxEntry:
        """The memory half of :meth:`put`, after :meth:`store`: on the event loop."""
        entry = OutboxEntry(update.update_id, update.base_version, payload)
        self._entries[update.update_id] = entry
        return entry

    def remove(self, update_id: str) -> bool:
        known = self.forget(update_id)
        self.delete_file(update_id)
        return known

    def forget(self, update_id: str) -> bool:
        """The memory half of :meth:`remove`: on the event loop."""
        return self._entries.pop(update_id, None) is not None

    def delete_file(self, update_id: str) -> None:
        """The disk half of :meth:`remove` (an unlink can wait on a busy disk): safe in a worker thread.
        A file left by a crash in between is re-sent after a restart and answered ``duplicate``."""
        (self.directory / f"{update_id}.fmq").unlink(missing_ok=True)

    def due(self, now: float | None = None) -> list[OutboxEntry]:
        """Entries whose next send time has come."""
        now = time.monotonic() if now is None else now
        return [e for e in self._entries.values() if e.next_attempt <= now]

    def entries(self) -> list[OutboxEntry]:
        return list(self._entries.values())

    #: The longest wait between two re-sends of one update, in units of ``resend_after_s``.
    MAX_BACKOFF = 32

    def sent(self, entry: OutboxEntry, resend_after_s: float, now: float | None = None) -> None:
        """``entry`` was just published: re-send it after ``resend_after_s``, doubling with each
        re-send (the receipt may only be late), up to :attr:`MAX_BACKOFF` times that."""
        now = time.monotonic() if now is None else now
        entry.attempts += 1
        entry.next_attempt = now + resend_after_s * min(2 ** (entry.attempts - 1), self.MAX_BACKOFF)

    def retry_after(self, update_id: str, seconds: float, now: float | None = None) -> bool:
        """The aggregator asked for ``update_id`` again in ``seconds`` (a transient refusal such as
        ``rate_limited``): keep it and make it due then. Returns whether it is in the outbox."""
        entry = self._entries.get(update_id)
        if entry is None:
            return False
        entry.next_attempt = (time.monotonic() if now is None else now) + seconds
        return True

    def reset_schedule(self) -> None:
        """Make every entry due now, its back-off started afresh (after a reconnect: the broker may
        have lost in-flight messages, or restarted before the aggregator subscribed again; the
        sends of a reconnect storm must not push the next re-send half a minute away)."""
        for entry in self._entries.values():
            entry.next_attempt = 0.0
            entry.attempts = 0
