"""sd_notify against real AF_UNIX datagram sockets, as systemd's NOTIFY_SOCKET would be."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from fedmq.broker.sdnotify import Notifier, watchdog_loop


@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[tuple[str, socket.socket]]:
    """A bound datagram socket in tmp_path (AF_UNIX paths are limited to ~107 bytes)."""
    path = tmp_path / "notify.sock"
    if len(str(path)) > 100:
        pytest.skip(f"tmp_path too long for an AF_UNIX socket path: {path}")
    server = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    server.bind(str(path))
    server.settimeout(5)
    yield str(path), server
    server.close()


def received(server: socket.socket) -> str:
    return server.recv(4096).decode()


def nothing_pending(server: socket.socket) -> bool:
    server.setblocking(False)
    try:
        server.recv(4096)
    except BlockingIOError:
        return True
    finally:
        server.settimeout(5)
    return False


def test_messages_reach_the_socket(notify_socket: tuple[str, socket.socket]) -> None:
    path, server = notify_socket
    notifier = Notifier.from_env({"NOTIFY_SOCKET": path})
    assert notifier.enabled
    assert notifier.ready()
    assert received(server) == "READY=1"
    notifier.ready("v3, 2 devices online")
    assert received(server) == "READY=1\nSTATUS=v3, 2 devices online"
    notifier.watchdog()
    assert received(server) == "WATCHDOG=1"
    notifier.status("round 4: 1/2 updates\nsecond line")
    assert received(server) == "STATUS=round 4: 1/2 updates second line", "a newline would start a new assignment"
    notifier.reloading()
    assert received(server) == "RELOADING=1"
    notifier.stopping()
    assert received(server) == "STOPPING=1"


def test_abstract_socket() -> None:
    name = f"fedmq-test-{uuid.uuid4().hex}"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    server.bind(b"\0" + name.encode())
    server.settimeout(5)
    try:
        notifier = Notifier.from_env({"NOTIFY_SOCKET": f"@{name}"})
        assert notifier.ready("up")
        assert received(server) == "READY=1\nSTATUS=up"
        notifier.watchdog()
        assert received(server) == "WATCHDOG=1"
    finally:
        server.close()


def test_no_socket_means_no_op() -> None:
    notifier = Notifier.from_env({"WATCHDOG_USEC": "30000000"})
    assert not notifier.enabled
    assert notifier.ready() is False
    assert notifier.watchdog() is False
    assert notifier.watchdog_interval() is None, "no socket, no watchdog"


def test_from_env_reads_os_environ(monkeypatch: pytest.MonkeyPatch, notify_socket: tuple[str, socket.socket]) -> None:
    path, server = notify_socket
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    monkeypatch.setenv("WATCHDOG_USEC", "30000000")
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    notifier = Notifier.from_env()
    assert notifier.watchdog_interval() == 15.0
    notifier.stopping("bye")
    assert received(server) == "STOPPING=1\nSTATUS=bye"


def test_watchdog_interval_rules(notify_socket: tuple[str, socket.socket]) -> None:
    path, _ = notify_socket
    assert Notifier.from_env({"NOTIFY_SOCKET": path}).watchdog_interval() is None
    assert Notifier.from_env({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "5000000"}).watchdog_interval() == 2.5
    mine = {"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "5000000", "WATCHDOG_PID": str(os.getpid())}
    assert Notifier.from_env(mine).watchdog_interval() == 2.5
    other = {**mine, "WATCHDOG_PID": str(os.getpid() + 1)}
    assert Notifier.from_env(other).watchdog_interval() is None, "the watchdog was meant for another process"
    assert Notifier.from_env({**mine, "WATCHDOG_USEC": "soon"}).watchdog_interval() is None
    assert Notifier.from_env({**mine, "WATCHDOG_USEC": "0"}).watchdog_interval() is None


def test_send_failure_is_logged_once_and_never_raises(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    notifier = Notifier.from_env({"NOTIFY_SOCKET": str(tmp_path / "nobody-listens.sock")})
    with caplog.at_level(logging.DEBUG, logger="fedmq.broker.sdnotify"):
        assert notifier.ready() is False
        assert notifier.watchdog() is False
        assert notifier.watchdog() is False
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "sd_notify" in warnings[0].getMessage()


@pytest.mark.asyncio
async def test_watchdog_loop_pings_until_stopped(notify_socket: tuple[str, socket.socket]) -> None:
    path, server = notify_socket
    server.setblocking(False)
    notifier = Notifier.from_env({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "20000"})  # a ping every 10 ms
    stop = asyncio.Event()
    task = asyncio.create_task(watchdog_loop(notifier, stop))
    pings: list[str] = []
    loop = asyncio.get_running_loop()
    while len(pings) < 3:
        pings.append((await asyncio.wait_for(loop.sock_recv(server, 4096), timeout=5)).decode())
    stop.set()
    await asyncio.wait_for(task, timeout=5)
    assert pings == ["WATCHDOG=1"] * 3
    server.settimeout(5)
    while not nothing_pending(server):  # drain pings sent before stop
        pass
    await asyncio.sleep(0.05)
    assert nothing_pending(server), "no ping after the loop has returned"


@pytest.mark.asyncio
async def test_watchdog_loop_returns_at_once_without_watchdog(notify_socket: tuple[str, socket.socket]) -> None:
    path, server = notify_socket
    await asyncio.wait_for(watchdog_loop(Notifier.from_env({"NOTIFY_SOCKET": path}), asyncio.Event()), timeout=5)
    assert nothing_pending(server)
