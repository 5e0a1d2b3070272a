"""Frozen ONNX backbone + federated head: the artifact travels once, agents embed their data with
it, only the head trains, and current.onnx composes both into one graph."""

from __future__ import annotations

import asyncio
import hashlib
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import shard_agents
from onnx import TensorProto, helper, numpy_helper

from fedmq.aggregator.config import AggregatorConfig
from fedmq.aggregator.daemon import Aggregator
from fedmq.aggregator.rounds import RoundPolicy
from fedmq.broker import topics
from fedmq.broker.architecture import MLPArchitecture
from fedmq.broker.messages import BackboneRef, ModelMessage, Task
from fedmq.broker.settings import BrokerSettings
from fedmq.demo import dirichlet_partition, load_digits_split
from fedmq.edge_agent.agent import Agent
from fedmq.edge_agent.config import AgentConfig
from fedmq.edge_agent.predict import predict
from fedmq.edge_agent.training import evaluate, logits

pytestmark = pytest.mark.broker
PROJECTION = np.random.default_rng(42).standard_normal((64, 16)).astype(np.float32) * 0.3


def backbone_bytes() -> bytes:
    """A fixed 64 -> 16 projection with ReLU: a stand-in for a user's feature extractor."""
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["pixels", "P"], ["h"]), helper.make_node("Relu", ["h"], ["features"])],
        "backbone",
        [helper.make_tensor_value_info("pixels", TensorProto.FLOAT, ["N", 64])],
        [helper.make_tensor_value_info("features", TensorProto.FLOAT, ["N", 16])],
        [numpy_helper.from_array(PROJECTION, "P")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model.SerializeToString()


def embed(x: np.ndarray) -> np.ndarray:
    return np.maximum(x @ PROJECTION, 0)


@pytest.mark.asyncio
async def test_backbone_head_training_end_to_end(mqtt_broker: BrokerSettings, fleet: str, tmp_path: Path) -> None:
    data = backbone_bytes()
    (tmp_path / "backbone.onnx").write_bytes(data)
    x_train, y_train, x_test, y_test = load_digits_split(seed=0, test_fraction=0.2)
    shards = dirichlet_partition(y_train, 3, alpha=1.0, seed=0)
    head = MLPArchitecture(16, (16,), 10)
    aggregator = Aggregator(AggregatorConfig(
        fleet=fleet, state_dir=tmp_path / "agg", broker=mqtt_broker, client_id=f"{fleet}-agg", arch=head,
        backbone=tmp_path / "backbone.onnx", task=Task(epochs=3, batch_size=16, lr=0.1), policy=RoundPolicy(3, 3),
        max_rounds=2,
    ))
    assert aggregator.model.backbone == BackboneRef(hashlib.sha256(data).hexdigest(), len(data))
    initial = {k: np.array(v) for k, v in aggregator.model.params.items()}
    agents = shard_agents(fleet, shards, x_train, y_train, tmp_path, mqtt_broker, backend="numpy")
    stop_agents = asyncio.Event()
    tasks = [asyncio.create_task(a.run(stop_agents)) for a in agents]
    try:
        async with asyncio.timeout(60):
            await aggregator.run()
            while any(a.model_version < 3 for a in agents):
                await asyncio.sleep(0.05)
    finally:
        stop_agents.set()
        await asyncio.wait(tasks, timeout=10)
    for agent in agents:
        assert agent.counters["accepted"] == 2
        assert agent.counters["artifacts_received"] == 1, "the artifact travels once per device"
        assert (agent.state_dir / "artifacts" / f"{aggregator.model.backbone.sha256}.onnx").read_bytes() == data
    final: ModelMessage = aggregator.model
    # only the head trained, on embedded features: it beats the untrained head on embedded test data
    acc0, _ = evaluate(initial, head, embed(x_test), y_test)
    acc2, _ = evaluate(final.params, head, embed(x_test), y_test)
    assert acc2 > acc0 + 0.3, (acc0, acc2)
    # current.onnx takes raw pixels: backbone and head in one graph
    composed = onnx.load(agents[0].state_dir / "current.onnx")
    onnx.checker.check_model(composed, full_check=True)
    assert composed.graph.input[0].type.tensor_type.shape.dim[1].dim_value == 64
    result = predict(agents[0].state_dir, x_test)
    assert result.version == 3
    np.testing.assert_array_equal(result.labels, logits(final.params, head, embed(x_test)).argmax(axis=1))


def test_agent_refuses_an_artifact_that_does_not_match(tmp_path: Path) -> None:
    data = backbone_bytes()
    ref = BackboneRef(hashlib.sha256(data).hexdigest(), len(data))
    head = MLPArchitecture(16, (), 10)
    agent = Agent(AgentConfig(device_id="d1", fleet="f1", state_dir=tmp_path, backend="numpy"))
    agent.install(ModelMessage("f1", 1, 0, head, Task(), head.init_params(0), 1.0, backbone=ref).encode())
    assert not (tmp_path / "current.onnx").exists(), "nothing to export before the backbone arrives"
    tampered = data[:-1] + bytes([data[-1] ^ 1])
    assert agent.store_artifact(ref.sha256, tampered) is False
    assert "does not match" in agent.detail and agent.artifact(ref) is None
    assert agent.store_artifact("0" * 64, data) is False, "an artifact the model does not name is ignored"
    assert agent.store_artifact(ref.sha256, data) is True
    assert agent.artifact(ref) == data
    assert (tmp_path / "current.onnx").exists()
    assert topics.parse_topic(topics.artifact_topic("f1", ref.sha256)).kind == "artifact"
