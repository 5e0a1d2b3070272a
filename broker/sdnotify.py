"""The systemd notification protocol (``sd_notify``): readiness, watchdog pings and status lines.

A service with ``Type=notify`` tells systemd it is ready by sending ``READY=1`` to the datagram
socket named in ``NOTIFY_SOCKET``; with ``WatchdogSec=`` it must also send ``WATCHDOG=1`` more often
than ``WATCHDOG_USEC`` or systemd kills and restarts it. Pure stdlib, so the daemons need no
``systemd`` Python binding; without ``NOTIFY_SOCKET`` (not under systemd) every call does nothing.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections.abc import Mapping

log = logging.getLogger(__name__)


class Notifier:
    """Sends notifications to systemd's ``NOTIFY_SOCKET``; a no-op when there is none.

    Sending never raises: a failure is logged once (at warning) and later ones at debug, because a
    daemon must not stop over its supervisor's socket.
    """

    def __init__(self, socket_path: str | None = None, *, watchdog_usec: int | None = None) -> None:
        self._address = _socket_address(socket_path) if socket_path else None
        self._watchdog_usec = watchdog_usec if watchdog_usec and watchdog_usec > 0 else None
        self._warned = False

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Notifier:
        """A notifier for ``NOTIFY_SOCKET``, ``WATCHDOG_USEC`` and ``WATCHDOG_PID`` as systemd sets them.

        The watchdog is off when ``WATCHDOG_PID`` names another process (systemd's rule: the
        variables were meant for a parent or child, not for us).
        """
        env = os.environ if environ is None else environ
        watchdog_usec: int | None = None
        raw_usec = env.get("WATCHDOG_USEC", "").strip()
        if raw_usec:
            try:
                watchdog_usec = int(raw_usec)
            except ValueError:
                log.warning("ignoring WATCHDOG_USEC=%r: not an integer", raw_usec)
        raw_pid = env.get("WATCHDOG_PID", "").strip()
        if watchdog_usec and raw_pid:
            try:
                if int(raw_pid) != os.getpid():
                    watchdog_usec = None
            except ValueError:
                log.warning("ignoring WATCHDOG_PID=%r: not an integer", raw_pid)
                watchdog_usec = None
        return cls(env.get("NOTIFY_SOCKET") or None, watchdog_usec=watchdog_usec)

    @property
    def enabled(self) -> bool:
        """Whether there is a socket to notify (the process runs under systemd with ``Type=notify``)."""
        return self._address is not None

    def watchdog_interval(self) -> float | None:
        """Seconds between watchdog pings (half of ``WATCHDOG_USEC``), or None without a watchdog."""
        if self._address is None or self._watchdog_usec is None:
            return None
        return self._watchdog_usec / 2_000_000

    def ready(self, status: str = "") -> bool:
        """Tell systemd that start-up is complete (``READY=1``), with an optional status line."""
        return self.notify("READY=1", f"STATUS={status}" if status else "")

    def watchdog(self) -> bool:
        """Ping the watchdog (``WATCHDOG=1``)."""
        return self.notify("WATCHDOG=1")

    def stopping(self, status: str = "") -> bool:
        """Tell systemd that shutdown has begun (``STOPPING=1``)."""
        return self.notify("STOPPING=1", f"STATUS={status}" if status else "")

    def reloading(self) -> bool:
        """Tell systemd that the configuration is being reloaded (``RELOADING=1``); send ready() after."""
        return self.notify("RELOADING=1")

    def status(self, text: str) -> bool:
        """A one-line status shown by ``systemctl status`` (``STATUS=...``)."""
        return self.notify(f"STATUS={text}")

    def notify(self, *assignments: str) -> bool:
        """Send ``KEY=value`` assignments in one datagram; True if sent, False if off or failed."""
        if self._address is None:
            return False
        lines = [a.replace("\n", " ") for a in assignments if a]
        if not lines:
            return False
        try:
            # a socket per message, as libsystemd does: nothing to close, and it survives fork
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.sendto("\n".join(lines).encode(), self._address)
        except OSError as exc:
            if self._warned:
                log.debug("sd_notify to %r failed again: %s", self._address, exc)
            else:
                self._warned = True
                log.warning("sd_notify to %r failed: %s (systemd may consider the service dead)", self._address, exc)
            return False
        return True


def _socket_address(path: str) -> str | bytes:
    # '@name' is a Linux abstract socket: a leading NUL byte, no file system entry
    if path.startswith("@"):
        return b"\0" + path[1:].encode()
    return path


async def watchdog_loop(notifier: Notifier, stop: asyncio.Event) -> None:
    """Ping the watchdog every ``notifier.watchdog_interval()`` seconds until ``stop`` is set.

    The pings come from the event loop itself, so a blocked loop stops them and systemd restarts
    the daemon: that is the point. Returns at once when there is no watchdog.
    """
    interval = notifier.watchdog_interval()
    if interval is None:
        return
    while not stop.is_set():
        notifier.watchdog()
        try:
            await asyncio.wait_for(stop.wait(), timeout=interval)
        except TimeoutError:
            pass
