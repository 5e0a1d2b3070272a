"""Aggregator ingest against the broker's own limit: the same stream of updates, published to a
real Mosquitto on loopback, consumed (a) by a bare aiomqtt subscriber that only counts bytes and
(b) by the aggregator (every check, the streaming mean, the durable journal, a receipt per update).

    .venv/bin/python bench/aggregator_ingest.py [--cases 1m:200,100k:2000] [--json out.json]

For each case MODEL:M, a publisher process publishes M fp32 updates (QoS 1, one device each,
pre-encoded before the clock starts) as fast as Mosquitto takes them, once per consumer:

- ``bare``: an aiomqtt subscriber that counts messages and bytes: the limit.
- ``daemon``: the real ``Aggregator.run()`` shell (fsync per update, waits for each receipt's
  PUBACK under its lock).
- ``pipelined``: the shell proposed in docs/proposals/pipelined-ingest.patch, driving the same
  ``Aggregator.ingest()``: it takes every update already received as one batch (at most 16 or
  32 MB), ingests the batch in a worker thread under one journal fsync
  (``UpdateJournal.group_commit``) while the event loop goes on reading the socket (numpy, zlib
  and the disk release the GIL), then sends the batch's receipts without waiting for each PUBACK
  (at most 64 unacknowledged; one that times out ends the session, as today).

updates/s counts from the publisher's start to the last update accepted (or received, for
``bare``); the ratio is against ``bare`` of the same case. The journal lives in ``--state-dir``
(default: a temporary directory under /var/tmp, on disk; tmpfs would make fsync free).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiomqtt

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as bench  # noqa: E402

from fedmq.aggregator.config import AggregatorConfig  # noqa: E402
from fedmq.aggregator.daemon import Aggregator  # noqa: E402
from fedmq.aggregator.rounds import RoundPolicy  # noqa: E402
from fedmq.broker import topics  # noqa: E402
from fedmq.broker.messages import Receipt  # noqa: E402
from fedmq.broker.settings import BrokerSettings  # noqa: E402

#: Each measurement uses its own fleet (topic tree) and client ids: the aggregator's persistent
#: session outlives its run, and must not collect (and later replay) the next run's updates.
FLEET_PREFIX = "bench"
CONSUMERS = ("bare", "daemon", "pipelined")
RECEIPT_TIMEOUT_S = 3.0
#: Most messages and bytes one batch takes. Its receipts then fit in paho's default window of 20
#: unacknowledged QoS 1 publishes, so they wait for one round trip; receipts beyond that window
#: queue in paho while their timeout runs, behind megabytes of updates the broker is sending us.
MAX_BATCH = 16
MAX_BATCH_BYTES = 32 * 1024 * 1024
#: Receipts sent but not yet acknowledged by the broker, at most (pipelined shell).
MAX_RECEIPTS_IN_FLIGHT = 64


# -- publisher process --------------------------------------------------------------------------

async def publish_all(host: str, port: int, fleet: str, model_name: str, count: int, inflight: int) -> None:
    arch = bench.model(model_name)
    deltas = [bench.delta_tensors(arch, seed) for seed in range(4)]
    payloads = [(topics.update_topic(fleet, bench.device_name(i)),
                 bench.update_payload(bench.device_name(i), f"u{i}", deltas[i % 4], num_examples=10 + i % 90))
                for i in range(count)]
    settings = BrokerSettings(host=host, port=port, protocol="5")
    async with settings.client(identifier=f"bench-pub-{os.getpid()}") as client:
        print("ready", flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
        start = time.time()
        cpu0 = bench.cpu_seconds()
        gate = asyncio.Semaphore(inflight)

        async def one(topic: str, payload: bytes) -> None:
            async with gate:
                await client.publish(topic, payload, qos=1, timeout=60)

        await asyncio.gather(*(one(t, p) for t, p in payloads))
        end = time.time()
    print(json.dumps({"start": start, "end": end, "cpu_s": bench.cpu_seconds() - cpu0,
                      "bytes": sum(len(p) for _, p in payloads)}), flush=True)


class Publisher:
    """The publisher subprocess: connected and holding its payloads before ``go()``."""

    def __init__(self, broker_port: int, fleet: str, model_name: str, count: int, inflight: int) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, __file__, "--publisher", "--port", str(broker_port), "--fleet", fleet,
             "--cases", f"{model_name}:{count}", "--inflight", str(inflight)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline().strip()
        if line != "ready":
            self.proc.kill()
            raise RuntimeError(f"publisher did not start: {line!r}")

    def go(self) -> float:
        assert self.proc.stdin is not None
        now = time.time()
        self.proc.stdin.write("go\n")
        self.proc.stdin.flush()
        return now

    def result(self, timeout: float) -> dict[str, Any]:
        out, _ = self.proc.communicate(timeout=timeout)
        return json.loads(out.strip().splitlines()[-1])


# -- consumers -------------------------------------------------------------------------------------

async def bare_subscriber(settings: BrokerSettings, fleet: str, count: int, ready: asyncio.Event) -> dict[str, Any]:
    received = nbytes = 0
    async with settings.client(identifier=f"{fleet}-bare") as client:
        await client.subscribe(topics.updates_filter(fleet), qos=1)
        ready.set()
        async for message in client.messages:
            received += 1
            nbytes += len(message.payload) if isinstance(message.payload, bytes | bytearray) else 0
            if received == count:
                break
    return {"received": received, "bytes": nbytes}


def make_aggregator(settings: BrokerSettings, fleet: str, model_name: str, count: int, state_dir: Path) -> Aggregator:
    config = AggregatorConfig(
        fleet=fleet, state_dir=state_dir, broker=settings, client_id=f"{fleet}-aggregator", arch=bench.model(model_name),
        policy=RoundPolicy(min_updates=count, target_updates=count, deadline_s=3600.0), max_rounds=1,
    )
    return Aggregator(config)


def count_ingests(agg: Aggregator, count: int) -> asyncio.Event:
    """An event set when ``agg.ingest`` has returned ``count`` times (wraps the instance's method,
    which the shell looks up on the instance), so that nothing polls the aggregator."""
    done = asyncio.Event()
    ingest = agg.ingest
    calls = 0

    def counted(device: str, payload: bytes) -> Receipt | None:
        nonlocal calls
        try:
            return ingest(device, payload)
        finally:
            calls += 1
            if calls == count:
                agg.ingested_at = time.time()  # type: ignore[attr-defined]
                done.set()

    agg.ingest = counted  # type: ignore[method-assign]
    return done


async def daemon_consumer(agg: Aggregator, count: int, ready: asyncio.Event) -> dict[str, Any]:
    """Today's shell, as it is: ``Aggregator.run()`` until its one round closes."""
    all_ingested = count_ingests(agg, count)
    stop = asyncio.Event()
    run = asyncio.create_task(agg.run(stop))

    async def watch_status() -> None:
        async with agg.config.broker.client(identifier=f"{agg.config.fleet}-watch") as client:
            await client.subscribe(topics.aggregator_status_topic(agg.config.fleet), qos=1)
            async for _ in client.messages:  # the first status comes after the aggregator subscribed
                return

    await asyncio.wait_for(watch_status(), timeout=60)
    ready.set()
    await asyncio.wait([run, asyncio.create_task(all_ingested.wait())], return_when=asyncio.FIRST_COMPLETED)
    await asyncio.wait_for(run, timeout=120)
    return {"ingested_at": getattr(agg, "ingested_at", time.time())}


# The proposed shell (the body of docs/proposals/pipelined-ingest.patch), written against the public pieces of
# Aggregator so that it can be measured before it is applied.

def ingest_batch(agg: Aggregator, batch: list[aiomqtt.Message]) -> tuple[list[Receipt], list[aiomqtt.Message]]:
    """Ingest ``batch`` under one journal group commit, stopping early once the round is ready.

    Returns the receipts to send (every update they accept is on disk when this returns) and the
    messages left for the next round.
    """
    receipts: list[Receipt] = []
    with agg.journal.group_commit():
        for index, message in enumerate(batch):
            try:
                parsed = topics.parse_topic(str(message.topic))
            except topics.TopicError:
                parsed = None
            if parsed is None or parsed.kind != "update" or parsed.fleet != agg.config.fleet or parsed.device is None:
                agg.counters["ignored"] += 1
                continue
            payload = message.payload if isinstance(message.payload, bytes | bytearray) else b""
            receipt = agg.ingest(parsed.device, payload)
            if receipt is not None:
                receipts.append(receipt)
            if agg.round.ready(time.time()):
                return receipts, batch[index + 1:]
    return receipts, []


async def ingest_in_thread(agg: Aggregator, batch: list[aiomqtt.Message]
                           ) -> tuple[list[Receipt], list[aiomqtt.Message]]:
    """``ingest_batch`` in a worker thread; a cancellation waits for the thread to finish first, so
    that no batch is still being ingested when the caller has let go of the lock."""
    work = asyncio.get_running_loop().run_in_executor(None, ingest_batch, agg, batch)
    try:
        return await asyncio.shield(work)
    except asyncio.CancelledError:
        while not work.done():
            await asyncio.wait([work])
        raise


async def consume_pipelined(agg: Aggregator, client: aiomqtt.Client, lock: asyncio.Lock, *,
                            close_round: Callable[[], Awaitable[None]], done: Callable[[], bool],
                            stats: Counter[str]) -> None:
    """Take what has arrived as one batch, ingest it in a worker thread (one fsync), send its
    receipts without waiting for their PUBACKs, repeat.

    The event loop goes on reading the socket (and the PUBACKs of earlier receipts) while the
    batch is checked, journaled and folded. At most ``MAX_RECEIPTS_IN_FLIGHT`` receipts wait for
    their PUBACK; one that times out (the broker is gone) ends the consumer, as the one-by-one wait
    does today.
    """
    messages = client.messages
    pending: list[aiomqtt.Message] = []
    in_flight: set[asyncio.Future[None]] = set()

    def check_receipts() -> None:
        for task in [t for t in in_flight if t.done()]:
            in_flight.discard(task)
            task.result()  # raises the MqttError of a receipt that timed out

    try:
        while not done():
            clock = time.perf_counter()
            if not pending:
                pending.append(await anext(messages))
            size = sum(len(m.payload) for m in pending if isinstance(m.payload, bytes | bytearray))
            while len(messages) and len(pending) < MAX_BATCH and size < MAX_BATCH_BYTES:  # already received
                pending.append(await anext(messages))
                size += len(pending[-1].payload) if isinstance(pending[-1].payload, bytes | bytearray) else 0
            stats["wait_s"] += time.perf_counter() - clock
            stats["batches"] += 1
            stats["batched_messages"] += len(pending)
            async with lock:
                clock = time.perf_counter()
                receipts, pending = await ingest_in_thread(agg, pending)
                stats["ingest_s"] += time.perf_counter() - clock
                clock = time.perf_counter()
                for r in receipts:
                    in_flight.add(asyncio.ensure_future(client.publish(
                        topics.receipt_topic(agg.config.fleet, r.device), r.encode(), qos=1,
                        timeout=RECEIPT_TIMEOUT_S)))
                check_receipts()
                while len(in_flight) > MAX_RECEIPTS_IN_FLIGHT:
                    await asyncio.wait(in_flight, return_when=asyncio.FIRST_COMPLETED)
                    check_receipts()
                stats["receipts_s"] += time.perf_counter() - clock
                if agg.round.ready(time.time()):
                    await close_round()
        if in_flight:
            await asyncio.gather(*in_flight)
    finally:
        for task in in_flight:
            task.cancel()


async def pipelined_consumer(agg: Aggregator, count: int, ready: asyncio.Event) -> dict[str, Any]:
    fleet = agg.config.fleet
    ingested_at = 0.0
    async with agg.config.broker.client(identifier=agg.config.client_id, persistent_session=True) as client:
        await client.subscribe(topics.updates_filter(fleet), qos=1)
        await client.publish(topics.model_topic(fleet), agg.model_payload, qos=1, retain=True)
        ready.set()

        async def close_round() -> None:
            nonlocal ingested_at
            ingested_at = time.time()
            agg.close_round()
            await client.publish(topics.model_topic(fleet), agg.model_payload, qos=1, retain=True)

        stats: Counter[str] = Counter()
        await consume_pipelined(agg, client, asyncio.Lock(), close_round=close_round,
                                done=lambda: agg.model.version > 1, stats=stats)
    agg.journal.close()
    agg.registry.close()
    return {"ingested_at": ingested_at, "breakdown": {
        "batches": stats["batches"], "mean_batch": stats["batched_messages"] / max(1, stats["batches"]),
        "ingest_s": stats["ingest_s"], "receipts_wait_s": stats["receipts_s"], "message_wait_s": stats["wait_s"]}}


# -- one measurement ---------------------------------------------------------------------------------

async def measure(consumer: str, broker: Any, fleet: str, model_name: str, count: int, inflight: int,
                  state_root: Path) -> dict[str, Any]:
    settings = BrokerSettings(host=broker.host, port=broker.port, protocol="5")
    publisher = await asyncio.to_thread(Publisher, broker.port, fleet, model_name, count, inflight)
    ready = asyncio.Event()
    agg = None
    if consumer == "bare":
        task: asyncio.Task[dict[str, Any]] = asyncio.create_task(bare_subscriber(settings, fleet, count, ready))
    else:
        state_dir = Path(tempfile.mkdtemp(prefix=f"{consumer}-", dir=state_root))
        agg = make_aggregator(settings, fleet, model_name, count, state_dir)
        if consumer == "daemon":
            task = asyncio.create_task(daemon_consumer(agg, count, ready))
        else:
            task = asyncio.create_task(pipelined_consumer(agg, count, ready))
    await asyncio.wait_for(ready.wait(), timeout=60)
    bench.reset_peak_rss()
    cpu0, broker_cpu0 = bench.cpu_seconds(), bench.cpu_seconds(broker.pid)
    started = publisher.go()
    try:
        out = await asyncio.wait_for(task, timeout=max(120, count * 0.5))
    finally:
        if not task.done():
            task.cancel()
    finished = time.time()
    cpu, broker_cpu = bench.cpu_seconds() - cpu0, bench.cpu_seconds(broker.pid) - broker_cpu0
    pub = await asyncio.to_thread(publisher.result, 60)
    end = out.get("ingested_at", finished)
    row: dict[str, Any] = {
        "consumer": consumer, "model": model_name, "updates": count, "seconds": end - started,
        "updates_per_s": count / (end - started), "mb_per_s": pub["bytes"] / (end - started) / 1e6,
        "consumer_cpu_s": cpu, "broker_cpu_s": broker_cpu, "publisher_cpu_s": pub["cpu_s"],
        "publisher_seconds": pub["end"] - pub["start"], "consumer_peak_rss_mb": bench.peak_rss_mb(),
    }
    if agg is None:
        row["received"] = out["received"]
        row["lost"] = count - out["received"]
    else:
        row["accepted"] = agg.counters["accepted"]
        row["rejected"] = agg.counters["rejected"]
        row["lost"] = count - agg.counters["accepted"]
        row["rounds_closed"] = agg.model.version - 1
        row["total_seconds_with_round_close"] = finished - started
        if "breakdown" in out:
            row["breakdown"] = out["breakdown"]
        shutil.rmtree(agg.config.state_dir, ignore_errors=True)
    return row


async def run_all(args: argparse.Namespace) -> list[dict[str, Any]]:
    bench.raise_nofile(4096)
    broker = bench.start_mosquitto()
    state_root = Path(tempfile.mkdtemp(prefix="fedmq-ingest-", dir=args.state_dir))
    rows = []
    try:
        for case in args.cases.split(","):
            model_name, count = case.split(":")
            arch = bench.model(model_name)
            bench.progress(f"case {model_name}:{count} ({arch.num_params():,} parameters, "
                           f"{arch.num_params() * 4 / 1e6:.1f} MB per update)")
            base = None
            for consumer in args.consumers.split(","):
                for attempt in range(args.repeat):
                    bench.progress(f"  {consumer} (run {attempt + 1}/{args.repeat}) ...")
                    fleet = f"{FLEET_PREFIX}{len(rows)}"
                    row = await measure(consumer, broker, fleet, model_name, int(count), args.inflight, state_root)
                    row["run"] = attempt + 1
                    if consumer == "bare":
                        base = row if base is None or row["updates_per_s"] > base["updates_per_s"] else base
                    rows.append(row)
            for row in rows:
                if row["model"] == model_name and base is not None:
                    row["vs_bare"] = row["updates_per_s"] / base["updates_per_s"]
    finally:
        broker.stop()
        broker.cleanup()
        shutil.rmtree(state_root, ignore_errors=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", default="1m:200,100k:2000", help="MODEL:UPDATES,... (default 1m:200,100k:2000)")
    parser.add_argument("--consumers", default=",".join(CONSUMERS),
                        help=f"comma-separated, bare first (default {','.join(CONSUMERS)})")
    parser.add_argument("--repeat", type=int, default=1, help="runs per consumer (the ratio uses the best bare run)")
    parser.add_argument("--inflight", type=int, default=16, help="publishes awaiting their PUBACK at once (default 16)")
    parser.add_argument("--state-dir", default="/var/tmp", help="where the journals go (default /var/tmp, on disk)")
    parser.add_argument("--json", metavar="FILE", help="write the figures as JSON")
    parser.add_argument("--publisher", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--fleet", help=argparse.SUPPRESS)
    args = parser.parse_args()
    bench.quiet_aiomqtt()
    if args.publisher:
        model_name, count = args.cases.split(":")
        asyncio.run(publish_all("127.0.0.1", args.port, args.fleet, model_name, int(count), args.inflight))
        return
    info = bench.machine()
    print(bench.describe_machine(info))
    rows = asyncio.run(run_all(args))
    print(f"{'case':12} {'consumer':15} {'updates/s':>9} {'MB/s':>7} {'vs bare':>7} {'lost':>4} "
          f"{'cpu s':>6} {'broker cpu s':>12} {'peak MB':>8}")
    for row in rows:
        print(f"{row['model'] + ':' + str(row['updates']):12} {row['consumer']:15} {row['updates_per_s']:9.1f} "
              f"{row['mb_per_s']:7.1f} {row.get('vs_bare', float('nan')):7.2f} {row['lost']:4d} "
              f"{row['consumer_cpu_s']:6.2f} {row['broker_cpu_s']:12.2f} {row['consumer_peak_rss_mb']:8.0f}")
    bench.write_json(args.json, {"benchmark": "aggregator_ingest", "machine": info, "results": rows})


if __name__ == "__main__":
    main()
