"""Run a real MQTT broker on a loopback port: Mosquitto when installed, else embedded amqtt.

Used by tests, examples and ``fedmq`` demos on machines without a system broker.
:class:`MosquittoProcess` is a synchronous subprocess wrapper (fault tests can
:meth:`~MosquittoProcess.kill` and :meth:`~MosquittoProcess.restart` it on the same port);
:class:`EmbeddedBroker` runs amqtt inside the current event loop (MQTT 3.1.1 only);
:class:`LocalBroker` picks one of the two.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import weakref
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Literal, Self

if TYPE_CHECKING:
    from amqtt.broker import Broker

logger = logging.getLogger(__name__)

_INSTALL_HINT = (
    "install it with `apt-get install mosquitto` (Debian/Ubuntu/Raspberry Pi OS), "
    'or use LocalBroker(prefer="amqtt") for the embedded MQTT 3.1.1 broker'
)
_SEARCH_DIRS = ("/usr/sbin", "/usr/local/sbin")
_LOG_TAIL_LINES = 20
_AUTO_PORT_ATTEMPTS = 3


class BrokerStartError(Exception):
    """A local broker could not be started (binary missing, bad config, port taken, ...)."""


def find_free_port(host: str = "127.0.0.1") -> int:
    """Return a TCP port on ``host`` that was free a moment ago.

    Another process may take it before the caller binds it; the brokers below retry with a new
    port when they chose it themselves.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def mosquitto_binary() -> str | None:
    """Return the path of the ``mosquitto`` executable, or ``None`` when it is not installed.

    Looks in ``PATH`` first, then in ``/usr/sbin`` and ``/usr/local/sbin``, which are often
    missing from a non-root user's ``PATH`` although Debian installs the broker there.
    """
    found = shutil.which("mosquitto")
    if found:
        return found
    for directory in _SEARCH_DIRS:
        candidate = Path(directory, "mosquitto")
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    return None


def _url(host: str, port: int) -> str:
    return f"mqtt://[{host}]:{port}" if ":" in host else f"mqtt://{host}:{port}"


def _port_accepts(host: str, port: int, timeout: float) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def _tail(text: str, lines: int = _LOG_TAIL_LINES) -> str:
    return "\n".join(text.splitlines()[-lines:])


def _kill_quietly(proc: subprocess.Popen[bytes]) -> None:
    # Finalizer of last resort: a broker must never outlive the interpreter that started it.
    if proc.poll() is None:
        proc.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=5.0)


class MosquittoProcess:
    """A real Mosquitto subprocess on a loopback port.

    Synchronous, so it is usable from pytest fixtures and async code alike (wrap the calls in
    :func:`asyncio.to_thread` from a running loop). The configuration, the log and the
    persistence database live in ``workdir`` (a temporary directory removed on ``__exit__`` or
    garbage collection when not given); they survive :meth:`stop` and :meth:`kill`, so
    :meth:`restart` brings the broker back on the same port with the same state.

    When run as root, the generated configuration says ``user root``: otherwise Mosquitto drops
    to the ``mosquitto`` user and can no longer open files in root-only directories (pytest's
    ``tmp_path`` is ``0700``), and exits at once on an unreadable ``acl_file``/``password_file``.
    An ``extra_conf`` with its own ``user`` line replaces that default; its files must then be
    readable (and the workdir writable) by that user.
    """

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int | None = None,
        workdir: Path | None = None,
        persistence: bool = False,
        extra_conf: str = "",
        binary: str | None = None,
    ) -> None:
        """Prepare (but do not start) a broker; ``port=None`` picks a free port now."""
        self.host = host
        self._auto_port = port is None
        self.port = find_free_port(host) if port is None else port
        self.persistence = persistence
        self.extra_conf = extra_conf
        self._binary = binary
        self._workdir: Path | None = Path(workdir) if workdir is not None else None
        self._workdir_cleanup: weakref.finalize[Any, Any] | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._proc_finalizer: weakref.finalize[Any, Any] | None = None

    @property
    def url(self) -> str:
        """``mqtt://HOST:PORT`` of the listener."""
        return _url(self.host, self.port)

    @property
    def workdir(self) -> Path:
        """Directory holding ``mosquitto.conf``, ``mosquitto.log`` and ``data/`` (created on first use)."""
        if self._workdir is None:
            path = Path(tempfile.mkdtemp(prefix="fedmq-mosquitto-"))
            self._workdir = path
            self._workdir_cleanup = weakref.finalize(self, shutil.rmtree, path, ignore_errors=True)
        else:
            self._workdir.mkdir(parents=True, exist_ok=True)
        return self._workdir

    @property
    def conf_path(self) -> Path:
        """Path of the generated configuration file."""
        return self.workdir / "mosquitto.conf"

    @property
    def log_path(self) -> Path:
        """Path of the file receiving Mosquitto's log (its stdout and stderr)."""
        return self.workdir / "mosquitto.log"

    @property
    def persistence_dir(self) -> Path:
        """Directory of ``mosquitto.db`` when ``persistence`` is on."""
        return self.workdir / "data"

    @property
    def pid(self) -> int | None:
        """Process id while running, else ``None``."""
        return self._proc.pid if self.is_running() and self._proc is not None else None

    def config_text(self) -> str:
        """Return the configuration file content for the current settings."""
        lines = [
            f"listener {self.port} {self.host}",
            "allow_anonymous true",
            # The log goes to stderr, which start() redirects to a file opened by this process:
            # that works before and after Mosquitto drops privileges, and also catches the
            # errors Mosquitto prints before it has read its log settings.
            "log_dest stderr",
            "log_timestamp_format %Y-%m-%dT%H:%M:%S",
        ]
        if os.geteuid() == 0 and not re.search(r"(?m)^\s*user\s", self.extra_conf):
            lines.append("user root")
        if self.persistence:
            lines += [
                "persistence true",
                # Mosquitto concatenates location and file name: the trailing slash is needed.
                f"persistence_location {self.persistence_dir}/",
                # Short autosave so a kill -9 loses at most a second or two; save_database()
                # forces a save when a test needs certainty.
                "autosave_interval 1",
            ]
        else:
            lines.append("persistence false")
        text = "\n".join(lines) + "\n"
        if self.extra_conf:
            text += self.extra_conf.rstrip("\n") + "\n"
        return text

    def start(self, timeout: float = 10.0) -> None:
        """Write the configuration, start Mosquitto and wait until its port accepts TCP.

        Raises :class:`BrokerStartError`, with the tail of Mosquitto's log, when the binary is
        missing, the process exits or the port does not open within ``timeout`` seconds. When
        the port was chosen automatically and turned out to be taken, a new one is tried.
        """
        if self.is_running():
            return
        attempts = _AUTO_PORT_ATTEMPTS if self._auto_port and self._proc is None else 1
        for attempt in range(1, attempts + 1):
            try:
                self._start_once(timeout)
            except BrokerStartError as exc:
                if attempt == attempts or "Address already in use" not in str(exc):
                    raise
                old_port, self.port = self.port, find_free_port(self.host)
                logger.info("Port %d was taken, retrying Mosquitto on port %d", old_port, self.port)
            else:
                return

    def _start_once(self, timeout: float) -> None:
        binary = self._binary or mosquitto_binary()
        if binary is None:
            raise BrokerStartError(f"Mosquitto is not installed: {_INSTALL_HINT}")
        if self.persistence:
            self.persistence_dir.mkdir(parents=True, exist_ok=True)
        self._prepare_for_dropped_privileges()
        self.conf_path.write_text(self.config_text(), encoding="utf-8")
        self.conf_path.chmod(0o644)
        # Mosquitto may need a moment to fail on a taken port while the other listener already
        # answers the TCP probe below, so a taken port is detected before starting.
        if _port_accepts(self.host, self.port, timeout=0.2):
            raise BrokerStartError(f"Cannot start Mosquitto on {self.url}: Address already in use")
        log_start = self.log_path.stat().st_size if self.log_path.exists() else 0
        # Append: after restart() the log keeps the history of every run. The child keeps its
        # own copy of the descriptor, so ours is closed right away.
        with self.log_path.open("ab") as log_handle:
            try:
                proc = subprocess.Popen(  # noqa: S603 - the binary and arguments are ours
                    [binary, "-c", str(self.conf_path)],
                    stdin=subprocess.DEVNULL,
                    stdout=log_handle,
                    stderr=subprocess.STDOUT,
                    # Own session: a Ctrl-C in the terminal must not kill the broker before the
                    # test fixture gets to stop it.
                    start_new_session=True,
                )
            except OSError as exc:
                raise BrokerStartError(f"Cannot run Mosquitto binary {binary!r} ({exc}): {_INSTALL_HINT}") from exc
        self._proc = proc
        self._proc_finalizer = weakref.finalize(self, _kill_quietly, proc)

        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                self._release_process()
                raise BrokerStartError(
                    f"Mosquitto exited with code {proc.returncode} on {self.url}; log:\n"
                    f"{_tail(self._log_since(log_start))}"
                )
            if _port_accepts(self.host, self.port, timeout=0.2):
                logger.debug("Mosquitto %s (pid %d) listening on %s", binary, proc.pid, self.url)
                return
            if time.monotonic() >= deadline:
                self.stop()
                raise BrokerStartError(
                    f"Mosquitto did not open {self.url} within {timeout:.1f} s; log:\n"
                    f"{_tail(self._log_since(log_start))}"
                )
            time.sleep(0.02)

    def _prepare_for_dropped_privileges(self) -> None:
        # Only when extra_conf names a user: as root Mosquitto then switches to it and needs to
        # traverse the workdir and write the persistence database.
        match = re.search(r"(?m)^\s*user\s+(\S+)", self.extra_conf)
        if os.geteuid() != 0 or match is None or match.group(1) == "root":
            return
        try:
            account = pwd.getpwnam(match.group(1))
        except KeyError:
            return  # Mosquitto itself reports the unknown user in its log.
        self.workdir.chmod(0o755)
        if self.persistence:
            os.chown(self.persistence_dir, account.pw_uid, account.pw_gid)

    def _log_since(self, offset: int) -> str:
        try:
            with self.log_path.open("rb") as handle:
                handle.seek(offset)
                return handle.read().decode("utf-8", errors="replace")
        except OSError:
            return ""

    def _release_process(self) -> None:
        if self._proc_finalizer is not None:
            self._proc_finalizer.detach()
            self._proc_finalizer = None

    def stop(self, timeout: float = 5.0) -> None:
        """Stop with SIGTERM (Mosquitto then saves its database), SIGKILL after ``timeout``. Idempotent."""
        proc = self._proc
        if proc is None:
            return
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                logger.warning("Mosquitto (pid %d) ignored SIGTERM for %.1f s, killing it", proc.pid, timeout)
                proc.kill()
                proc.wait(timeout=timeout)
        self._release_process()

    def kill(self) -> None:
        """Kill with SIGKILL, as in a crash or power loss (no final save), and wait for the exit."""
        proc = self._proc
        if proc is None:
            return
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=5.0)
        self._release_process()

    def restart(self, timeout: float = 10.0) -> None:
        """Start again on the same port with the same configuration and persistence directory.

        Stops the broker first if it is still running.
        """
        self.stop()
        self._start_once(timeout)

    def save_database(self, timeout: float = 5.0) -> None:
        """Make Mosquitto write its persistence database now and wait until it is on disk.

        Everything the broker acknowledged before this call is then kept across :meth:`kill`.
        Uses SIGUSR1; Mosquitto writes ``mosquitto.db.new`` and renames it, so a changed inode
        or mtime of ``mosquitto.db`` means a complete save that started after this call.
        """
        if not self.persistence:
            raise RuntimeError("save_database() needs MosquittoProcess(persistence=True)")
        proc = self._proc
        if proc is None or proc.poll() is not None:
            raise RuntimeError("Mosquitto is not running")
        db_file = self.persistence_dir / "mosquitto.db"

        def identity() -> tuple[int, int] | None:
            try:
                st = db_file.stat()
            except FileNotFoundError:
                return None
            return (st.st_ino, st.st_mtime_ns)

        before = identity()
        proc.send_signal(signal.SIGUSR1)
        deadline = time.monotonic() + timeout
        while identity() == before:
            if time.monotonic() >= deadline:
                raise TimeoutError(
                    f"Mosquitto did not save {db_file} within {timeout:.1f} s "
                    "(can its user write the persistence directory?)"
                )
            time.sleep(0.01)

    def is_running(self) -> bool:
        """Whether the Mosquitto process is alive."""
        return self._proc is not None and self._proc.poll() is None

    def log_text(self) -> str:
        """Mosquitto's log output so far, all runs (empty once :meth:`cleanup` removed a temporary workdir)."""
        if self._workdir is None:
            return ""
        return self._log_since(0)

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.cleanup()

    def cleanup(self) -> None:
        """Stop the broker and delete the workdir if this object created it (a given one is kept)."""
        self.stop()
        if self._workdir_cleanup is not None:
            self._workdir_cleanup()
            self._workdir_cleanup = None
            self._workdir = None


class PacketTooLargeError(Exception):
    """A client sent a packet larger than the embedded broker's ``max_message_bytes``."""


def _new_embedded_broker(config: dict[str, Any], max_message_bytes: int) -> Broker:
    broker: Broker = _embedded_broker_class()(config, max_message_bytes)
    return broker


@functools.cache
def _embedded_broker_class() -> type[Any]:
    # Imported lazily: amqtt is only needed on machines without Mosquitto.
    from amqtt.adapters import ReaderAdapter, StreamReaderAdapter, StreamWriterAdapter
    from amqtt.broker import Broker

    class LimitedReader(ReaderAdapter):
        # amqtt reads a PUBLISH payload with one read(n) of the announced size, so checking n
        # refuses an oversized message before its bytes are buffered.
        def __init__(self, reader: ReaderAdapter, max_bytes: int) -> None:
            self._reader = reader
            self._max_bytes = max_bytes

        async def read(self, n: int = -1) -> bytes:
            if n > self._max_bytes:
                raise PacketTooLargeError(f"packet field of {n} bytes exceeds the limit of {self._max_bytes}")
            data: bytes = await self._reader.read(n)
            return data

        def feed_eof(self) -> None:
            self._reader.feed_eof()

    class SizeLimitedBroker(Broker):
        """amqtt has no packet size limit: each TCP connection's reader is wrapped to add one."""

        def __init__(self, config: dict[str, Any], max_message_bytes: int) -> None:
            super().__init__(config)
            self.max_message_bytes = max_message_bytes
            self.open_streams: set[asyncio.StreamWriter] = set()

        async def stream_connected(
            self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, listener_name: str
        ) -> None:
            self.open_streams.add(writer)
            try:
                await self.external_connected(
                    LimitedReader(StreamReaderAdapter(reader), self.max_message_bytes),
                    StreamWriterAdapter(writer),
                    listener_name,
                )
            finally:
                # amqtt 0.12 returns without closing the connection of a client that went away
                # while the broker waited on it (e.g. for the acknowledgement of a message in
                # flight); its socket would outlive the broker
                self.open_streams.discard(writer)
                if not writer.is_closing():
                    writer.close()

        async def close_open_streams(self) -> int:
            """Close the client connections amqtt's shutdown left open; return how many there were."""
            streams = [w for w in self.open_streams if not w.is_closing()]
            for writer in streams:
                writer.close()
            for writer in streams:
                with contextlib.suppress(OSError, ConnectionError):
                    await writer.wait_closed()
            self.open_streams.clear()
            return len(streams)

    return SizeLimitedBroker


class EmbeddedBroker:
    """In-process amqtt broker (MQTT 3.1.1 only) for machines without Mosquitto.

    Anonymous clients are allowed; retained messages and Last Will work; sessions are kept in
    memory only. A client that publishes more than ``max_message_bytes`` of payload is
    disconnected (its Will is sent), as Mosquitto does beyond ``max_packet_size``.
    """

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int | None = None,
        max_message_bytes: int = 8 * 1024 * 1024,
    ) -> None:
        """Prepare (but do not start) a broker; ``port=None`` picks a free port now."""
        if max_message_bytes <= 0:
            raise ValueError(f"max_message_bytes must be positive, got {max_message_bytes}")
        self.host = host
        self._auto_port = port is None
        self.port = find_free_port(host) if port is None else port
        self.max_message_bytes = max_message_bytes
        self._broker: Broker | None = None

    @property
    def url(self) -> str:
        """``mqtt://HOST:PORT`` of the listener."""
        return _url(self.host, self.port)

    def config(self) -> dict[str, Any]:
        """Return the amqtt 0.12 configuration dictionary used by :meth:`start`."""
        bind = f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"
        return {
            "listeners": {"default": {"type": "tcp", "bind": bind}},
            # An explicit plugin list replaces amqtt's defaults, which add a packet logger, an
            # event logger and $SYS publishing: none is useful here and the loggers cost time
            # on multi-megabyte messages. Without an auth plugin every client is refused.
            "plugins": {"amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}},
        }

    async def start(self) -> None:
        """Start listening; raises :class:`BrokerStartError` if the port cannot be bound."""
        if self._broker is not None:
            return
        # amqtt logs every connection and state change at INFO; keep it to warnings unless the
        # application configured these loggers itself.
        for name in ("amqtt", "transitions"):
            amqtt_logger = logging.getLogger(name)
            if amqtt_logger.level == logging.NOTSET:
                amqtt_logger.setLevel(logging.WARNING)
        from amqtt.errors import BrokerError

        attempts = _AUTO_PORT_ATTEMPTS if self._auto_port else 1
        for attempt in range(1, attempts + 1):
            broker = _new_embedded_broker(self.config(), self.max_message_bytes)
            try:
                await broker.start()
            except BrokerError as exc:
                if attempt == attempts or not isinstance(exc.__cause__, OSError):
                    raise BrokerStartError(f"Embedded amqtt broker failed to start on {self.url}: {exc}") from exc
                old_port, self.port = self.port, find_free_port(self.host)
                logger.info("Port %d was taken, retrying amqtt on port %d", old_port, self.port)
                continue
            self._broker = broker
            logger.debug("Embedded amqtt broker listening on %s", self.url)
            return

    async def stop(self) -> None:
        """Disconnect every client and close the listener. Idempotent."""
        broker, self._broker = self._broker, None
        if broker is not None:
            await broker.shutdown()
            left = await broker.close_open_streams()
            if left:
                logger.debug("closed %d client connection(s) the embedded broker's shutdown left open", left)

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()


class LocalBroker:
    """Start Mosquitto when installed, else the embedded amqtt broker (async context manager).

    Once started, ``kind`` says which one runs (``""`` before) and ``protocols`` which MQTT
    versions clients may use: ``("5", "3.1.1")`` for Mosquitto, ``("3.1.1",)`` for amqtt.
    """

    def __init__(
        self,
        *,
        prefer: Literal["auto", "mosquitto", "amqtt"] = "auto",
        host: str = "127.0.0.1",
        port: int | None = None,
        workdir: Path | None = None,
    ) -> None:
        """Choose nothing yet: the choice is made by :meth:`start`."""
        if prefer not in ("auto", "mosquitto", "amqtt"):
            raise ValueError(f"prefer must be 'auto', 'mosquitto' or 'amqtt', got {prefer!r}")
        self.prefer = prefer
        self.host = host
        self._port = port
        self._workdir = workdir
        self.kind = ""
        self.protocols: tuple[str, ...] = ()
        self._backend: MosquittoProcess | EmbeddedBroker | None = None

    @property
    def backend(self) -> MosquittoProcess | EmbeddedBroker:
        """The running broker object (e.g. a :class:`MosquittoProcess` to kill in fault tests)."""
        if self._backend is None:
            raise RuntimeError("LocalBroker is not started")
        return self._backend

    @property
    def url(self) -> str:
        """``mqtt://HOST:PORT`` of the running broker."""
        return self.backend.url

    @property
    def port(self) -> int:
        """Port of the running broker."""
        return self.backend.port

    async def start(self) -> None:
        """Start the preferred broker; raises :class:`BrokerStartError` when it cannot run."""
        if self._backend is not None:
            return
        binary = mosquitto_binary() if self.prefer != "amqtt" else None
        if self.prefer == "mosquitto" and binary is None:
            raise BrokerStartError(f"LocalBroker(prefer='mosquitto') but Mosquitto is not installed: {_INSTALL_HINT}")
        if binary is not None:
            process = MosquittoProcess(host=self.host, port=self._port, workdir=self._workdir, binary=binary)
            # Blocking waits (subprocess start, TCP polling) stay off the event loop.
            try:
                await asyncio.to_thread(process.start)
            except BaseException:
                await asyncio.to_thread(process.cleanup)
                raise
            self._backend, self.kind, self.protocols = process, "mosquitto", ("5", "3.1.1")
        else:
            embedded = EmbeddedBroker(host=self.host, port=self._port)
            await embedded.start()
            self._backend, self.kind, self.protocols = embedded, "amqtt", ("3.1.1",)
        logger.info("Local %s broker on %s", self.kind, self.url)

    async def stop(self) -> None:
        """Stop the broker (and delete Mosquitto's temporary workdir, if one was made). Idempotent."""
        backend, self._backend = self._backend, None
        if isinstance(backend, MosquittoProcess):
            await asyncio.to_thread(backend.cleanup)
        elif backend is not None:
            await backend.stop()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()
