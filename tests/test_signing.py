"""Signed models: devices install only models that verify with a trusted key, are newer than the
one they hold (across restarts), and follow announced key rotations."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest

from fedmq.aggregator.config import AggregatorConfig
from fedmq.aggregator.daemon import Aggregator
from fedmq.aggregator.rounds import RoundPolicy
from fedmq.broker import topics
from fedmq.broker.architecture import MLPArchitecture
from fedmq.broker.errors import RejectedMessage
from fedmq.broker.messages import DeviceStatus, ModelMessage, Task, decode_message
from fedmq.broker.settings import BrokerSettings
from fedmq.broker.signing import SigningKey, load_public_key
from fedmq.edge_agent.agent import Agent
from fedmq.edge_agent.config import AgentConfig

ARCH = MLPArchitecture(4, (3,), 2)


@pytest.fixture
def keys(tmp_path: Path) -> dict[str, SigningKey]:
    out = {}
    for name in ("fleet", "next", "attacker"):
        key = SigningKey.generate()
        key.write(tmp_path / f"{name}.key", tmp_path / f"{name}.pub")
        out[name] = key
    return out


def model(version: int, signer: SigningKey | None, *, next_key: bytes | None = None, seed: int = 0) -> bytes:
    return ModelMessage("f1", version, version - 1, ARCH, Task(), ARCH.init_params(seed), 1.0,
                        next_key=next_key).encode(signer)


def agent(tmp_path: Path) -> Agent:
    return Agent(AgentConfig(device_id="d1", fleet="f1", state_dir=tmp_path / "agent", backend="numpy",
                             fleet_public_key=tmp_path / "fleet.pub"))


def reason(agent: Agent, payload: bytes) -> str:
    with pytest.raises(RejectedMessage) as info:
        agent.install(payload)
    return f"{info.value.reason.value}: {info.value.detail}"


def test_key_files(tmp_path: Path, keys: dict[str, SigningKey]) -> None:
    assert (tmp_path / "fleet.key").stat().st_mode & 0o777 == 0o600
    assert load_public_key(tmp_path / "fleet.pub") == keys["fleet"].public_raw
    assert SigningKey.from_file(tmp_path / "fleet.key").key_id == keys["fleet"].key_id


def test_only_verified_models_install(tmp_path: Path, keys: dict[str, SigningKey]) -> None:
    device = agent(tmp_path)
    assert reason(device, model(1, None)).startswith("signature: model is not signed")
    assert reason(device, model(1, keys["attacker"])).startswith("signature: model is signed by unknown key")
    good = bytearray(model(1, keys["fleet"]))
    tampered = bytearray(good)
    tampered[-100] ^= 1  # one bit of a weight
    assert "does not verify" in reason(device, bytes(tampered))
    # a forged signature under the fleet's key id
    forged = bytes(good[:-64]) + keys["attacker"].sign(bytes(good[:-64]))
    assert "does not verify" in reason(device, forged)
    assert device.model_version == 0
    assert device.install(bytes(good)).version == 1


def test_replayed_old_model_is_refused_across_restarts(tmp_path: Path, keys: dict[str, SigningKey]) -> None:
    device = agent(tmp_path)
    device.install(model(3, keys["fleet"]))
    restarted = agent(tmp_path)
    assert restarted.model_version == 3
    assert "rollback refused" in reason(restarted, model(2, keys["fleet"], seed=9))


def test_key_rotation(tmp_path: Path, keys: dict[str, SigningKey]) -> None:
    device = agent(tmp_path)
    assert "unknown key" in reason(device, model(1, keys["next"])), "not announced yet"
    device.install(model(1, keys["fleet"], next_key=keys["next"].public_raw))
    restarted = agent(tmp_path)  # the announced key is remembered on disk
    assert restarted.install(model(2, keys["next"])).version == 2
    assert "unknown key" in reason(restarted, model(3, keys["attacker"]))


def test_aggregator_signs_every_version_and_re_signs_after_rotation(tmp_path: Path, keys: dict[str, SigningKey]) -> None:
    config = AggregatorConfig(fleet="f1", state_dir=tmp_path / "agg", arch=ARCH, policy=RoundPolicy(1, 1),
                              signing_key=tmp_path / "fleet.key", next_public_key=tmp_path / "next.pub")
    agg = Aggregator(config)
    device = agent(tmp_path)
    device.install(agg.model_payload)
    from fedmq.broker.messages import UpdateMessage
    delta = {k: np.full(s, 0.1, np.float32) for k, s in ARCH.param_shapes().items()}
    agg.ingest("d1", UpdateMessage("d1", "u1", 1, 3, "fp32", delta).encode())
    agg.close_round()
    assert device.install(agg.model_payload).version == 2
    agg.registry.close()
    # the operator switches to the announced key: the stored v2 is re-signed with it on restart
    rotated = Aggregator(AggregatorConfig(fleet="f1", state_dir=tmp_path / "agg", arch=ARCH, policy=RoundPolicy(1, 1),
                                          signing_key=tmp_path / "next.key"))
    published = decode_message(rotated.model_payload, max_bytes=1 << 20, expect=ModelMessage)
    assert published.version == 2 and published.signed_by[2]["key"] == keys["next"].key_id
    rotated.ingest("d1", UpdateMessage("d1", "u2", 2, 3, "fp32", delta).encode())
    rotated.close_round()
    assert device.install(rotated.model_payload).version == 3


@pytest.mark.broker
@pytest.mark.asyncio
async def test_forged_model_on_the_broker_is_reported_on_status(mqtt_broker: BrokerSettings, fleet: str, tmp_path: Path,
                                                               keys: dict[str, SigningKey]) -> None:
    agg = Aggregator(AggregatorConfig(fleet=fleet, state_dir=tmp_path / "agg", broker=mqtt_broker,
                                      client_id=f"{fleet}-agg", arch=ARCH, policy=RoundPolicy(1, 1),
                                      signing_key=tmp_path / "fleet.key"))
    device_id = f"{fleet}-d"
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "data.npz", x=rng.standard_normal((30, 4)).astype(np.float32), y=rng.integers(0, 2, 30))
    device = Agent(AgentConfig(device_id=device_id, fleet=fleet, state_dir=tmp_path / "dev", backend="numpy",
                               data=tmp_path / "data.npz", broker=mqtt_broker, fleet_public_key=tmp_path / "fleet.pub"))
    stop = asyncio.Event()
    tasks = [asyncio.create_task(agg.run(stop)), asyncio.create_task(device.run(stop))]
    try:
        async with asyncio.timeout(20):
            while device.model_version < 2:  # a signed round trip: v1 installed, trained, v2 installed
                await asyncio.sleep(0.05)
        forged = ModelMessage(fleet, 99, 98, ARCH, Task(), ARCH.init_params(5), 1.0).encode(keys["attacker"])
        async with mqtt_broker.client(identifier=f"{fleet}-attacker") as attacker, \
                mqtt_broker.client(identifier=f"{fleet}-watch") as watcher:
            await watcher.subscribe(topics.status_topic(fleet, device_id), qos=1)
            await attacker.publish(topics.model_topic(fleet), forged, qos=1)
            async with asyncio.timeout(10):
                async for message in watcher.messages:
                    status = decode_message(bytes(message.payload), max_bytes=1 << 16, expect=DeviceStatus)  # type: ignore[arg-type]
                    if "signature" in status.detail:
                        break
        assert status.model_version >= 2 and "unknown key" in status.detail
        assert device.model_version < 99
    finally:
        stop.set()
        await asyncio.wait(tasks, timeout=10)
