"""``fedmq demo``: the main job reaches its accuracy with defaults on both local brokers."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from fedmq.broker.settings import BrokerSettings
from fedmq.demo import DemoOptions, dirichlet_partition, load_digits_split, run_demo

pytestmark = pytest.mark.broker


def test_dirichlet_partition_is_a_skewed_partition() -> None:
    _, y, _, _ = load_digits_split(seed=0, test_fraction=0.2)
    shards = dirichlet_partition(y, 10, alpha=0.5, seed=0)
    together = np.concatenate(shards)
    assert sorted(together.tolist()) == list(range(len(y))), "every example in exactly one shard"
    assert min(len(s) for s in shards) >= 10
    # label skew: some shard's most common label covers far more than the uniform 10 %
    top_share = max(np.bincount(y[s], minlength=10).max() / len(s) for s in shards)
    assert top_share > 0.3
    iid = dirichlet_partition(y, 10, alpha=1000.0, seed=0)
    assert max(np.bincount(y[s], minlength=10).max() / len(s) for s in iid) < 0.2


def test_digits_split_is_stratified_and_disjoint() -> None:
    x_train, y_train, x_test, y_test = load_digits_split(seed=0, test_fraction=0.2)
    assert len(y_train) + len(y_test) == 1797
    assert 0.19 < len(y_test) / 1797 < 0.21
    assert set(np.unique(y_test)) == set(range(10))
    assert x_train.max() <= 1.0 and x_train.min() >= 0.0
    train_rows = {row.tobytes() for row in x_train}
    assert sum(row.tobytes() in train_rows for row in x_test) < len(y_test) * 0.05  # digits has a few duplicates


def check_demo_rows(rows: list, report_path: Path) -> None:
    assert [r.version for r in rows] == list(range(1, 22))
    assert rows[-1].accuracy >= 0.95, rows[-1]
    assert rows[0].accuracy < 0.3, "the initial model is untrained"
    assert all(r.updates == 10 for r in rows[1:])
    report = json.loads(report_path.read_text())
    assert [entry["version"] for entry in report] == list(range(1, 22))
    assert set(report[0]) == {"version", "accuracy", "loss", "updates", "bytes_up", "bytes_down", "seconds"}
    assert report[-1]["accuracy"] == pytest.approx(rows[-1].accuracy, abs=1e-4)
    assert report[1]["bytes_up"] > 0 and report[1]["bytes_down"] > 0


@pytest.mark.slow
@pytest.mark.asyncio
async def test_demo_defaults_on_the_embedded_broker_reach_095(tmp_path: Path) -> None:
    lines: list[str] = []
    rows = await run_demo(DemoOptions(prefer_broker="amqtt", report=tmp_path / "r.json"), say=lines.append)
    assert "broker: amqtt" in lines[0]
    check_demo_rows(rows, tmp_path / "r.json")


@pytest.mark.slow
@pytest.mark.asyncio
async def test_demo_on_mosquitto_every_backend_reaches_numpys_accuracy(require_mosquitto: str, tmp_path: Path) -> None:
    """Defaults on Mosquitto with each backend: >= 0.95, and within 1 point of the numpy reference."""
    final = {}
    for backend in ("numpy", "onnx", "wasm"):
        lines: list[str] = []
        report = tmp_path / f"{backend}.json"
        rows = await run_demo(DemoOptions(prefer_broker="mosquitto", backend=backend, report=report), say=lines.append)
        assert "broker: mosquitto" in lines[0] and f"the {backend} backend" in lines[1]
        check_demo_rows(rows, report)
        final[backend] = rows[-1].accuracy
    assert abs(final["onnx"] - final["numpy"]) <= 0.01, final
    assert abs(final["wasm"] - final["numpy"]) <= 0.01, final


def test_demo_cli_against_an_existing_broker(mqtt_broker: BrokerSettings, tmp_path: Path) -> None:
    report = tmp_path / "run.json"
    url = f"mqtt://{mqtt_broker.host}:{mqtt_broker.port}"
    done = subprocess.run(
        [sys.executable, "-m", "fedmq.cli", "demo", "--agents", "3", "--rounds", "2", "--broker", url,
         "--report", str(report)], capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert url in done.stdout
    assert "version accuracy" in done.stdout and "final model v3" in done.stdout
    rows = json.loads(report.read_text())
    assert [r["version"] for r in rows] == [1, 2, 3]
    assert rows[2]["accuracy"] > rows[0]["accuracy"]
    assert all(r["updates"] == 3 for r in rows[1:])


def test_demo_cli_rejects_bad_options() -> None:
    done = subprocess.run([sys.executable, "-m", "fedmq.cli", "demo", "--agents", "0"], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 2
    assert "--agents must be from 1 to 1000" in done.stderr
    for args, message in ((["--stragglers", "1.5"], "--stragglers is a fraction"),
                          (["--slowdown", "0.5"], "--slowdown must be from 1"),
                          (["--mode", "async", "--buffer-size", "0"], "--buffer-size must be at least 1")):
        done = subprocess.run([sys.executable, "-m", "fedmq.cli", "demo", *args], capture_output=True, text=True,
                              timeout=60)
        assert done.returncode == 2 and message in done.stderr, (args, done.stderr)


@pytest.mark.slow
@pytest.mark.asyncio
async def test_secure_demo_reaches_its_accuracy_with_tls_acls_and_signed_models(require_mosquitto: str,
                                                                                 tmp_path: Path) -> None:
    from fedmq.aggregator.registry import ModelRegistry
    from fedmq.broker.messages import ModelMessage, decode_message

    lines: list[str] = []
    rows = await run_demo(DemoOptions(secure=True, workdir=tmp_path, report=tmp_path / "r.json"), say=lines.append)
    assert "mqtts://" in lines[0] and "mutual TLS" in lines[0]
    check_demo_rows(rows, tmp_path / "r.json")
    conf = (tmp_path / "mosquitto" / "mosquitto.conf").read_text()
    assert "require_certificate true" in conf and "allow_anonymous false" in conf and "acl_file" in conf
    registry = ModelRegistry(tmp_path / "aggregator")
    for record in registry.versions():
        model = decode_message(registry.load_payload(record), max_bytes=1 << 24, expect=ModelMessage)
        assert model.signed_by is not None, f"v{record.version} is signed"
    registry.close()


@pytest.mark.asyncio
async def test_demo_with_a_lossy_codec_uploads_fewer_bytes(mqtt_broker: BrokerSettings) -> None:
    url = f"mqtt://{mqtt_broker.host}:{mqtt_broker.port}"
    base = await run_demo(DemoOptions(agents=3, rounds=2, broker_url=url), say=lambda line: None)
    int8 = await run_demo(DemoOptions(agents=3, rounds=2, broker_url=url, codec="int8"), say=lambda line: None)
    assert [r.updates for r in int8[1:]] == [3, 3], "every int8 update was accepted"
    assert sum(r.bytes_up for r in int8) * 3 < sum(r.bytes_up for r in base)
    assert int8[-1].accuracy > int8[0].accuracy


def test_ops_cli_against_a_keep_running_demo_fleet(mqtt_broker: BrokerSettings, tmp_path: Path) -> None:
    """`fedmq demo --keep-running` and the ops commands as separate processes, as an operator runs them."""
    import re
    import signal
    import time

    url = f"mqtt://{mqtt_broker.host}:{mqtt_broker.port}"
    demo = subprocess.Popen([sys.executable, "-m", "fedmq.cli", "demo", "--agents", "3", "--rounds", "2", "--broker", url,
                             "--keep-running"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        seen = ""
        deadline = time.monotonic() + 120
        while "(rows are printed for every 10th version" not in seen and time.monotonic() < deadline:
            line = demo.stdout.readline()  # type: ignore[union-attr]
            assert line, f"the demo ended early:\n{seen}"
            seen += line
        fleet = re.search(r"--fleet (demo-[0-9a-f]+)", seen).group(1)  # type: ignore[union-attr]

        def ops(*args: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run([sys.executable, "-m", "fedmq.cli", *args, "--broker", url, "--fleet", fleet],
                                  capture_output=True, text=True, timeout=60)

        status = ops("fleet", "status", "--json")
        assert status.returncode == 0, status.stderr
        table = json.loads(status.stdout)
        devices = {d["device"]: d for d in table["devices"]}
        assert set(devices) == {f"{fleet}-agent{i:03d}" for i in range(3)}
        assert all(d["state"] == "online" and d["model_version"] >= 3 for d in devices.values())
        rounds = ops("rounds", "--json")
        assert rounds.returncode == 0 and len(json.loads(rounds.stdout)["rounds"]) >= 2, rounds.stderr
        exported = ops("model", "export", "2", str(tmp_path / "v2.onnx"))
        assert exported.returncode == 0 and (tmp_path / "v2.onnx").stat().st_size > 1000, exported.stderr
    finally:
        demo.send_signal(signal.SIGINT)
        demo.wait(timeout=60)
        demo.stdout.close()  # type: ignore[union-attr]


@pytest.mark.slow
@pytest.mark.asyncio
async def test_async_demo_with_stragglers_reaches_the_target(mqtt_broker: BrokerSettings) -> None:
    url = f"mqtt://{mqtt_broker.host}:{mqtt_broker.port}"
    lines: list[str] = []
    rows = await run_demo(DemoOptions(broker_url=url, mode="async", stragglers=0.3, slowdown=5, buffer_size=5, rounds=60,
                                      target_accuracy=0.93), say=lines.append)
    assert rows[-1].accuracy >= 0.93, [r.accuracy for r in rows]
    assert all(r.updates == 5 for r in rows[1:])
    assert any("stragglers: agents" in line and "5x slower" in line for line in lines)
