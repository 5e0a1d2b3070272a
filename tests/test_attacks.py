"""The attacks of the independent security run, each through the real daemons and a real Mosquitto.

The deployment is the documented secure one: a fleet PKI, Mosquitto with mutual TLS and the
generated ACL, signed models, operator-signed requests and commands. The aggregator and the agents
run in this process (the same classes the services run); the broker is a real Mosquitto.

Two attackers:

- **a stolen device**: the certificate and key of ``dev-c``, a device with data of its own, that
  trains honestly for a while and then attacks;
- **a compromised broker**: ``broker-admin``, an identity the test adds to the ACL with read and
  write rights on the whole tree, which is what a broker that has been taken over can do. Its
  certificate is not an operator's (it holds no operator key) and it has no fleet signing key.

SECURITY.md's threat table names these tests.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiomqtt
import numpy as np
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from test_broker_security import running_mosquitto

from fedmq.aggregator.config import AggregatorConfig, OpsAuth
from fedmq.aggregator.daemon import Aggregator
from fedmq.aggregator.influence import InfluenceSettings
from fedmq.aggregator.registry import ModelRegistry
from fedmq.aggregator.rollout import RolloutPolicy
from fedmq.aggregator.rounds import RoundPolicy
from fedmq.broker import pki, topics
from fedmq.broker.architecture import MLPArchitecture
from fedmq.broker.local import find_free_port
from fedmq.broker.messages import (
    MAX_EXAMPLES,
    Command,
    DeviceStatus,
    ModelMessage,
    OpsRequest,
    OpsResponse,
    Receipt,
    Task,
    UpdateMessage,
    decode_message,
)
from fedmq.broker.mosquitto_config import render_acl, render_config
from fedmq.broker.operators import OperatorSigner
from fedmq.broker.settings import BrokerSettings
from fedmq.broker.signing import SigningKey
from fedmq.broker.wire import encode_frame
from fedmq.demo import dirichlet_partition, load_digits_split
from fedmq.edge_agent.agent import Agent
from fedmq.edge_agent.config import AgentConfig
from fedmq.edge_agent.training import train
from fedmq.ops import OpsClient

pytestmark = pytest.mark.broker

HOST = "127.0.0.1"
WAIT = 20.0
ARCH = MLPArchitecture(64, (16,), 10)
TASK = Task(epochs=1, batch_size=16, lr=0.1, deadline_s=60)
AGGREGATOR = "aggregator"
OPERATOR = "ops-alice"
ADMIN = "broker-admin"          # the compromised broker
STOLEN = "dev-c"                # the stolen device
HONEST = ("dev-a", "dev-b", "dev-d", "dev-e", "dev-f")
BIG = 1 << 24


@pytest.fixture(scope="module")
def fleet_pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("attack-pki")
    pki.init_ca(directory, fleet="attacks")
    pki.issue_server(directory, hostnames=["localhost"], ips=[HOST])
    for device in (*HONEST, STOLEN):
        pki.issue_device(directory, device)
    pki.issue_client(directory, AGGREGATOR, role="aggregator")
    pki.issue_client(directory, OPERATOR, role="operator")
    pki.issue_client(directory, ADMIN, role="aggregator")  # a TLS identity, no operator key
    SigningKey.generate().write(directory / "k1.key", directory / "k1.pub")
    SigningKey.generate().write(directory / "k2.key", directory / "k2.pub")
    return directory


@pytest.fixture(scope="module")
def digits() -> tuple[list[tuple[np.ndarray, np.ndarray]], tuple[np.ndarray, np.ndarray]]:
    x_train, y_train, x_test, y_test = load_digits_split(seed=2, test_fraction=0.2)
    shards = dirichlet_partition(y_train, len(HONEST) + 1, alpha=1.0, seed=2)
    return [(x_train[s], y_train[s]) for s in shards], (x_test, y_test)


@dataclass
class Deployment:
    """One fleet on its own Mosquitto: settings, configs and attacker connections."""

    fleet: str
    port: int
    pki: Path
    tmp: Path
    shards: list[tuple[np.ndarray, np.ndarray]]

    def settings(self, identity: str) -> BrokerSettings:
        cert, key = pki.device_paths(self.pki, identity)
        if not cert.exists():
            cert, key = pki.client_paths(self.pki, identity)
        return BrokerSettings(host=HOST, port=self.port, protocol="5", tls=True, ca_file=str(self.pki / "ca.pem"),
                              cert_file=str(cert), key_file=str(key), connect_timeout=WAIT)

    def aggregator(self, **overrides: Any) -> Aggregator:
        fields: dict[str, Any] = dict(
            fleet=self.fleet, state_dir=self.tmp / "agg", broker=self.settings(AGGREGATOR), client_id=AGGREGATOR,
            arch=ARCH, seed=3, task=TASK, policy=RoundPolicy(len(HONEST) + 1, len(HONEST) + 1, 60),
            signing_key=self.pki / "k1.key", ops_auth=OpsAuth(ca_file=self.pki / "ca.pem"))
        fields.update(overrides)
        return Aggregator(AggregatorConfig(**fields))

    def agent(self, index: int, **overrides: Any) -> Agent:
        device = HONEST[index]
        fields: dict[str, Any] = dict(
            device_id=device, fleet=self.fleet, state_dir=self.tmp / device, broker=self.settings(device),
            backend="numpy", fleet_public_key=self.pki / "k1.pub", operator_ca_file=self.pki / "ca.pem")
        fields.update(overrides)
        x, y = self.shards[index]
        return Agent(AgentConfig(**fields), dataset=(x, y))


@pytest.fixture
def deployment(fleet_pki: Path, fleet: str, tmp_path: Path, digits: Any) -> Iterator[Deployment]:
    port = find_free_port()
    workdir = tmp_path / "broker"
    workdir.mkdir()
    acl = workdir / "acl"
    # the compromised broker: read and write everything (ACL user blocks are checked first)
    acl.write_text(render_acl(fleet, aggregator=AGGREGATOR, operators=[OPERATOR])
                   + f"\nuser {ADMIN}\ntopic readwrite {topics.fleet_prefix(fleet)}/#\n", encoding="utf-8")
    config = render_config(fleet=fleet, port=port, tls=pki.server_tls_files(fleet_pki), acl_path=acl)
    with running_mosquitto(workdir, config, port):
        yield Deployment(fleet, port, fleet_pki, tmp_path, digits[0])


@contextlib.asynccontextmanager
async def daemons(deployment: Deployment, aggregator: Aggregator | None, agents: list[Agent]) -> AsyncIterator[asyncio.Event]:
    """Run the aggregator and the agents until the block ends."""
    stop = asyncio.Event()
    running = [asyncio.create_task(a.run(stop)) for a in agents]
    if aggregator is not None:
        running.append(asyncio.create_task(aggregator.run(stop)))
    try:
        yield stop
    finally:
        stop.set()
        await asyncio.wait(running, timeout=WAIT)
    for task in running:
        assert task.done() and task.exception() is None, task


class Connection:
    """An attacker's own MQTT connection: the stolen device's, or the broker's."""

    def __init__(self, client: aiomqtt.Client, fleet: str) -> None:
        self.client = client
        self.fleet = fleet
        self.messages: dict[str, list[bytes]] = {}
        self.arrived = asyncio.Event()
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        async for message in self.client.messages:
            self.messages.setdefault(str(message.topic), []).append(bytes(message.payload))  # type: ignore[arg-type]
            self.arrived.set()

    async def wait_for(self, topic: str, check: Any = lambda payload: True, within: float = WAIT) -> bytes:
        """The first payload on ``topic`` (received so far or later) for which ``check`` is true."""
        async with asyncio.timeout(within):
            while True:
                for payload in self.messages.get(topic, []):
                    if check(payload):
                        return payload
                self.arrived.clear()
                await self.arrived.wait()

    def close(self) -> None:
        self._reader.cancel()


@contextlib.asynccontextmanager
async def connection(deployment: Deployment, identity: str, *subscriptions: str) -> AsyncIterator[Connection]:
    async with deployment.settings(identity).client(identifier=identity) as client:
        for topic in subscriptions:
            await client.subscribe(topic, qos=1)
        conn = Connection(client, deployment.fleet)
        try:
            yield conn
        finally:
            conn.close()


def model_of(payload: bytes) -> ModelMessage:
    return decode_message(payload, max_bytes=BIG, expect=ModelMessage)


def receipt_for(update_id: str) -> Any:
    return lambda payload: decode_message(payload, max_bytes=1 << 16, expect=Receipt).update_id == update_id


def flat(params: Any) -> np.ndarray:
    return np.concatenate([np.asarray(params[name], dtype=np.float64).reshape(-1) for name in ARCH.param_shapes()])


def unflat(vector: np.ndarray) -> dict[str, np.ndarray]:
    out, start = {}, 0
    for name, shape in ARCH.param_shapes().items():
        size = math.prod(shape)
        out[name] = vector[start:start + size].reshape(shape).astype(np.float32)
        start += size
    return out


def update(model: ModelMessage, delta: dict[str, np.ndarray], num_examples: int, device: str = STOLEN,
           update_id: str | None = None) -> tuple[str, bytes]:
    update_id = update_id or f"v{model.version}-{uuid.uuid4().hex[:8]}"
    message = UpdateMessage(device=device, update_id=update_id, base_version=model.version, num_examples=num_examples,
                            codec="fp32", tensors=delta, metrics={"loss": 1.0})
    return update_id, message.encode()


def honest_delta(model: ModelMessage, shard: tuple[np.ndarray, np.ndarray]) -> dict[str, np.ndarray]:
    result = train(model.params, ARCH, shard[0], shard[1], epochs=TASK.epochs, batch_size=TASK.batch_size, lr=TASK.lr,
                   seed=model.version)
    return {name: result.params[name] - model.params[name] for name in model.params}


async def publish_update(stolen: Connection, model: ModelMessage, delta: dict[str, np.ndarray], examples: int) -> Receipt:
    update_id, payload = update(model, delta, examples)
    await stolen.client.publish(topics.update_topic(stolen.fleet, STOLEN), payload, qos=1)
    return decode_message(await stolen.wait_for(topics.receipt_topic(stolen.fleet, STOLEN), receipt_for(update_id)),
                          max_bytes=1 << 16, expect=Receipt)


async def next_model(conn: Connection, after: int) -> ModelMessage:
    payload = await conn.wait_for(topics.model_topic(conn.fleet), lambda p: model_of(p).version > after)
    return model_of(payload)


async def poisoning_run(deployment: Deployment, attacks: dict[int, Any], rounds: int, **config: Any) -> dict[int, ModelMessage]:
    """Five honest agents and the stolen device train ``rounds`` rounds; in the round of version v
    the stolen device sends ``attacks[v](model)`` (a delta and an example count) instead of its
    honest update. Returns every version's model."""
    aggregator = deployment.aggregator(**config)
    agents = [deployment.agent(i) for i in range(len(HONEST))]
    seen: dict[int, ModelMessage] = {}
    fleet = deployment.fleet
    async with daemons(deployment, aggregator, agents), \
            connection(deployment, STOLEN, topics.model_topic(fleet), topics.receipt_topic(fleet, STOLEN)) as stolen:
        model = await next_model(stolen, 0)
        seen[model.version] = model
        while model.version <= rounds:
            if model.version in attacks:
                delta, examples = attacks[model.version](model)
            else:
                delta, examples = honest_delta(model, deployment.shards[-1]), len(deployment.shards[-1][1])
            receipt = await publish_update(stolen, model, delta, examples)
            assert receipt.status == "accepted", receipt
            model = await next_model(stolen, model.version)
            seen[model.version] = model
    return seen


def step(models: dict[int, ModelMessage], version: int) -> np.ndarray:
    return flat(models[version + 1].params) - flat(models[version].params)


def round_info(deployment: Deployment, version: int) -> dict[str, Any]:
    registry = ModelRegistry(deployment.tmp / "agg")
    try:
        record = registry.get(version)
        assert record is not None
        return dict(record.info)
    finally:
        registry.close()


def attacker_share_bound(info: dict[str, Any], honest_examples: list[int]) -> float:
    """The most of the round's weight the attacker can hold: its capped weight over the total."""
    cap = info["weight_cap"]
    return cap / (cap + sum(min(n, cap) for n in honest_examples))


# -- one device sets the global model --------------------------------------------------------------

@pytest.mark.asyncio
async def test_a_stolen_device_claiming_2_31_examples_does_not_set_the_model(deployment: Deployment) -> None:
    """Was: the next version was exactly the attacker's delta (cosine 1.000). Now its weight is
    capped relative to the fleet's history, and its length bounded by the norm bound."""
    rng = np.random.default_rng(5)
    target = rng.standard_normal(flat(ARCH.init_params(0)).size)
    target /= np.linalg.norm(target)
    attack_version = 4  # after three honest rounds: a history of 18 updates

    def claim_everything(model: ModelMessage) -> tuple[dict[str, np.ndarray], int]:
        return unflat(target * 5.0), MAX_EXAMPLES

    models = await poisoning_run(deployment, {attack_version: claim_everything}, rounds=attack_version)
    moved = step(models, attack_version)
    info = round_info(deployment, attack_version + 1)
    cosine = float(moved @ target / np.linalg.norm(moved))
    share = attacker_share_bound(info, [len(y) for _, y in deployment.shards[:-1]])
    assert info["weights"] == "examples" and info["weight_cap"] < 10_000, info
    assert cosine < 0.95, f"the attacker still decides the version (cosine {cosine:.3f})"
    # along the attacker's direction the model moved by at most its capped share of the bounded length
    assert float(moved @ target) <= share * info["norm_bound"] * 1.001 + 1e-6, (moved @ target, share, info)


@pytest.mark.asyncio
async def test_a_fixed_norm_bound_no_longer_leaves_the_weight_free(deployment: Deployment) -> None:
    """Was: with max_norm on, clipping bounded the length but a claimed 2^31-1 examples still
    made the round move in the attacker's direction alone."""
    rng = np.random.default_rng(6)
    target = rng.standard_normal(flat(ARCH.init_params(0)).size)
    target /= np.linalg.norm(target)
    fixed = InfluenceSettings(max_norm=2.0, auto_norm=False)

    def claim_everything(model: ModelMessage) -> tuple[dict[str, np.ndarray], int]:
        return unflat(target * 50.0), MAX_EXAMPLES

    models = await poisoning_run(deployment, {4: claim_everything}, rounds=4, influence=fixed)
    moved = step(models, 4)
    info = round_info(deployment, 5)
    assert info["norm_bound"] == 2.0 and info["clipped"] >= 1
    cosine = float(moved @ target / np.linalg.norm(moved))
    assert cosine < 0.95, f"clipped, but the weight still decides (cosine {cosine:.3f})"
    share = attacker_share_bound(info, [len(y) for _, y in deployment.shards[:-1]])
    assert float(moved @ target) <= share * 2.0 * 1.001


@pytest.mark.asyncio
async def test_a_sign_flipped_delta_100x_an_honest_step_is_clipped(deployment: Deployment) -> None:
    """Was: accepted and applied at its full length. Now it is clipped to the round's norm bound
    (from the fleet's own recent updates), so it moves the model by at most its share of it."""

    def flip(model: ModelMessage) -> tuple[dict[str, np.ndarray], int]:
        honest = honest_delta(model, deployment.shards[-1])
        return {name: -100.0 * value for name, value in honest.items()}, len(deployment.shards[-1][1])

    models = await poisoning_run(deployment, {4: flip}, rounds=4)
    info = round_info(deployment, 5)
    honest_step = flat(honest_delta(models[4], deployment.shards[-1]))
    attack = -honest_step / np.linalg.norm(honest_step)
    moved = step(models, 4)
    assert info["clipped"] >= 1 and math.isfinite(info["norm_bound"]), info
    # every folded delta is at most norm_bound long, so is their weighted mean
    assert np.linalg.norm(moved) <= info["norm_bound"] * 1.001, (np.linalg.norm(moved), info)
    share = attacker_share_bound(info, [len(y) for _, y in deployment.shards[:-1]])
    assert float(moved @ attack) <= share * info["norm_bound"] * 1.001
    # the bound came from the history: far below the attacker's length
    assert info["norm_bound"] < 0.2 * 100 * np.linalg.norm(honest_step)


@pytest.mark.asyncio
async def test_one_device_cannot_fill_an_async_buffer(deployment: Deployment) -> None:
    """Was: in async mode one device filled a whole buffer (5 of 5) and decided the next version."""
    aggregator = deployment.aggregator(task=Task(mode="async", max_staleness=5, epochs=1, batch_size=16, lr=0.1,
                                                 deadline_s=60), buffer_size=5, policy=RoundPolicy(5, 5, 60))
    fleet = deployment.fleet
    async with daemons(deployment, aggregator, []), \
            connection(deployment, STOLEN, topics.model_topic(fleet), topics.receipt_topic(fleet, STOLEN)) as stolen:
        model = await next_model(stolen, 0)
        delta = honest_delta(model, deployment.shards[-1])
        receipts = [await publish_update(stolen, model, delta, 100) for _ in range(5)]
        assert [r.status for r in receipts] == ["accepted"] + ["rejected"] * 4
        assert {r.reason for r in receipts[1:]} == {"repeat"} and all(r.final for r in receipts)
        assert aggregator.model.version == 1 and aggregator.round.count == 1


# -- a compromised broker and the aggregator's signing key ------------------------------------------

def ops_request(deployment: Deployment, op: str, args: dict[str, Any], tensors: dict[str, np.ndarray] | None = None,
                signer: Any = None, issued_at: float | None = None) -> tuple[str, bytes]:
    request_id = uuid.uuid4().hex
    now = time.time() if issued_at is None else issued_at
    request = OpsRequest(request_id, op, OPERATOR, args, deadline=now + 30, tensors=tensors or {}, issued_at=now,
                         fleet=deployment.fleet)
    return request_id, request.encode(signer)


def response_for(request_id: str) -> Any:
    return lambda payload: decode_message(payload, max_bytes=BIG, expect=OpsResponse).request_id == request_id


@pytest.mark.asyncio
async def test_the_broker_cannot_have_the_aggregator_push_or_roll_back(deployment: Deployment) -> None:
    """Was: a request injected by the broker with no operator identity made the aggregator
    publish the attacker's weights (model.push) or v1's weights (model.rollback), signed."""
    aggregator = deployment.aggregator(policy=RoundPolicy(1, 1, 60), max_rounds=0)
    fleet = deployment.fleet
    request_topic = topics.ops_request_topic(fleet, OPERATOR)
    response_topic = topics.ops_response_topic(fleet, OPERATOR)
    evil = {name: np.full(shape, 7.0, dtype=np.float32) for name, shape in ARCH.param_shapes().items()}
    cert, key = pki.device_paths(deployment.pki, STOLEN)  # a device's key, made to sign as the ops CLI would
    device_key = OperatorSigner(x509.load_pem_x509_certificate(cert.read_bytes()),
                                serialization.load_pem_private_key(key.read_bytes(), None))  # type: ignore[arg-type]
    async with daemons(deployment, aggregator, []), \
            connection(deployment, ADMIN, response_topic, request_topic) as broker:
        await wait_until(lambda: aggregator.counters["bytes_out"] > 0)  # subscribed, model published
        for op, args, tensors, signer, expected in (
                ("model.push", {"file": "evil.npz"}, evil, None, "not signed by an operator key"),
                ("model.rollback", {"version": 1}, None, None, "not signed by an operator key"),
                ("model.push", {"file": "evil.npz"}, evil, device_key, "not an operator's"),
        ):
            request_id, payload = ops_request(deployment, op, args, tensors, signer)
            await broker.client.publish(request_topic, payload, qos=1)
            answer = decode_message(await broker.wait_for(response_topic, response_for(request_id)), max_bytes=BIG,
                                    expect=OpsResponse)
            assert not answer.ok and "not authenticated" in answer.error and expected in answer.error, answer.error
        assert aggregator.model.version == 1 and len(aggregator.registry.versions()) == 1

        # the operator's own push counts; the broker replaying its bytes makes nothing more
        operator = OperatorSigner.from_files(*pki.client_paths(deployment.pki, OPERATOR))
        request_id, payload = ops_request(deployment, "model.push", {"file": "good.npz"},
                                          {k: np.array(v) for k, v in aggregator.model.params.items()}, operator)
        await broker.client.publish(request_topic, payload, qos=1)
        answer = decode_message(await broker.wait_for(response_topic, response_for(request_id)), max_bytes=BIG,
                                expect=OpsResponse)
        assert answer.ok and answer.result["version"] == 2, answer.error
        broker.messages.pop(response_topic, None)
        await broker.client.publish(request_topic, payload, qos=1)  # replayed as is
        await broker.wait_for(response_topic, response_for(request_id))
        assert len(aggregator.registry.versions()) == 2, "a replayed push made another version"
        # ... and so does an old request, signed, but issued before the freshness window
        request_id, payload = ops_request(deployment, "model.rollback", {"version": 1}, None, operator,
                                          issued_at=time.time() - 3600)
        await broker.client.publish(request_topic, payload, qos=1)
        answer = decode_message(await broker.wait_for(response_topic, response_for(request_id)), max_bytes=BIG,
                                expect=OpsResponse)
        assert not answer.ok and "s ago; requests older than" in answer.error, answer.error
        assert len(aggregator.registry.versions()) == 2
    assert aggregator.counters["ops_unauthenticated"] == 4


async def wait_until(condition: Any, within: float = WAIT) -> None:
    async with asyncio.timeout(within):
        while not condition():
            await asyncio.sleep(0.02)


@pytest.mark.asyncio
async def test_fleet_commands_count_only_signed_by_an_operator_and_not_from_the_future(deployment: Deployment) -> None:
    """Was: a retained pause on cmd/all injected by the broker paused the fleet, and with
    issued_at = 1e11 the operator's own resume was ignored for good."""
    agents = [deployment.agent(0), deployment.agent(1)]
    fleet = deployment.fleet
    operator = OperatorSigner.from_files(*pki.client_paths(deployment.pki, OPERATOR))
    everyone = topics.broadcast_command_topic(fleet)
    async with daemons(deployment, None, agents), connection(deployment, ADMIN) as broker:
        await wait_until(lambda: all(a._client is not None for a in agents))
        forged = [
            Command("pause", issued_at=1e11, issued_by="ops-alice", target="all", fleet=fleet).encode(),  # unsigned
            Command("pause", issued_at=1e11, issued_by="ops-alice", target="all", fleet=fleet).encode(operator),
            Command("pause", issued_at=time.time(), target=HONEST[0], fleet=fleet).encode(operator),  # for dev-a only
        ]
        for number, payload in enumerate(forged, start=1):
            await broker.client.publish(everyone, payload, qos=1, retain=True)
            await wait_until(lambda n=number: all(a.counters["commands_rejected"] >= n for a in agents))
            assert not any(a.paused for a in agents)
        reasons = {k for k in agents[0].counters if k.startswith("commands_rejected_")}
        assert reasons == {"commands_rejected_unauthenticated", "commands_rejected_replayed"}, reasons
        async with OpsClient(deployment.settings(OPERATOR), fleet, OPERATOR, signer=operator) as ops:
            await ops.pause()
            await wait_until(lambda: all(a.paused for a in agents))
            await ops.command("freeze", version=1)
            await wait_until(lambda: all(a.frozen == 1 and a.paused for a in agents))
            # pause and freeze are retained apart: a device that connects now gets both
            late = deployment.agent(2)
            async with daemons(deployment, None, [late]):
                await wait_until(lambda: late.paused and late.frozen == 1)
            await ops.resume()
            await wait_until(lambda: not any(a.paused for a in agents) and all(a.frozen == 1 for a in agents))


@pytest.mark.asyncio
async def test_a_retired_key_signs_nothing_after_a_rotation(deployment: Deployment) -> None:
    """Was: after a key rotation, models signed with the retired key still installed, and one
    with version 2^53 stopped all later updates for good."""
    fleet = deployment.fleet
    k1 = SigningKey.from_file(deployment.pki / "k1.key")
    one = RoundPolicy(1, 1, 60)
    agent = deployment.agent(0)
    # k1 signs and announces k2; the agent takes two versions from it
    first = deployment.aggregator(policy=one, next_public_key=deployment.pki / "k2.pub", max_rounds=1)
    async with daemons(deployment, first, [agent]):
        await wait_until(lambda: agent.model_version == 2)
    # the operator switches the aggregator to k2: its next version retires k1 on the device
    second = deployment.aggregator(policy=one, signing_key=deployment.pki / "k2.key", max_rounds=2)
    async with daemons(deployment, second, [agent]):
        await wait_until(lambda: agent.model_version == 3)
    assert "retired" in (deployment.tmp / HONEST[0] / "trust.json").read_text()
    third = deployment.aggregator(policy=one, signing_key=deployment.pki / "k2.key", max_rounds=4)
    async with daemons(deployment, third, [agent]), connection(deployment, ADMIN) as broker:
        await wait_until(lambda: agent.model_version >= 4)
        for version in (agent.model_version + 1, 2**53):
            replay = ModelMessage(fleet=fleet, version=version, parent=version - 1, arch=ARCH, task=TASK,
                                  params=ARCH.init_params(9), created=time.time()).encode(k1)
            before = agent.counters["models_rejected_signature"]
            await broker.client.publish(topics.model_topic(fleet), replay, qos=1, retain=True)
            await wait_until(lambda b=before: agent.counters["models_rejected_signature"] > b)
            assert "retired" in agent.detail
        # the fleet goes on: the aggregator's next k2 version installs
        await broker.client.publish(topics.model_topic(fleet), third.model_payload, qos=1, retain=True)
        await wait_until(lambda: agent.model_version == 5)


@pytest.mark.asyncio
async def test_a_candidate_replayed_on_the_model_topic_is_not_installed(deployment: Deployment) -> None:
    """Was: a staged-rollout candidate (signed, cohort pi-01) replayed on the model topic was
    installed by a device outside the cohort."""
    fleet = deployment.fleet
    # dev-x never reports: the candidate stays under evaluation for the whole test
    aggregator = deployment.aggregator(policy=RoundPolicy(1, 1, 60),
                                       rollout=RolloutPolicy(cohort=(HONEST[0], "dev-x"), timeout_s=600))
    agents = [deployment.agent(0), deployment.agent(1)]
    async with daemons(deployment, aggregator, agents), connection(deployment, ADMIN, topics.canary_topic(fleet)) as broker:
        candidate = await broker.wait_for(topics.canary_topic(fleet), lambda p: bool(p))
        assert model_of(candidate).stage == "candidate" and model_of(candidate).version == 2
        await broker.client.publish(topics.model_topic(fleet), candidate, qos=1, retain=True)
        await wait_until(lambda: all(a.counters["models_rejected_role"] >= 1 for a in agents))
        assert [a.model_version for a in agents] == [1, 1]
        await wait_until(lambda: agents[0].counters["candidates_evaluated"] >= 1)  # the cohort still evaluates it


# -- updates that get no answer, and limits per device ---------------------------------------------

@pytest.mark.asyncio
async def test_every_readable_update_gets_a_receipt_that_names_it(deployment: Deployment) -> None:
    """Was: num_examples 0, num_examples over the cap and a device id with path characters got
    no receipt a device could match (an empty update_id): a conforming device re-sent them forever."""
    aggregator = deployment.aggregator(policy=RoundPolicy(1, 1, 60))
    fleet = deployment.fleet
    async with daemons(deployment, aggregator, []), \
            connection(deployment, STOLEN, topics.model_topic(fleet), topics.receipt_topic(fleet, STOLEN)) as stolen:
        model = await next_model(stolen, 0)
        delta = honest_delta(model, deployment.shards[-1])
        header = dict(kind="update", schema=1, device=STOLEN, base_version=model.version, codec="fp32", metrics={},
                      created=0.0, num_examples=10)
        huge = {"dense0.weight": np.zeros((4096, 1024), np.float32)}  # 16 MiB: over max_update_bytes
        cases = {
            "zero-examples": encode_frame({**header, "update_id": "zero-examples", "num_examples": 0}, delta),
            "too-many": encode_frame({**header, "update_id": "too-many", "num_examples": MAX_EXAMPLES + 1}, delta),
            "path-device": encode_frame({**header, "update_id": "path-device", "device": "../dev-a"}, delta),
            "oversize": encode_frame({**header, "update_id": "oversize"}, huge),
        }
        for update_id, payload in cases.items():
            await stolen.client.publish(topics.update_topic(fleet, STOLEN), payload, qos=1)
            receipt = decode_message(await stolen.wait_for(topics.receipt_topic(fleet, STOLEN), receipt_for(update_id)),
                                     max_bytes=1 << 16, expect=Receipt)
            assert receipt.status == "rejected" and receipt.final, receipt
            assert receipt.reason in ("field", "oversize"), receipt
        assert aggregator.round.count == 0


@pytest.mark.asyncio
async def test_one_device_flooding_updates_is_rate_limited(deployment: Deployment) -> None:
    """Was: 2,000 updates from one device in 0.6 s were all decoded and answered."""
    aggregator = deployment.aggregator(policy=RoundPolicy(1, 1000, 600))
    fleet = deployment.fleet
    async with daemons(deployment, aggregator, []), \
            connection(deployment, STOLEN, topics.model_topic(fleet), topics.receipt_topic(fleet, STOLEN)) as stolen:
        model = await next_model(stolen, 0)
        delta = {name: np.zeros(shape, np.float32) for name, shape in ARCH.param_shapes().items()}
        started = time.monotonic()
        ids = []
        for _ in range(2000):
            update_id, payload = update(model, delta, 10)
            ids.append(update_id)
            await stolen.client.publish(topics.update_topic(fleet, STOLEN), payload, qos=1)
        await stolen.wait_for(topics.receipt_topic(fleet, STOLEN), receipt_for(ids[-1]), within=60)
        elapsed = time.monotonic() - started
        await wait_until(lambda: len(stolen.messages[topics.receipt_topic(fleet, STOLEN)]) >= 2000, within=60)
    receipts = [decode_message(p, max_bytes=1 << 16, expect=Receipt) for p in stolen.messages[topics.receipt_topic(fleet, STOLEN)]]
    limited = [r for r in receipts if r.reason == "rate_limited"]
    taken = [r for r in receipts if r.reason != "rate_limited"]
    limits = aggregator.config.limits
    assert len(taken) <= limits.burst + limits.per_second * elapsed + 1, (len(taken), elapsed)
    assert len(limited) >= 2000 - len(taken) and all(r.retry_after_s > 0 and not r.final for r in limited)
    assert {r.update_id for r in receipts} == set(ids)  # every one answered, by its id
    assert aggregator.counters["rate_limited"] == len(limited)


async def nothing_retained_on(deployment: Deployment, reader: str, topic: str) -> None:
    """Wait (bounded) until a new subscriber of ``topic`` gets nothing retained there. The
    aggregator's status is retained for sure: subscribed after ``topic``, it comes after whatever
    ``topic`` retains, so once it is in, ``topic`` had nothing."""
    async with asyncio.timeout(WAIT):
        while True:
            async with connection(deployment, reader) as probe:
                await probe.client.subscribe(topic, qos=1)
                await probe.client.subscribe(topics.aggregator_status_topic(deployment.fleet), qos=1)
                await probe.wait_for(topics.aggregator_status_topic(deployment.fleet))
                if not probe.messages.get(topic):
                    return
            await asyncio.sleep(0.1)  # the aggregator's deleting publish is still on its way


@pytest.mark.asyncio
async def test_a_device_cannot_park_a_huge_retained_status(deployment: Deployment) -> None:
    """Was: a device parked 20 MiB of junk as its retained status, delivered to every reader."""
    aggregator = deployment.aggregator(policy=RoundPolicy(1, 1, 60))
    fleet = deployment.fleet
    async with daemons(deployment, aggregator, []), connection(deployment, STOLEN) as stolen:
        await wait_until(lambda: aggregator.counters["bytes_out"] > 0)
        junk = DeviceStatus(device=STOLEN, state="online", detail="x").encode() + b"\0" * (20 * 1024 * 1024)
        await stolen.client.publish(topics.status_topic(fleet, STOLEN), junk, qos=1, retain=True)
        await wait_until(lambda: aggregator.counters["statuses_cleared"] >= 1)
        await nothing_retained_on(deployment, OPERATOR, topics.status_topic(fleet, STOLEN))


@pytest.mark.asyncio
async def test_a_device_cannot_park_a_retained_update(deployment: Deployment) -> None:
    """Not in the attack run, same kind: the ACL cannot forbid the retain flag on a device's own
    update topic, and a retained update comes back at every subscription. The aggregator answers
    it once and deletes it."""
    fleet = deployment.fleet
    async with connection(deployment, STOLEN, topics.receipt_topic(fleet, STOLEN)) as stolen:
        update_id = "parked-1"  # computed from v1, the version the aggregator will start with
        payload = UpdateMessage(device=STOLEN, update_id=update_id, base_version=1, num_examples=10, codec="fp32",
                                tensors={name: np.zeros(shape, np.float32) for name, shape in ARCH.param_shapes().items()}
                                ).encode()
        await stolen.client.publish(topics.update_topic(fleet, STOLEN), payload, qos=1, retain=True)
        aggregator = deployment.aggregator(policy=RoundPolicy(2, 2, 60))  # subscribes after the update was parked
        async with daemons(deployment, aggregator, []):
            receipt = await stolen.wait_for(topics.receipt_topic(fleet, STOLEN), receipt_for(update_id))
            assert decode_message(receipt, max_bytes=1 << 16, expect=Receipt).status == "accepted"
            await wait_until(lambda: aggregator.counters["retained_updates_cleared"] >= 1)
            await nothing_retained_on(deployment, ADMIN, topics.update_topic(fleet, STOLEN))
