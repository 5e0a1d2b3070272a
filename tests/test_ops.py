"""The ops CLI over a real Mosquitto: fleet status/watch/pause/resume, model list/show/export/push/
rollback, rounds; MQTT 5 request/response and the MQTT 3.1.1 topic fallback; no-aggregator errors;
a SIGKILLed device turning offline within its keepalive window. The aggregator and most agents run
in this process; the broker is real."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from conftest import aggregator_online, shard_agents
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from fedmq.aggregator.config import AggregatorConfig
from fedmq.aggregator.daemon import Aggregator
from fedmq.aggregator.ops import parameter_problems
from fedmq.aggregator.rounds import RoundPolicy
from fedmq.broker import topics
from fedmq.broker.architecture import MLPArchitecture
from fedmq.broker.errors import Reason, RejectedMessage
from fedmq.broker.messages import (
    ModelMessage,
    OpsRequest,
    OpsResponse,
    Task,
    decode_message,
)
from fedmq.broker.settings import BrokerSettings
from fedmq.cli import build_parser
from fedmq.demo import dirichlet_partition, load_digits_split
from fedmq.edge_agent.training import logits
from fedmq.ops import NoAggregator, OpsClient, OpsError
from fedmq.ops_cli import age, load_weights

pytestmark = pytest.mark.broker
WAIT = 30.0
ARCH = MLPArchitecture(64, (16,), 10)


def make_aggregator(fleet: str, broker: BrokerSettings, state: Path, **overrides: object) -> Aggregator:
    config: dict[str, object] = dict(fleet=fleet, state_dir=state, broker=broker, client_id=f"{fleet}-agg", arch=ARCH,
                                     seed=1, task=Task(epochs=1, batch_size=32, lr=0.1, deadline_s=30),
                                     policy=RoundPolicy(1, 3, 1.0))
    config.update(overrides)
    return Aggregator(AggregatorConfig(**config))  # type: ignore[arg-type]


@contextlib.asynccontextmanager
async def running(*daemons: object, probe: BrokerSettings | None = None):  # type: ignore[no-untyped-def]
    stop = asyncio.Event()
    tasks = [asyncio.create_task(d.run(stop)) for d in daemons]  # type: ignore[attr-defined]
    try:
        for daemon in daemons:
            if isinstance(daemon, Aggregator):
                # a request sent before its first subscription would reach nobody
                await aggregator_online(probe or daemon.config.broker, daemon.config.fleet)
        yield tasks
    finally:
        stop.set()
        await asyncio.wait(tasks, timeout=WAIT)
    for task in tasks:
        assert task.done() and task.exception() is None, task


async def until(condition: Callable[[], bool], within: float = WAIT, what: str = "condition") -> None:
    async with asyncio.timeout(within):
        while not condition():
            await asyncio.sleep(0.05)


# -- the CLI, through the real `fedmq` parser -----------------------------------------------------

def run_cli(argv: list[str]) -> tuple[int, str, str]:
    args = build_parser().parse_args(argv)
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = args.func(args)
    return code, out.getvalue(), err.getvalue()


async def cli(broker: BrokerSettings, fleet: str, *argv: str, protocol: str = "5", timeout: float = 10.0) -> tuple[int, str, str]:
    """Run one ops command in a thread (it runs its own event loop, like the real CLI)."""
    url = f"mqtt://{broker.host}:{broker.port}?protocol={protocol}"
    return await asyncio.to_thread(run_cli, [*argv, "--broker", url, "--fleet", fleet, "--timeout", str(timeout)])


async def cli_json(broker: BrokerSettings, fleet: str, *argv: str, protocol: str = "5") -> dict:
    code, out, err = await cli(broker, fleet, *argv, "--json", protocol=protocol)
    assert code == 0, err
    return json.loads(out)


def accepted(aggregator: Aggregator, device: str) -> int:
    return int(aggregator.device_stats.get(device, {}).get("accepted", 0))


# -- sans-IO pieces --------------------------------------------------------------------------

def test_ops_messages_round_trip_and_refuse_bad_fields() -> None:
    request = OpsRequest("r-1", "model.push", "ops-a", {"file": "w.npz", "n": 3}, deadline=5.0,
                         tensors={"w": np.ones((2, 3), np.float32)})
    out = decode_message(request.encode(), max_bytes=1 << 16, expect=OpsRequest)
    assert (out.request_id, out.op, out.reply_to, dict(out.args), out.deadline) == ("r-1", "model.push", "ops-a",
                                                                                   {"file": "w.npz", "n": 3}, 5.0)
    assert out.tensors["w"].shape == (2, 3)
    response = decode_message(OpsResponse("r-1", False, error="nope").encode(), max_bytes=1 << 16, expect=OpsResponse)
    assert not response.ok and response.error == "nope"
    for bad in (OpsRequest("r 1", "status", "ops-a"), OpsRequest("r1", "Status!", "ops-a"),
                OpsRequest("r1", "status", "ops/a"), OpsRequest("r1", "status", "ops-a", {"x": [1, 2]}),
                OpsRequest("r1", "status", "ops-a", {"Bad": 1})):
        with pytest.raises(RejectedMessage) as info:
            decode_message(bad.encode(), max_bytes=1 << 16)
        assert info.value.reason is Reason.FIELD


def test_parameter_problems_name_missing_extra_and_wrong_shapes() -> None:
    shapes = ARCH.param_shapes()
    good = {k: np.zeros(s, np.float32) for k, s in shapes.items()}
    assert parameter_problems(good, shapes) == []
    bad = dict(good)
    del bad["dense1.bias"]
    bad["dense0.weight"] = np.zeros((64, 15), np.float32)
    bad["extra"] = np.zeros(3, np.float32)
    problems = "; ".join(parameter_problems(bad, shapes))
    assert "missing tensors ['dense1.bias']" in problems and "unexpected tensors ['extra']" in problems
    assert "dense0.weight has shape (64, 15), the architecture needs (64, 16)" in problems


def test_age_and_weight_files(tmp_path: Path) -> None:
    assert age(1000.0, now=1003.0) == "3s ago" and age(1000.0, now=1000.0 + 190) == "3m ago"
    assert age(1000.0, now=1000.0 + 2 * 86400) == "2d ago" and age(None) == "-"
    np.savez(tmp_path / "w.npz", a=np.ones(3), b=np.arange(2))
    weights = load_weights(tmp_path / "w.npz")
    assert weights["a"].dtype == np.float32 and weights["b"].dtype.kind == "i"
    (tmp_path / "w.txt").write_text("x")
    with pytest.raises(OpsError, match=r"\.npz"):
        load_weights(tmp_path / "w.txt")


# -- against the broker --------------------------------------------------------------------------

@pytest.mark.asyncio
async def test_no_aggregator_gives_a_clear_timeout(mqtt_broker: BrokerSettings, fleet: str) -> None:
    async with OpsClient(mqtt_broker, fleet, f"{fleet}-ops", timeout=1.0) as ops:
        started = time.monotonic()
        with pytest.raises(NoAggregator) as info:
            await ops.request("model.list")
        assert time.monotonic() - started < WAIT
        status = await ops.fleet_status()  # still works, from retained statuses only
    message = str(info.value)
    assert f"no aggregator answered on fleet {fleet} within 1 s" in message and "fedmq fleet status" in message
    assert status.devices == [] and "no aggregator answered" in status.warning
    code, out, err = await cli(mqtt_broker, fleet, "model", "list", timeout=1.0)
    assert code == 1 and out == "" and "fedmq: error: no aggregator answered" in err
    code, out, err = await cli(mqtt_broker, fleet, "fleet", "status", protocol="3.1.1", timeout=1.0)
    assert code == 0 and "0 device(s)" in out and "warning: no aggregator answered" in err
    code, _, err = await asyncio.to_thread(run_cli, ["rounds", "--broker", "mqtt://127.0.0.1:1", "--timeout", "1"])
    assert code == 1 and "cannot connect to the broker" in err


@pytest.mark.asyncio
async def test_request_response_mqtt5_and_311_and_bad_requests(mqtt_broker: BrokerSettings, fleet: str,
                                                                tmp_path: Path) -> None:
    aggregator = make_aggregator(fleet, mqtt_broker, tmp_path / "agg")
    async with running(aggregator):
        for protocol in ("5", "3.1.1"):
            settings = BrokerSettings(host=mqtt_broker.host, port=mqtt_broker.port, protocol=protocol)  # type: ignore[arg-type]
            async with OpsClient(settings, fleet, f"{fleet}-ops", timeout=WAIT) as ops:
                assert ops.protocol == protocol
                listing = (await ops.request("model.list")).result
                assert [r["version"] for r in listing["versions"]] == [1] and listing["versions"][0]["source"] == "initial"
                with pytest.raises(OpsError, match="no model version 9 in the registry"):
                    await ops.request("model.show", {"version": 9})
                with pytest.raises(OpsError, match="unknown op 'model.delete'"):
                    await ops.request("model.delete", {"version": 1})
                with pytest.raises(OpsError, match="argument 'version' must be an integer"):
                    await ops.request("model.get", {"version": "one"})

        # raw MQTT 5: the answer echoes the CorrelationData and goes to the ResponseTopic
        me = f"{fleet}-raw"
        reply = topics.ops_response_topic(fleet, me)
        async with mqtt_broker.client(identifier=me, protocol="5") as raw:
            await raw.subscribe(reply, qos=1)

            async def ask(payload: bytes, correlation: bytes, response_topic: str = reply) -> OpsResponse:
                props = Properties(PacketTypes.PUBLISH)
                props.ResponseTopic = response_topic
                props.CorrelationData = correlation
                await raw.publish(topics.ops_request_topic(fleet, me), payload, qos=1, properties=props)
                async with asyncio.timeout(WAIT):
                    async for message in raw.messages:
                        assert message.properties.CorrelationData == correlation  # type: ignore[union-attr]
                        return decode_message(bytes(message.payload), max_bytes=1 << 20, expect=OpsResponse)  # type: ignore[arg-type]
                raise AssertionError("no answer")

            good = await ask(OpsRequest("q1", "status", me).encode(), b"c-1")
            assert good.ok and good.result["model"]["version"] == 1 and good.result["fleet"] == fleet
            garbage = await ask(b"\xc1not msgpack", b"c-2")
            assert not garbage.ok and "bad request: malformed" in garbage.error
            stolen = await ask(OpsRequest("q3", "status", "someone-else").encode(), b"c-3")
            assert not stolen.ok and "reply_to 'someone-else' must be the client id" in stolen.error
            elsewhere = await ask(OpsRequest("q4", "status", me).encode(), b"c-4", topics.model_topic(fleet))
            assert not elsewhere.ok and "response topic must be" in elsewhere.error
    assert aggregator.counters["ops_rejected"] == 3


def forward_numpy(params: dict[str, np.ndarray], x: np.ndarray) -> np.ndarray:
    return logits(params, ARCH, x)


@pytest.mark.asyncio
async def test_fleet_commands_pause_resume_push_rollback_export(mqtt_broker: BrokerSettings, fleet: str,
                                                                 tmp_path: Path) -> None:
    import onnxruntime as ort

    x, y, x_test, _ = load_digits_split(seed=2, test_fraction=0.2)
    shards = dirichlet_partition(y, 3, alpha=5.0, seed=2)
    aggregator = make_aggregator(fleet, mqtt_broker, tmp_path / "agg")
    agents = shard_agents(fleet, shards, x, y, tmp_path, mqtt_broker, backend="numpy")
    a0, a1, a2 = (a.device for a in agents)
    async with running(aggregator, *agents):
        await until(lambda: all(accepted(aggregator, a.device) >= 1 for a in agents) and aggregator.model.version >= 3)

        # fleet status: every device online with its counters, backend and platform (both protocols)
        for protocol in ("5", "3.1.1"):
            status = await cli_json(mqtt_broker, fleet, "fleet", "status", protocol=protocol)
            rows = {d["device"]: d for d in status["devices"]}
            assert set(rows) == {a0, a1, a2} and status["warning"] is None
            assert all(d["state"] == "online" and d["backend"] == "numpy" and d["platform"] for d in rows.values())
            assert all(d["accepted"] >= 1 and d["rejected"] == 0 and d["counters_from"] == "aggregator" for d in rows.values())
            assert all(d["since"] and d["last_update"] and d["model_version"] >= 2 for d in rows.values())
        code, out, _ = await cli(mqtt_broker, fleet, "fleet", "status")
        assert code == 0 and "3 device(s), 3 online" in out and a0 in out and "ago" in out
        code, out, _ = await cli(mqtt_broker, fleet, "fleet", "watch", "--interval", "0.05", "--count", "2")
        assert code == 0 and out.count("fedmq fleet watch") == 2 and out.count(a2) == 2

        # pause one device: its accepted count stops growing while the others continue
        code, out, _ = await cli(mqtt_broker, fleet, "fleet", "pause", "--device", a0, "--reason", "maintenance")
        assert code == 0 and f"pause sent to device {a0}" in out
        await until(lambda: agents[0].paused)
        paused_status = await cli_json(mqtt_broker, fleet, "fleet", "status")
        assert {d["device"]: d["paused"] for d in paused_status["devices"]} == {a0: True, a1: False, a2: False}
        # an update trained before the pause may still arrive; two versions later it would be stale
        version = aggregator.model.version
        await until(lambda: aggregator.model.version >= version + 2)
        frozen, others = accepted(aggregator, a0), accepted(aggregator, a1)
        version = aggregator.model.version
        await until(lambda: aggregator.model.version >= version + 3)
        assert accepted(aggregator, a0) == frozen
        assert accepted(aggregator, a1) >= others + 2

        # resume: it trains again
        code, _, _ = await cli(mqtt_broker, fleet, "fleet", "resume", "--device", a0)
        assert code == 0
        await until(lambda: accepted(aggregator, a0) > frozen)

        # pause every device, and wait until nothing is in flight: the model stops moving
        code, out, _ = await cli(mqtt_broker, fleet, "fleet", "pause")
        assert code == 0 and "every device" in out
        await until(lambda: all(a.paused for a in agents))
        await until(lambda: all((a._training is None or a._training.done()) and not a.outbox.entries() for a in agents)
                    and aggregator.round.count == 0, what="a quiet fleet")
        await until(lambda: all(a.model_version == aggregator.model.version for a in agents))
        current = aggregator.model.version

        # model list / show / rounds
        listing = await cli_json(mqtt_broker, fleet, "model", "list")
        assert [r["version"] for r in listing["versions"]] == list(range(1, current + 1))
        assert listing["versions"][-1]["current"] and listing["total"] == current
        code, out, _ = await cli(mqtt_broker, fleet, "model", "list")
        assert code == 0 and f"*v{current}" in out and "initial" in out
        shown = await cli_json(mqtt_broker, fleet, "model", "show", "2")
        assert shown["version"] == 2 and shown["parent"] == 1 and shown["arch"] == [64, 16, 10]
        assert shown["tensors"]["dense0.weight"]["shape"] == [64, 16] and shown["tensors"]["dense0.weight"]["norm"] > 0
        code, out, _ = await cli(mqtt_broker, fleet, "model", "show", "2")
        assert code == 0 and "dense1.bias" in out and "sha256" in out
        history = await cli_json(mqtt_broker, fleet, "rounds", protocol="3.1.1")
        assert [r["version"] for r in history["rounds"]] == list(range(1, current + 1))
        assert all(r["info"]["updates"] >= 1 and "train_loss" in r["info"] for r in history["rounds"][1:])
        code, out, _ = await cli(mqtt_broker, fleet, "rounds")
        assert code == 0 and "train_loss=" in out

        # export: an ONNX file onnxruntime runs, with numpy's predictions
        onnx_path = tmp_path / "v2.onnx"
        code, out, err = await cli(mqtt_broker, fleet, "model", "export", "2", str(onnx_path))
        assert code == 0, err
        v2: ModelMessage = decode_message(aggregator.registry.load_payload(aggregator.registry.get(2)),  # type: ignore[arg-type]
                                          max_bytes=1 << 22, expect=ModelMessage)
        session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
        got = session.run(None, {session.get_inputs()[0].name: x_test[:50].astype(np.float32)})
        expected = forward_numpy(dict(v2.params), x_test[:50].astype(np.float32))
        np.testing.assert_allclose(got[0], expected, rtol=1e-4, atol=1e-5)
        assert (got[2] == expected.argmax(axis=1)).all()

        # push with wrong shapes: a clear error and no new version
        shapes = ARCH.param_shapes()
        bad = {k: np.zeros(s, np.float32) for k, s in shapes.items() if k != "dense1.bias"}
        bad["dense0.weight"] = np.zeros((64, 8), np.float32)
        np.savez(tmp_path / "bad.npz", **bad)
        code, out, err = await cli(mqtt_broker, fleet, "model", "push", str(tmp_path / "bad.npz"))
        assert code == 1 and "missing tensors ['dense1.bias']" in err
        assert "dense0.weight has shape (64, 8), the architecture needs (64, 16)" in err
        assert aggregator.model.version == current and aggregator.registry.latest().version == current  # type: ignore[union-attr]

        # push good weights: the next version, installed by every device
        pushed = {k: np.full(s, 0.01, np.float32) for k, s in shapes.items()}
        np.savez(tmp_path / "good.npz", **pushed)
        code, out, err = await cli(mqtt_broker, fleet, "model", "push", str(tmp_path / "good.npz"), protocol="3.1.1")
        assert code == 0 and f"as model v{current + 1}" in out, err
        await until(lambda: all(a.model_version == current + 1 for a in agents))
        assert all(np.array_equal(agents[0].model.params[k], pushed[k]) for k in shapes)  # type: ignore[union-attr]

        # rollback to v2: v(current + 2) carries v2's weights; devices install it (no rollback refusal)
        code, out, err = await cli(mqtt_broker, fleet, "model", "rollback", "2")
        assert code == 0 and f"weights of v2 as model v{current + 2}" in out, err
        await until(lambda: all(a.model_version == current + 2 for a in agents))
        for agent in agents:
            assert all(np.array_equal(agent.model.params[k], v2.params[k]) for k in shapes)  # type: ignore[union-attr]
            assert not any(k.startswith("models_rejected") for k in agent.counters)
        row = aggregator.registry.latest()
        assert row is not None and row.info["source"] == "rollback" and row.info["rollback_of"] == 2
        code, out, _ = await cli(mqtt_broker, fleet, "model", "list")
        assert "rollback of v2" in out and "push good.npz" in out
        code, _, err = await cli(mqtt_broker, fleet, "model", "rollback", "99")
        assert code == 1 and "no model version 99" in err


def write_agent_config(path: Path, fleet: str, device: str, settings: BrokerSettings, state: Path, keepalive: int) -> None:
    path.write_text(
        f'device_id = "{device}"\nfleet = "{fleet}"\nstate_dir = "{state}"\n'
        f'[broker]\nurl = "mqtt://{settings.host}:{settings.port}"\nkeepalive = {keepalive}\n'
    )


@pytest.mark.asyncio
async def test_killed_and_frozen_devices_show_offline_within_their_keepalive(mqtt_broker: BrokerSettings, fleet: str,
                                                                            tmp_path: Path) -> None:
    """Two real agent processes: one SIGKILLed (its socket closes, so the broker sends its Will at
    once) and one SIGSTOPped (a hung device or a cut network: the broker notices after 1.5 x
    keepalive). Both show offline in `fleet status` within the keepalive window."""
    keepalive = 5
    devices = {"kill": f"{fleet}-pi-kill", "stop": f"{fleet}-pi-stop"}
    aggregator = make_aggregator(fleet, mqtt_broker, tmp_path / "agg")
    procs: dict[str, subprocess.Popen[bytes]] = {}
    async with running(aggregator), OpsClient(mqtt_broker, fleet, f"{fleet}-ops", timeout=WAIT) as ops:
        try:
            for how, device in devices.items():
                config = tmp_path / f"{how}.toml"
                write_agent_config(config, fleet, device, mqtt_broker, tmp_path / how, keepalive)
                with (tmp_path / f"{how}.log").open("wb") as log:
                    procs[how] = subprocess.Popen([sys.executable, "-m", "fedmq.cli", "--log-level", "info", "agent",
                                                   "--config", str(config)], stdout=log, stderr=subprocess.STDOUT)

            async def states() -> dict[str, str]:
                return {d.device: d.state for d in (await ops.fleet_status()).devices}

            async with asyncio.timeout(WAIT):
                while set((await states()).items()) < {(d, "online") for d in devices.values()}:
                    await asyncio.sleep(0.2)
            os.kill(procs["kill"].pid, signal.SIGKILL)
            os.kill(procs["stop"].pid, signal.SIGSTOP)
            signalled = time.monotonic()
            took: dict[str, float] = {}
            async with asyncio.timeout(1.5 * keepalive + 10):  # the window, plus slack for a loaded machine
                while len(took) < 2:
                    now = await states()
                    for how, device in devices.items():
                        if how not in took and now.get(device) == "offline":
                            took[how] = time.monotonic() - signalled
                    await asyncio.sleep(0.2)
            print(f"shown offline after: SIGKILL {took['kill']:.1f} s, SIGSTOP {took['stop']:.1f} s "
                  f"(keepalive {keepalive} s)")
            assert took["stop"] >= keepalive - 1  # the broker waited for the keepalive, it did not guess
        finally:
            for proc in procs.values():
                proc.kill()
                proc.wait(timeout=WAIT)
        # a fresh client, which saw no transition itself, learns "offline since" from the aggregator
        async with OpsClient(mqtt_broker, fleet, f"{fleet}-ops2", timeout=WAIT) as fresh:
            rows = {d.device: d for d in (await fresh.fleet_status()).devices}
        for device in devices.values():
            assert rows[device].state == "offline" and rows[device].since is not None
            assert time.time() - rows[device].since < WAIT  # type: ignore[operator]


@pytest.mark.asyncio
async def test_ops_through_the_secure_broker_and_its_acl(tmp_path: Path) -> None:
    """Mutual TLS and the fleet ACL: the operator identity can do every ops command it needs."""
    from test_broker_security import AGGREGATOR, FLEET, OPERATOR, Broker, make_pki, running_mosquitto, settings_for

    from fedmq.aggregator.config import OpsAuth
    from fedmq.broker import pki
    from fedmq.broker.local import find_free_port
    from fedmq.broker.mosquitto_config import render_acl, render_config
    from fedmq.edge_agent.agent import Agent
    from fedmq.edge_agent.config import AgentConfig

    pki_dir = make_pki(tmp_path / "pki")
    acl = tmp_path / "acl"
    acl.write_text(render_acl(FLEET, aggregator=AGGREGATOR, operators=[OPERATOR]), encoding="utf-8")
    port = find_free_port()
    config = render_config(fleet=FLEET, port=port, tls=pki.server_tls_files(pki_dir), acl_path=acl)
    with running_mosquitto(tmp_path, config, port) as log:
        broker = Broker(port=port, pki=pki_dir, log=log)
        # as deployed: requests and commands count only signed by an operator of the fleet CA
        # (the CLI signs with its --cert-file/--key-file)
        aggregator = Aggregator(AggregatorConfig(fleet=FLEET, state_dir=tmp_path / "agg", client_id=AGGREGATOR,
                                                    broker=settings_for(broker, AGGREGATOR), arch=ARCH,
                                                    ops_auth=OpsAuth(ca_file=pki_dir / "ca.pem")))
        device = Agent(AgentConfig(device_id="dev-a", fleet=FLEET, state_dir=tmp_path / "dev-a",
                                   broker=settings_for(broker, "dev-a"), operator_ca_file=pki_dir / "ca.pem"))
        cert, key = pki.client_paths(pki_dir, OPERATOR)
        tls = ["--broker", f"mqtts://127.0.0.1:{port}", "--fleet", FLEET, "--client-id", OPERATOR,
               "--ca-file", str(pki_dir / "ca.pem"), "--cert-file", str(cert), "--key-file", str(key),
               "--timeout", str(WAIT)]
        ops_settings = BrokerSettings(host="127.0.0.1", port=port, protocol="5", tls=True, ca_file=str(pki_dir / "ca.pem"),
                                      cert_file=str(cert), key_file=str(key))
        # probe as the operator: with client ids pinned to certificates, a second "aggregator"
        # connection would take the aggregator's session over
        async with running(aggregator, device, probe=ops_settings):
            await until(lambda: device.model_version == 1)
            async with asyncio.timeout(WAIT):
                while True:  # the device's status may come a moment after its model
                    code, out, err = await asyncio.to_thread(run_cli, ["fleet", "status", "--json", *tls])
                    assert code == 0, err
                    rows = json.loads(out)["devices"]
                    if rows and rows[0]["state"] == "online":
                        break
            assert rows[0]["device"] == "dev-a" and json.loads(out)["aggregator"]["client_id"] == AGGREGATOR
            code, out, err = await asyncio.to_thread(run_cli, ["model", "list", *tls])
            assert code == 0 and "*v1" in out, err
            code, out, err = await asyncio.to_thread(run_cli, ["fleet", "pause", "--device", "dev-a", *tls])
            assert code == 0 and f"signed by {OPERATOR}" in out, err
            await until(lambda: device.paused)
            code, out, err = await asyncio.to_thread(run_cli, ["fleet", "freeze", "--version", "1", *tls])
            assert code == 0 and "freeze at v1 sent to every device" in out, err
            await until(lambda: device.frozen == 1 and device.paused)  # apart from the pause
            code, out, err = await asyncio.to_thread(run_cli, ["fleet", "unfreeze", *tls])
            assert code == 0, err
            await until(lambda: device.frozen == 0 and device.paused)
            code, out, err = await asyncio.to_thread(run_cli, ["model", "export", "1", str(tmp_path / "m.onnx"), *tls])
            assert code == 0 and (tmp_path / "m.onnx").stat().st_size > 0, err
        # the operator may read artifacts (export of a model with a backbone fetches one: the devices'
        # `pattern read` grants it to every identity); published once the aggregator stopped, as one
        # identity is one connection
        artifact = topics.artifact_topic(FLEET, "ab" * 32)
        async with settings_for(broker, AGGREGATOR).client(identifier=AGGREGATOR) as publisher:
            await publisher.publish(artifact, b"backbone bytes", qos=1, retain=True)
        async with OpsClient(ops_settings, FLEET, OPERATOR, timeout=WAIT) as ops:
            assert await ops.retained(artifact) == b"backbone bytes"
