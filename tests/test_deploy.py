"""deploy/: systemd units, the Pi install script, compose, Mosquitto, Prometheus and Grafana files."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from fedmq.aggregator.metrics import AggregatorMetrics
from fedmq.broker.local import find_free_port, mosquitto_binary

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
UNITS = ["fedmq-aggregator.service", "fedmq-agent.service"]
SYSTEMD_ANALYZE = shutil.which("systemd-analyze")
needs_systemd_analyze = pytest.mark.skipif(SYSTEMD_ANALYZE is None, reason="systemd-analyze is not installed (systemd package)")


def unit_directives(path: Path) -> dict[str, list[str]]:
    """``Key`` -> values, over all sections (a key may repeat)."""
    directives: dict[str, list[str]] = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";", "[")):
            continue
        key, _, value = line.partition("=")
        directives.setdefault(key.strip(), []).append(value.strip())
    return directives


def runnable_copy(unit: str, tmp_path: Path) -> Path:
    """The unit with ExecStart on an executable that exists here (/opt/fedmq is not installed)."""
    fake = tmp_path / "fedmq"
    fake.write_text("#!/bin/sh\nexit 0\n")
    fake.chmod(0o755)
    text = (DEPLOY / "systemd" / unit).read_text()
    rewritten = text.replace("ExecStart=/opt/fedmq/venv/bin/fedmq", f"ExecStart={fake}")
    assert rewritten != text
    (tmp_path / unit).write_text(rewritten)
    return tmp_path / unit


@pytest.mark.parametrize("unit", UNITS)
def test_units_are_hardened_notify_services(unit: str) -> None:
    d = unit_directives(DEPLOY / "systemd" / unit)
    role = unit.removeprefix("fedmq-").removesuffix(".service")
    expected = {
        "Type": "notify", "NotifyAccess": "main", "WatchdogSec": "30", "Restart": "on-failure",
        "User": "fedmq", "DynamicUser": "no", "StateDirectory": f"fedmq/{role}", "ConfigurationDirectory": "fedmq",
        "ProtectSystem": "strict", "ProtectHome": "yes", "PrivateTmp": "yes", "NoNewPrivileges": "yes",
    }
    for key, value in expected.items():
        assert d.get(key) == [value], f"{unit}: {key}"
    assert re.fullmatch(r"\d+[KMG]", d["MemoryMax"][0])
    assert "RestartSec" in d
    assert "AF_UNIX" in d["RestrictAddressFamilies"][0], "sd_notify needs AF_UNIX"
    (exec_start,) = d["ExecStart"]
    assert exec_start == (f"/opt/fedmq/venv/bin/fedmq --log-format json --log-level info {role} "
                          f"--config /etc/fedmq/{role}.toml")
    assert d["WorkingDirectory"] == [f"/var/lib/fedmq/{role}"], "inside its StateDirectory"


@needs_systemd_analyze
def test_units_pass_systemd_analyze_verify(tmp_path: Path) -> None:
    copies = [runnable_copy(unit, tmp_path) for unit in UNITS]
    result = subprocess.run([SYSTEMD_ANALYZE, "verify", *map(str, copies)], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    # unknown or misspelt directives are only warnings: they must not be there either
    assert result.stderr.strip() == "", result.stderr


@needs_systemd_analyze
def test_verify_would_catch_a_misspelt_directive(tmp_path: Path) -> None:
    copy = runnable_copy(UNITS[0], tmp_path)
    copy.write_text(copy.read_text().replace("ProtectSystem=strict", "ProtectSystm=strict"))
    result = subprocess.run([SYSTEMD_ANALYZE, "verify", str(copy)], capture_output=True, text=True, timeout=30)
    assert "ProtectSystm" in result.stderr


@needs_systemd_analyze
@pytest.mark.parametrize("unit", UNITS)
def test_units_have_a_low_exposure_score(unit: str, tmp_path: Path) -> None:
    copy = runnable_copy(unit, tmp_path)
    result = subprocess.run([SYSTEMD_ANALYZE, "security", "--offline=true", "--threshold=30", str(copy)],
                            capture_output=True, text=True, timeout=30)
    if "offline" in result.stderr and "unrecognized" in result.stderr:
        pytest.skip("this systemd-analyze has no --offline (systemd < 250)")
    assert result.returncode == 0, f"exposure above 3.0:\n{result.stdout[-2000:]}{result.stderr}"


def test_sysusers_file_declares_the_user() -> None:
    lines = [ln for ln in (DEPLOY / "systemd" / "fedmq.sysusers").read_text().splitlines() if ln and not ln.startswith("#")]
    assert [ln.split()[:2] for ln in lines] == [["u", "fedmq"]]


# -- install-pi.sh ------------------------------------------------------------------------------

INSTALL = DEPLOY / "install-pi.sh"


def run_install(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["bash", str(INSTALL), *args], capture_output=True, text=True, timeout=60)


def test_install_script_parses_and_has_help() -> None:
    assert subprocess.run(["bash", "-n", str(INSTALL)], capture_output=True, timeout=30).returncode == 0
    assert os.access(INSTALL, os.X_OK)
    assert "set -euo pipefail" in INSTALL.read_text()
    result = run_install("--help")
    assert result.returncode == 0 and "--dry-run" in result.stdout and "--prefix" in result.stdout
    bad = run_install("--frobnicate")
    assert bad.returncode == 2 and "unknown option" in bad.stderr


def test_install_dry_run_changes_nothing(tmp_path: Path) -> None:
    root = tmp_path / "root"
    result = run_install("--dry-run", "--root", str(root))
    assert result.returncode == 0, result.stderr
    assert not root.exists(), "a dry run creates nothing"
    out = result.stdout
    assert f"+ python3 -m venv {root}/opt/fedmq/venv" in out
    assert f"{root}/opt/fedmq/venv/bin/python -m pip install --upgrade {DEPLOY.parent}[onnx]" in out
    assert f"install -m 0640 {DEPLOY}/agent.example.toml {root}/etc/fedmq/agent.toml" in out
    assert f"+ systemctl --root={root} enable fedmq-agent.service" in out


def fake_python(tmp_path: Path) -> tuple[Path, Path]:
    """A stand-in for python3 that makes a venv directory and logs pip calls instead of installing."""
    log = tmp_path / "pip.log"
    script = tmp_path / "python3"
    script.write_text(
        "#!/bin/sh\n"
        'if [ "$1" = "-m" ] && [ "$2" = "venv" ]; then mkdir -p "$3/bin" && cp "$0" "$3/bin/python"; exit 0; fi\n'
        f'echo "$@" >> {log}\n'
    )
    script.chmod(0o755)
    return script, log


@pytest.mark.skipif(shutil.which("systemctl") is None, reason="systemctl is not installed (offline enable needs it)")
def test_install_into_a_root_is_idempotent(tmp_path: Path) -> None:
    root = tmp_path / "root"
    python, pip_log = fake_python(tmp_path)
    first = run_install("--root", str(root), "--python", str(python), "--prefix", "/opt/fm", "--role", "aggregator")
    assert first.returncode == 0, first.stderr
    unit = root / "etc/systemd/system/fedmq-aggregator.service"
    assert "ExecStart=/opt/fm/venv/bin/fedmq " in unit.read_text(), "the unit points into the prefix"
    assert (root / "etc/systemd/system/multi-user.target.wants/fedmq-aggregator.service").is_symlink()
    config = root / "etc/fedmq/aggregator.toml"
    assert config.read_text() == (DEPLOY / "aggregator.example.toml").read_text()
    assert pip_log.read_text().splitlines()[-1] == f"-m pip install --upgrade {DEPLOY.parent}[onnx]"

    config.write_text('fleet = "mine"\n')
    second = run_install("--root", str(root), "--python", str(python), "--prefix", "/opt/fm", "--role", "aggregator")
    assert second.returncode == 0, second.stderr
    assert config.read_text() == 'fleet = "mine"\n', "an edited configuration is kept"
    assert "venv /opt/fm/venv exists" in second.stdout


# -- compose, Dockerfile, Mosquitto ----------------------------------------------------------------

def load_compose() -> dict:
    yaml = pytest.importorskip("yaml", reason="PyYAML (an amqtt dependency) parses compose.yaml")
    return yaml.safe_load((DEPLOY / "compose.yaml").read_text())


def test_compose_structure() -> None:
    compose = load_compose()
    services = compose["services"]
    assert services["mosquitto"]["image"].startswith("eclipse-mosquitto:2")
    agg = services["aggregator"]
    assert (DEPLOY / agg["build"]["context"] / agg["build"]["dockerfile"]).resolve() == DEPLOY / "Dockerfile"
    assert agg["depends_on"]["mosquitto"]["condition"] == "service_healthy"
    for name in ("mosquitto", "aggregator"):
        assert services[name]["restart"] in ("unless-stopped", "always", "on-failure")
        assert services[name]["healthcheck"]["test"][0] == "CMD"
        for volume in services[name]["volumes"]:
            source = volume.split(":")[0]
            if source.startswith("."):
                if source in ("./mosquitto/passwd", "./mosquitto/acl", "./aggregator.toml"):
                    continue  # made by the operator (README.md)
                assert (DEPLOY / source).is_file(), source
            else:
                assert source in compose["volumes"], f"named volume {source} is declared"
    assert any(v.endswith(":/var/lib/fedmq/aggregator") for v in agg["volumes"]), "state survives the container"
    assert agg["environment"]["FEDMQ_BROKER_URL"] == "mqtt://mosquitto:1883"


def test_dockerfile_runs_as_a_non_root_user() -> None:
    text = (DEPLOY / "Dockerfile").read_text()
    assert re.search(r"(?m)^FROM python:3\.11-slim\b", text)
    users = re.findall(r"(?m)^USER\s+(\S+)", text)
    assert users and users[-1] not in ("root", "0")


def connack(paho: Any, port: int, username: str | None = None, password: str | None = None) -> Any:
    """The broker's CONNACK reason code for these credentials."""
    answers: list[Any] = []
    client = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=username or "")
    if username:
        client.username_pw_set(username, password)
    client.on_connect = lambda _client, _userdata, _flags, reason, _props: answers.append(reason)
    client.connect("127.0.0.1", port, keepalive=10)
    deadline = time.monotonic() + 5
    while not answers and time.monotonic() < deadline:
        client.loop(timeout=0.1)
    client.disconnect()
    assert answers, "no CONNACK within 5 s"
    return answers[0]


@pytest.mark.skipif(mosquitto_binary() is None, reason="Mosquitto is not installed (apt-get install -y mosquitto)")
def test_compose_mosquitto_config_works(tmp_path: Path) -> None:
    """The compose broker config on the real Mosquitto: no anonymous fleet access; the health listener answers."""
    paho = pytest.importorskip("paho.mqtt.client")
    fleet_port, health_port = find_free_port(), find_free_port()
    (tmp_path / "data").mkdir()
    (tmp_path / "passwd").write_text("")
    subprocess.run(["mosquitto_passwd", "-b", str(tmp_path / "passwd"), "aggregator", "secret"], check=True, timeout=30)
    (tmp_path / "acl").write_text("user aggregator\ntopic readwrite fedmq/#\n")
    shutil.copy(DEPLOY / "mosquitto" / "health.acl", tmp_path / "health.acl")
    conf = (DEPLOY / "mosquitto" / "mosquitto.conf").read_text()
    conf = conf.replace("/mosquitto/config/", f"{tmp_path}/").replace("/mosquitto/data/", f"{tmp_path}/data/")
    conf = conf.replace("listener 1883\n", f"listener {fleet_port} 127.0.0.1\n")
    conf = conf.replace("listener 1880 127.0.0.1\n", f"listener {health_port} 127.0.0.1\n")
    assert "/mosquitto/" not in conf
    if os.geteuid() == 0:
        conf = "user root\n" + conf  # else Mosquitto drops to `mosquitto`, which cannot read tmp_path
    (tmp_path / "mosquitto.conf").write_text(conf)
    proc = subprocess.Popen([mosquitto_binary(), "-c", str(tmp_path / "mosquitto.conf")],  # type: ignore[list-item]
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 10
        while True:
            assert proc.poll() is None, proc.stdout.read().decode()  # type: ignore[union-attr]
            try:
                socket.create_connection(("127.0.0.1", health_port), timeout=0.2).close()
                socket.create_connection(("127.0.0.1", fleet_port), timeout=0.2).close()
                break
            except OSError:
                assert time.monotonic() < deadline, "Mosquitto did not open its listeners"
                time.sleep(0.05)

        import paho.mqtt.subscribe as subscribe

        uptime = subscribe.simple("$SYS/broker/uptime", hostname="127.0.0.1", port=health_port, keepalive=10)
        assert uptime.payload.decode().endswith("seconds"), "the health check's subscription gets an answer"
        assert connack(paho, fleet_port).is_failure, "anonymous clients are refused on the fleet listener"
        assert not connack(paho, fleet_port, "aggregator", "secret").is_failure, "password clients get in"
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        if proc.stdout:
            proc.stdout.close()


# -- Prometheus and Grafana -----------------------------------------------------------------------

def exported_metric_names() -> set[str]:
    """Every sample name a fresh AggregatorMetrics exposes (counters with _total, histogram parts)."""
    metrics = AggregatorMetrics()
    metrics.observe_round(1.0)
    names: set[str] = set()
    for family in text_string_to_metric_families(generate_latest(metrics.registry).decode()):
        names.update(sample.name for sample in family.samples)
    return names


def test_grafana_dashboard_queries_only_exported_metrics() -> None:
    dashboard = json.loads((DEPLOY / "grafana" / "fedmq-dashboard.json").read_text())
    assert dashboard["title"] and dashboard["uid"] and isinstance(dashboard["schemaVersion"], int)
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    assert len(exprs) >= 8
    queried = {name for expr in exprs for name in re.findall(r"\bfedmq_[a-z_]+", expr)}
    exported = exported_metric_names()
    assert queried <= exported, f"queries name metrics nobody exports: {sorted(queried - exported)}"
    wanted = {"fedmq_updates_accepted_total", "fedmq_updates_rejected_total", "fedmq_round_duration_seconds_bucket",
              "fedmq_model_version", "fedmq_devices_online", "fedmq_bytes_in_total", "fedmq_bytes_out_total"}
    assert wanted <= queried, f"the dashboard misses {sorted(wanted - queried)}"
    assert any("by (reason)" in e for e in exprs), "rejections are broken down by reason"
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))


def test_prometheus_scrapes_the_aggregator_port() -> None:
    yaml = pytest.importorskip("yaml", reason="PyYAML (an amqtt dependency) parses prometheus.yml")
    config = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    targets = [t for sc in jobs["fedmq-aggregator"]["static_configs"] for t in sc["targets"]]
    assert targets == ["aggregator:9108"], "the compose service name and the example metrics port"
    assert "port = 9108" in (DEPLOY / "aggregator.example.toml").read_text()
