"""Crash-safe file writes (the aggregator's registry, the agent's state, keys) and key-file checks.

Every write goes to a temporary file in the target's directory and is renamed over the target,
so a crash leaves the old file or the new one, never half of one. The temporary name is random
and opened with ``O_CREAT | O_EXCL | O_NOFOLLOW``: a file or symlink planted at a predictable
name (by another user of a shared directory) is never written through or followed, and a
temporary file is never one somebody else created with looser permissions. ``os.replace`` renames
onto the target, so a symlink *at the target* is replaced, not followed.

A crash between the creation of a temporary file and its rename leaves it behind
(``.NAME.<random>.tmp``); it is never reused, and removing it by hand is safe.
"""

from __future__ import annotations

import logging
import os
import secrets
import stat
from pathlib import Path

from .errors import ConfigError

logger = logging.getLogger(__name__)

_TMP_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


def _temporary_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")


def _fsync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_replace(path: Path, data: bytes | memoryview, *, mode: int | None, gid: int) -> None:
    tmp = _temporary_name(path)
    # Created 0600 at most: nobody else can open the temporary file before its mode is final.
    fd = os.open(tmp, _TMP_FLAGS, 0o600 if mode is not None else 0o666)
    try:
        try:
            if gid != -1:
                os.fchown(fd, -1, gid)
            if mode is not None:
                # fchmod, not the open mode: the umask may only remove bits, and the mode must be
                # exactly ``mode`` before the first byte is written.
                os.fchmod(fd, mode)
            with os.fdopen(fd, "wb") as handle:
                fd = -1  # the file object owns it now
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
        finally:
            if fd != -1:
                os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_directory(path.parent)


def write_atomic(path: Path, data: bytes | memoryview) -> None:
    """Write ``data`` to ``path`` so that a crash leaves the old file or the new one, never half.

    Random temporary file in the same directory (``O_EXCL | O_NOFOLLOW``), fsync, rename over the
    target, fsync of the directory. The new file's mode is 0666 minus the umask (0644 under the
    usual 022), like ``open(path, "wb")``; use :func:`write_private` for secrets. Raises
    ``OSError``.
    """
    _write_replace(Path(path), data, mode=None, gid=-1)


def write_private(path: str | os.PathLike[str], data: bytes, mode: int = 0o600, gid: int = -1) -> None:
    """Write a secret (a private key, a password file) to ``path`` atomically with exactly ``mode``.

    The temporary file is created with a random name (``O_CREAT | O_EXCL | O_NOFOLLOW``), given
    group ``gid`` (``-1``: unchanged) and ``mode`` with ``fchmod`` before any byte is written, so
    the secret is never readable by anyone ``mode`` does not allow, whatever the umask and
    whatever was planted in the directory; then fsync, ``os.replace`` onto ``path`` (a symlink
    at ``path`` is replaced, not followed) and fsync of the directory. The directory must exist.
    Raises ``OSError``; nothing is left behind on failure.
    """
    _write_replace(Path(path), data, mode=mode, gid=gid)


_warned: set[tuple[str, int]] = set()


def _read_through_own_group(info: os.stat_result) -> bool:
    return info.st_uid != os.geteuid() and (info.st_gid == os.getegid() or info.st_gid in os.getgroups())


def check_private_key_file(path: str | os.PathLike[str], *, what: str, key: str | None = None) -> None:
    """Refuse a private key file that other users may read or write; warn when its group may.

    ``what`` names the key in the messages ("the TLS client key", "the model signing key") and
    ``key`` is the configuration key it came from (carried by the :class:`ConfigError`). The mode
    checked is the one of the file a symlink points to. Raises :class:`ConfigError` when the file
    is missing or not a regular file, or when ``mode & 0o007`` (the fix, ``chmod 600 PATH``, is
    in the message). Logs a warning, once per file and mode in a process, when the group has
    access (``mode & 0o070``), except when that group is how this process reads a file it does not
    own (``chgrp fedmq KEY; chmod 0640 KEY`` for the service user, as deploy/README.md says).
    """
    try:
        info = os.stat(path)
    except FileNotFoundError:
        raise ConfigError(f"{what} {os.fspath(path)} does not exist", key=key) from None
    except OSError as exc:
        raise ConfigError(f"cannot read {what} {os.fspath(path)}: {exc.strerror}", key=key) from None
    if not stat.S_ISREG(info.st_mode):
        raise ConfigError(f"{what} {os.fspath(path)} is not a regular file", key=key)
    mode = stat.S_IMODE(info.st_mode)
    if mode & 0o007:
        raise ConfigError(f"{what} {os.fspath(path)} can be read or written by other users (mode {mode:04o}); "
                          f"run `chmod 600 {os.fspath(path)}` (and replace the key if others may have copied it)",
                          key=key)
    if mode & 0o070 and not _read_through_own_group(info) and (os.fspath(path), mode) not in _warned:
        _warned.add((os.fspath(path), mode))
        logger.warning("%s %s can be read or written by its group (mode %04o, gid %d); run `chmod 600 %s` unless that "
                       "group must read it", what, os.fspath(path), mode, info.st_gid, os.fspath(path))
