"""The ``fedmq`` command: help, clear configuration errors, the development broker."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from fedmq.broker.settings import BrokerSettings
from fedmq.cli import main


def fedmq(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "fedmq.cli", *args], capture_output=True, text=True, timeout=timeout)


def test_help_lists_the_commands(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for command in ("demo", "aggregator", "agent", "broker"):
        assert command in out


def test_config_typo_names_key_file_and_suggestion(tmp_path: Path) -> None:
    config = tmp_path / "aggregator.toml"
    config.write_text(f'state_dir = "{tmp_path}/state"\n[rounds]\nmin_update = 2\n')
    done = fedmq("aggregator", "--config", str(config))
    assert done.returncode == 2
    assert str(config) in done.stderr and "rounds.min_update" in done.stderr and "min_updates" in done.stderr
    assert not (tmp_path / "state").exists(), "nothing is created from a bad config"


def test_config_bad_value_and_missing_file(tmp_path: Path) -> None:
    config = tmp_path / "agent.toml"
    config.write_text(f'state_dir = "{tmp_path}/s"\nbackend = "cuda"\n')
    done = fedmq("agent", "--config", str(config))
    assert done.returncode == 2 and "unknown backend 'cuda'" in done.stderr
    done = fedmq("agent", "--config", str(tmp_path / "missing.toml"))
    assert done.returncode == 2 and "file not found" in done.stderr and "missing.toml" in done.stderr
    config.write_text("state_dir = [unclosed\n")
    done = fedmq("agent", "--config", str(config))
    assert done.returncode == 2 and "not valid TOML" in done.stderr


def test_env_override_is_checked_too(tmp_path: Path) -> None:
    config = tmp_path / "aggregator.toml"
    config.write_text(f'state_dir = "{tmp_path}/state"\n')
    done = subprocess.run([sys.executable, "-m", "fedmq.cli", "aggregator", "--config", str(config)],
                          capture_output=True, text=True, timeout=60,
                          env={**os.environ, "FEDMQ_ROUNDS_MIN_UPDATES": "many"})
    assert done.returncode == 2
    assert "FEDMQ_ROUNDS_MIN_UPDATES" in done.stderr and "rounds.min_updates" in done.stderr


@pytest.mark.asyncio
async def test_broker_run_serves_until_sigint() -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "fedmq.cli", "broker", "run", "--prefer", "amqtt",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        assert proc.stdout is not None
        async with asyncio.timeout(20):
            line = (await proc.stdout.readline()).decode()
        match = re.search(r"(mqtt://127\.0\.0\.1:\d+)", line)
        assert match and line.startswith("amqtt broker listening"), line
        settings = BrokerSettings.from_url(match.group(1), protocol="3.1.1")
        async with settings.client(identifier="cli-probe") as client:
            await client.subscribe("probe/t", qos=1)
            await client.publish("probe/t", b"x", qos=1)
            async with asyncio.timeout(5):
                async for message in client.messages:
                    assert message.payload == b"x"
                    break
        proc.send_signal(signal.SIGINT)
        async with asyncio.timeout(10):
            assert await proc.wait() == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


def test_pki_and_broker_config_commands(tmp_path: Path) -> None:
    pki = str(tmp_path / "pki")
    for args in (["pki", "init", "--dir", pki, "--fleet", "f1"],
                 ["pki", "issue-server", "--dir", pki, "--hostname", "localhost"],
                 ["pki", "issue-device", "--dir", pki, "pi-1", "pi-2"],
                 ["pki", "issue-client", "--dir", pki, "agg", "--role", "aggregator"],
                 ["pki", "signing-key", "--dir", pki]):
        done = fedmq(*args)
        assert done.returncode == 0, done.stderr
    for key in ("ca.key", "devices/pi-1.key", "clients/agg.key", "server/server.key", "fleet-signing.key"):
        assert (tmp_path / "pki" / key).stat().st_mode & 0o777 == 0o600, key
    again = fedmq("pki", "init", "--dir", pki, "--fleet", "f1")
    assert again.returncode == 2 and "already exists" in again.stderr
    conf = tmp_path / "fedmq.conf"
    done = fedmq("broker", "config", "--fleet", "f1", "--pki", pki, "--aggregator", "agg", "--acl-path",
                 str(tmp_path / "fedmq.acl"), "-o", str(conf))
    assert done.returncode == 0, done.stderr
    text = conf.read_text()
    assert "allow_anonymous false" in text and "require_certificate true" in text
    assert "fedmq/v1/f1/update/%u" in (tmp_path / "fedmq.acl").read_text()
    missing = fedmq("broker", "config", "--fleet", "f1", "--aggregator", "agg", "--acl-path", str(tmp_path / "x.acl"))
    assert missing.returncode == 2 and "--pki DIR" in missing.stderr
