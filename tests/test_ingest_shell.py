"""The aggregator's ingest shell on a real Mosquitto: updates that arrive together are ingested as
one batch (one journal fsync, receipts not awaited one by one), yet every update gets exactly one
receipt, a round closes at exactly ``target_updates``, and the receipts of the round-closing batch
reach the devices before the next model does."""

from __future__ import annotations

import asyncio
import logging
import re
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import aggregator_online, unbounded

from fedmq.aggregator.config import AggregatorConfig
from fedmq.aggregator.daemon import Aggregator
from fedmq.aggregator.journal import UpdateJournal
from fedmq.aggregator.registry import ModelRegistry
from fedmq.aggregator.rounds import RoundPolicy
from fedmq.broker import topics
from fedmq.broker.architecture import MLPArchitecture
from fedmq.broker.messages import AggregatorStatus, ModelMessage, Receipt, UpdateMessage, decode_message
from fedmq.broker.settings import BrokerSettings

pytestmark = pytest.mark.broker
ARCH = MLPArchitecture(32, (64,), 10)
TARGET, BURST = 30, 40


def payload(device: str, index: int) -> bytes:
    rng = np.random.default_rng(index)
    tensors = {name: (rng.standard_normal(shape) * 0.01).astype(np.float32) for name, shape in ARCH.param_shapes().items()}
    return UpdateMessage(device, f"u{index}", 1, 10 + index, "fp32", tensors).encode()


@pytest.mark.asyncio
async def test_a_burst_is_batched_without_losing_or_reordering_receipts(mqtt_broker: BrokerSettings, fleet: str,
                                                                        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="fedmq.aggregator.daemon")
    config = AggregatorConfig(fleet=fleet, state_dir=tmp_path / "agg", broker=mqtt_broker, client_id=f"{fleet}-agg",
                              arch=ARCH, seed=3, policy=RoundPolicy(min_updates=TARGET, target_updates=TARGET), **unbounded())
    aggregator = Aggregator(config)
    stop = asyncio.Event()
    run = asyncio.create_task(aggregator.run(stop))
    seen: list[tuple[str, object]] = []  # receipts and models, in the order one device-side client saw them
    try:
        async with mqtt_broker.client(identifier=f"{fleet}-probe") as client:
            await client.subscribe(f"{topics.fleet_prefix(fleet)}/receipt/+", qos=1)
            await client.subscribe(topics.model_topic(fleet), qos=1)
            await client.subscribe(topics.aggregator_status_topic(fleet), qos=1)
            async with asyncio.timeout(30):
                async for message in client.messages:  # wait until the aggregator has subscribed
                    if str(message.topic) == topics.aggregator_status_topic(fleet):
                        status = decode_message(bytes(message.payload), max_bytes=1 << 16, expect=AggregatorStatus)
                        if status.state == "online":
                            break
            bodies = [(f"dev{i:02d}", payload(f"dev{i:02d}", i)) for i in range(BURST)]
            started = time.monotonic()
            # all at once: the aggregator finds many already received when it takes the next batch
            await asyncio.gather(*(client.publish(topics.update_topic(fleet, device), body, qos=1)
                                   for device, body in bodies))
            async with asyncio.timeout(30):
                async for message in client.messages:
                    topic = str(message.topic)
                    if topic == topics.model_topic(fleet):
                        model = decode_message(bytes(message.payload), max_bytes=1 << 24, expect=ModelMessage)
                        seen.append(("model", model.version))
                    elif topic.startswith(f"{topics.fleet_prefix(fleet)}/receipt/"):
                        seen.append(("receipt", decode_message(bytes(message.payload), max_bytes=1 << 16, expect=Receipt)))
                    if sum(kind == "receipt" for kind, _ in seen) == BURST and ("model", 2) in seen:
                        break
            elapsed = time.monotonic() - started
    finally:
        stop.set()
        await asyncio.wait_for(run, timeout=30)

    receipts = [r for kind, r in seen if kind == "receipt"]
    assert sorted(r.device for r in receipts) == [d for d, _ in bodies], "every update gets exactly one receipt"
    accepted = [r for r in receipts if r.status == "accepted"]
    rejected = [r for r in receipts if r.status == "rejected"]
    assert len(accepted) == TARGET, f"the round closes at exactly target_updates ({elapsed:.1f} s)"
    assert {r.reason for r in rejected} == {"stale"} and len(rejected) == BURST - TARGET  # v1 was closed for them
    position = seen.index(("model", 2))
    assert all(seen.index(("receipt", r)) < position for r in accepted), \
        "an accepted receipt arrived after the next model: the device would drop an update that counted"

    batches = [int(m.group(1)) for m in (re.match(r"ingested a batch of (\d+) update", r.getMessage()) for r in caplog.records) if m]
    assert sum(batches) == BURST and max(batches) > 1, f"batches of {batches}"

    registry = ModelRegistry(tmp_path / "agg")
    assert registry.get(2).info["updates"] == TARGET
    registry.close()
    records = UpdateJournal(tmp_path / "agg" / "journal").open_round(1)  # closed round: kept for de-duplication
    assert sorted(device for device, _ in records) == sorted(r.device for r in accepted)
    # the model is the example-weighted mean of exactly the accepted deltas
    by_device = dict(bodies)
    weights = {r.device: decode_message(by_device[r.device], max_bytes=1 << 24, expect=UpdateMessage).num_examples
               for r in accepted}
    start = ARCH.init_params(3)
    for name in start:
        mean = sum(weights[r.device] * decode_message(by_device[r.device], max_bytes=1 << 24, expect=UpdateMessage)
                   .tensors[name].astype(np.float64) for r in accepted) / sum(weights.values())
        np.testing.assert_allclose(aggregator.model.params[name], start[name] + mean, rtol=0, atol=1e-6)


@pytest.mark.asyncio
async def test_receipts_that_get_no_puback_end_the_session_with_one_warning(require_mosquitto: str, fleet: str,
                                                                          tmp_path: Path,
                                                                          caplog: pytest.LogCaptureFixture) -> None:
    """The broker stops answering just as the receipts go out (SIGSTOP): they time out, the session
    ends and reconnects, and the aggregator says so once, instead of asyncio logging every
    unanswered receipt as "Task exception was never retrieved" (seen in the soak logs)."""
    import gc
    import os
    import signal

    import paho.mqtt.client as paho

    from fedmq.broker.local import MosquittoProcess

    caplog.set_level(logging.WARNING)
    with MosquittoProcess(workdir=tmp_path / "broker") as broker:
        settings = BrokerSettings(host=broker.host, port=broker.port, protocol="5")
        config = AggregatorConfig(fleet=fleet, state_dir=tmp_path / "agg", broker=settings, client_id=f"{fleet}-agg",
                                  arch=ARCH, seed=3, policy=RoundPolicy(min_updates=10, target_updates=10), **unbounded())
        aggregator = Aggregator(config)
        publish = paho.Client.publish  # receipts go through paho directly (aggregator/receipts.py)
        frozen = asyncio.Event()

        def freeze_at_first_receipt(client: paho.Client, topic: str, *args: object, **kwargs: object) -> paho.MQTTMessageInfo:
            if "/receipt/" in str(topic) and not frozen.is_set():
                os.kill(broker.pid, signal.SIGSTOP)
                frozen.set()
            return publish(client, topic, *args, **kwargs)

        stop = asyncio.Event()
        run = asyncio.create_task(aggregator.run(stop))
        try:
            await aggregator_online(settings, fleet)
            async with settings.client(identifier=f"{fleet}-dev") as device:
                paho.Client.publish = freeze_at_first_receipt  # type: ignore[method-assign]
                await asyncio.gather(*(device.publish(topics.update_topic(fleet, f"dev{i}"), payload(f"dev{i}", i), qos=1)
                                       for i in range(3)))
                await asyncio.wait_for(frozen.wait(), timeout=30)
            await asyncio.sleep(4.5)  # RECEIPT_TIMEOUT_S (3 s) passes without a PUBACK
        finally:
            paho.Client.publish = publish  # type: ignore[method-assign]
            if broker.pid is not None:
                os.kill(broker.pid, signal.SIGCONT)
            stop.set()
            await asyncio.wait_for(run, timeout=30)
        gc.collect()
    warnings = [r.getMessage() for r in caplog.records if "got no PUBACK" in r.getMessage()]
    assert warnings and re.match(r"\d+ receipt\(s\) got no PUBACK", warnings[0])
    assert not [r for r in caplog.records if "never retrieved" in r.getMessage()]
    assert aggregator.counters["accepted"] >= 1, "the updates were journaled before the receipts went out"
