"""Private key files: written without a window for other users, and refused when others can read them."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest

from fedmq.broker import files, pki
from fedmq.broker.errors import ConfigError
from fedmq.broker.files import check_private_key_file, write_atomic, write_private
from fedmq.broker.settings import BrokerSettings

SECRET = b"-----BEGIN PRIVATE KEY-----\nnot really\n-----END PRIVATE KEY-----\n"


def mode(path: Path) -> int:
    return path.stat().st_mode & 0o777




@pytest.fixture
def predictable_tmp(monkeypatch: pytest.MonkeyPatch) -> str:
    """Make the 'random' part of the temporary name known, as if an attacker had guessed it."""
    monkeypatch.setattr(files.secrets, "token_hex", lambda nbytes: "guessed")
    return "guessed"


def test_write_private_ignores_a_planted_world_readable_temp_file(tmp_path: Path, umask_0: None) -> None:
    # The old SigningKey.write reused ".NAME.tmp" with O_TRUNC: a 0644 file planted there kept its mode.
    planted = tmp_path / ".signing.key.tmp"
    planted.write_bytes(b"planted")
    planted.chmod(0o644)
    target = tmp_path / "signing.key"
    write_private(target, SECRET)
    assert target.read_bytes() == SECRET and mode(target) == 0o600
    assert planted.read_bytes() == b"planted", "the planted file was written through"
    assert sorted(p.name for p in tmp_path.iterdir()) == [".signing.key.tmp", "signing.key"]


def test_write_private_follows_no_planted_symlink(tmp_path: Path, predictable_tmp: str) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    victim = outside / "victim"
    victim.write_bytes(b"untouched")
    victim.chmod(0o644)
    keys = tmp_path / "keys"
    keys.mkdir()
    # at the old fixed name, at the target itself, and at the (guessed) temporary name
    (keys / ".a.key.tmp").symlink_to(victim)
    (keys / "b.key").symlink_to(victim)
    write_private(keys / "a.key", SECRET)
    write_private(keys / "b.key", SECRET)  # the symlink at the target is replaced, not followed
    (keys / f".c.key.{predictable_tmp}.tmp").symlink_to(victim)
    with pytest.raises(OSError):
        write_private(keys / "c.key", SECRET)
    assert victim.read_bytes() == b"untouched" and mode(victim) == 0o644
    for name in ("a.key", "b.key"):
        assert not (keys / name).is_symlink() and (keys / name).read_bytes() == SECRET and mode(keys / name) == 0o600
    assert not (keys / "c.key").exists()


def test_write_private_sets_the_exact_mode_and_group_whatever_the_umask(tmp_path: Path, umask_0: None) -> None:
    write_private(tmp_path / "k", SECRET)
    write_private(tmp_path / "g", SECRET, 0o640, os.getegid())
    write_private(tmp_path / "c", b"cert", 0o644)
    os.umask(0o077)
    write_private(tmp_path / "c2", b"cert", 0o644)
    assert [mode(tmp_path / n) for n in ("k", "g", "c", "c2")] == [0o600, 0o640, 0o644, 0o644]
    assert (tmp_path / "g").stat().st_gid == os.getegid()
    with pytest.raises(FileNotFoundError):
        write_private(tmp_path / "missing-dir" / "k", SECRET)
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_write_atomic_follows_no_planted_symlink(tmp_path: Path, predictable_tmp: str) -> None:
    victim = tmp_path / "victim"
    victim.write_bytes(b"untouched")
    state = tmp_path / "state"
    state.mkdir()
    (state / ".blob.tmp").symlink_to(victim)  # the name write_atomic used to write through
    write_atomic(state / "blob", b"new state")
    assert (state / "blob").read_bytes() == b"new state"
    write_atomic(state / "blob", memoryview(b"newer"))
    assert (state / "blob").read_bytes() == b"newer"
    (state / f".other.{predictable_tmp}.tmp").symlink_to(victim)
    with pytest.raises(FileExistsError):
        write_atomic(state / "other", b"x")
    assert victim.read_bytes() == b"untouched"
    assert sorted(p.name for p in state.iterdir()) == [".blob.tmp", f".other.{predictable_tmp}.tmp", "blob"]


def test_check_private_key_file_refuses_keys_others_can_read_or_write(tmp_path: Path) -> None:
    key = tmp_path / "device.key"
    key.write_bytes(SECRET)
    for bad in (0o644, 0o604, 0o602, 0o666):
        key.chmod(bad)
        with pytest.raises(ConfigError) as info:
            check_private_key_file(key, what="the TLS client key", key="broker.key_file")
        message = str(info.value)
        assert str(key) in message and f"{bad:04o}" in message and f"chmod 600 {key}" in message
        assert info.value.key == "broker.key_file"
    key.chmod(0o600)
    check_private_key_file(key, what="the TLS client key")
    with pytest.raises(ConfigError, match="does not exist") as missing:
        check_private_key_file(tmp_path / "nope.key", what="the TLS client key")
    assert str(tmp_path / "nope.key") in str(missing.value)
    with pytest.raises(ConfigError, match="not a regular file"):
        check_private_key_file(tmp_path, what="the TLS client key")


def test_check_private_key_file_warns_once_about_a_group_readable_key(tmp_path: Path,
                                                                     caplog: pytest.LogCaptureFixture) -> None:
    key = tmp_path / "group.key"
    key.write_bytes(SECRET)
    key.chmod(0o640)
    with caplog.at_level(logging.WARNING, logger="fedmq.broker.files"):
        check_private_key_file(key, what="the TLS client key")
        check_private_key_file(key, what="the TLS client key")
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING and str(key) in r.getMessage()]
    assert len(warnings) == 1 and "0640" in warnings[0].getMessage() and "chmod 600" in warnings[0].getMessage()


@pytest.fixture
def identity(tmp_path: Path) -> tuple[Path, Path, Path]:
    directory = tmp_path / "pki"
    pki.init_ca(directory, fleet="keyfleet")
    cert, key = pki.issue_device(directory, "dev-a")
    return directory / "ca.pem", cert, key


def tls_settings(ca: Path, cert: Path, key: Path | None) -> BrokerSettings:
    return BrokerSettings(host="127.0.0.1", port=8883, protocol="5", tls=True, ca_file=str(ca), cert_file=str(cert),
                          key_file=str(key) if key else None)


@pytest.mark.asyncio  # aiomqtt.Client wants a running loop
async def test_the_broker_client_refuses_a_world_readable_tls_key(identity: tuple[Path, Path, Path]) -> None:
    ca, cert, key = identity
    tls_settings(ca, cert, key).client(identifier="dev-a")  # 0600 from fedmq pki: fine
    key.chmod(0o644)
    with pytest.raises(ConfigError) as info:
        tls_settings(ca, cert, key).client(identifier="dev-a")
    assert str(key) in str(info.value) and f"chmod 600 {key}" in str(info.value)
    assert info.value.key == "broker.key_file"
    # the key inside cert_file (no key_file) is checked the same way
    combined = key.parent / "combined.pem"
    combined.write_bytes(cert.read_bytes() + key.read_bytes())
    combined.chmod(0o644)
    with pytest.raises(ConfigError, match="chmod 600") as info:
        tls_settings(ca, combined, None).ssl_context()
    assert info.value.key == "broker.cert_file"
    combined.chmod(0o600)
    tls_settings(ca, combined, None).ssl_context()


@pytest.mark.asyncio
async def test_the_broker_client_warns_about_a_group_readable_tls_key(identity: tuple[Path, Path, Path],
                                                                caplog: pytest.LogCaptureFixture) -> None:
    ca, cert, key = identity
    key.chmod(0o640)
    with caplog.at_level(logging.WARNING):
        tls_settings(ca, cert, key).client(identifier="dev-a")
    assert any(str(key) in r.getMessage() and r.levelno == logging.WARNING for r in caplog.records)


def test_unloadable_tls_files_are_a_config_error(identity: tuple[Path, Path, Path], tmp_path: Path) -> None:
    ca, cert, key = identity
    with pytest.raises(ConfigError, match="cannot load the TLS files"):
        tls_settings(tmp_path / "no-ca.pem", cert, key).ssl_context()
    other = tmp_path / "other.key"
    write_private(other, SECRET)
    with pytest.raises(ConfigError, match="cannot load the TLS files"):
        tls_settings(ca, cert, other).ssl_context()
