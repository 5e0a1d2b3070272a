"""A hostile or broken Wasm kernel costs one training run, never the agent: it keeps running,
stays online and says what went wrong on its status topic. Real Mosquitto, real wasmtime."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest
import wasmtime

from fedmq.aggregator.config import AggregatorConfig
from fedmq.aggregator.daemon import Aggregator
from fedmq.aggregator.rounds import RoundPolicy
from fedmq.broker import topics
from fedmq.broker.architecture import MLPArchitecture
from fedmq.broker.messages import DeviceStatus, Task, decode_message
from fedmq.broker.settings import BrokerSettings
from fedmq.edge_agent.agent import Agent
from fedmq.edge_agent.config import AgentConfig

pytestmark = pytest.mark.broker
ARCH = MLPArchitecture(5, (4,), 3)


def kernel(train_body: str, extra: str = "") -> bytes:
    return wasmtime.wat2wasm(f"""(module {extra}
      (memory (export "memory") 2)
      (func (export "train_epoch") (param $args i32) (result i32) {train_body})
      (func (export "logits") (param $args i32) (result i32) (i32.const 0)))""")


BAD_KERNELS = {
    "loops forever": (kernel("(loop $forever (br $forever)) (i32.const 0)"), "fuel"),
    "grows memory past the cap": (kernel("""
        (if (i32.eq (memory.grow (i32.const 60000)) (i32.const -1))
          (then (i32.store (i32.const 0x7ffffff0) (i32.const 1))))
        (i32.const 0)"""), "memory"),
    "imports a host function": (kernel("(i32.const 0)", '(import "env" "send_home" (func (param i32)))'), "imports"),
}


@pytest.mark.asyncio
@pytest.mark.parametrize("case", sorted(BAD_KERNELS))
async def test_agent_survives_a_bad_wasm_kernel(case: str, mqtt_broker: BrokerSettings, fleet: str, tmp_path: Path) -> None:
    module, expected = BAD_KERNELS[case]
    (tmp_path / "bad.wasm").write_bytes(module)
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "data.npz", x=rng.standard_normal((40, 5)).astype(np.float32), y=rng.integers(0, 3, 40))
    aggregator = Aggregator(AggregatorConfig(fleet=fleet, state_dir=tmp_path / "agg", broker=mqtt_broker,
                                             client_id=f"{fleet}-agg", arch=ARCH, task=Task(epochs=1, batch_size=8),
                                             policy=RoundPolicy(1, 1)))
    device = f"{fleet}-pi"
    agent = Agent(AgentConfig(device_id=device, fleet=fleet, state_dir=tmp_path / "agent", data=tmp_path / "data.npz",
                              broker=mqtt_broker, backend="wasm", wasm_module=tmp_path / "bad.wasm"))
    stop = asyncio.Event()
    tasks = [asyncio.create_task(aggregator.run(stop)), asyncio.create_task(agent.run(stop))]
    try:
        async with mqtt_broker.client(identifier=f"{fleet}-watch") as watcher:
            await watcher.subscribe(topics.status_topic(fleet, device), qos=1)
            async with asyncio.timeout(30):
                async for message in watcher.messages:
                    status = decode_message(bytes(message.payload), max_bytes=1 << 16, expect=DeviceStatus)  # type: ignore[arg-type]
                    # the model is installed (and served) even though training cannot run
                    if status.state == "online" and expected in status.detail and status.model_version == 1:
                        break
        assert status.backend == "wasm"
        await asyncio.sleep(0.2)
        assert not any(t.done() for t in tasks), "agent and aggregator are still running"
        assert aggregator.counters["accepted"] == 0, "nothing was sent from a failed training"
    finally:
        stop.set()
        await asyncio.wait(tasks, timeout=10)
    assert all(t.exception() is None for t in tasks)
