"""Aggregator ingest against the broker's own limit: the same stream of updates, published to a
real Mosquitto on loopback, consumed (a) by a bare aiomqtt subscriber that only counts bytes and
(b) by the aggregator (every check, the streaming mean, the durable journal, a receipt per update).

    .venv/bin/python bench/aggregator_ingest.py [--cases 1m:200,100k:2000] [--json out.json]

For each case MODEL:M, a publisher process publishes M fp32 updates (QoS 1, one device each,
pre-encoded before the clock starts) as fast as Mosquitto takes them, once per consumer:

- ``bare``: an aiomqtt subscriber that counts messages and bytes: the limit.
- ``receipts``: ``bare`` plus what the protocol's acknowledgement alone costs: a receipt for
  every update, published at QoS 1 the way the daemon sends them (``ReceiptSender``, at most 64
  unacknowledged). No decoding, no checks, no journal, no fold. Any aggregator that answers every
  update on this MQTT client stack pays at least this; the daemon's distance from it is what the
  aggregation itself costs.
- ``daemon``: the real ``Aggregator.run()``: it takes every update already received as one batch
  (at most 16 or 32 MB), ingests the batch in a worker thread (checks, one-pass fold, journal
  with one fsync per batch) while the event loop goes on reading the socket, then sends the
  batch's receipts without waiting for each PUBACK (at most 64 unacknowledged).

Two modes (``--modes``, both by default):

- ``live``: the publisher publishes while the consumer consumes, as a fleet does in a round.
  Publisher, Mosquitto and consumer share this machine's cores, so here every CPU second the
  consumer spends is taken from the publisher and the broker.
- ``backlog``: the consumer's persistent session is made first, the publisher then publishes the
  whole stream into it while the consumer is away (Mosquitto queues it), and the clock runs while
  the consumer, back online, drains the queue: the consumer and Mosquitto alone, as for an
  aggregator that restarts into a queued burst, or whose devices publish from other machines.

updates/s counts from the publisher's start (``live``) or the first message taken (``backlog``)
to the last update accepted (or received, for ``bare`` and ``receipts``); the ratio is against ``bare`` of the same
case and mode. Each case also times the journal alone (``journal alone``: the same records in group
commits of 16, on the same disk, no MQTT): the most updates/s any durable aggregator can accept
on that disk. "cpu s" is the consumer's CPU time in
that window, "of it sys" the kernel's share (page faults, socket and journal writes), "pub cpu s"
the publisher's (``live`` only). "all ms/up" is the CPU of every process in the window per update
(consumer, Mosquitto and, in ``live``, the publisher), and "cpu-bound" the best ``bare`` run's
"all ms/up" over this row's: the ratio to expect when the cores, not the network or the disk,
are what bounds the rate (in ``live`` mode the three processes share this machine's cores). The journal lives in ``--state-dir``
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
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as bench  # noqa: E402
import aiomqtt  # noqa: E402

from fedmq.aggregator.config import AggregatorConfig  # noqa: E402
from fedmq.aggregator.daemon import Aggregator  # noqa: E402
from fedmq.aggregator.rounds import RoundPolicy  # noqa: E402
from fedmq.broker import topics  # noqa: E402
from fedmq.broker.messages import Receipt  # noqa: E402
from fedmq.broker.settings import BrokerSettings  # noqa: E402

#: Each measurement uses its own fleet (topic tree) and client ids: the aggregator's persistent
#: session outlives its run, and must not collect (and later replay) the next run's updates.
FLEET_PREFIX = "bench"
CONSUMERS = ("bare", "receipts", "daemon")
SUBSCRIBERS = ("bare", "receipts")  # aiomqtt subscribers without an aggregator


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

async def bare_subscriber(settings: BrokerSettings, fleet: str, count: int, ready: asyncio.Event, *,
                          receipts: bool = False, persistent_session: bool = False) -> dict[str, Any]:
    async with settings.client(identifier=f"{fleet}-{'receipts' if receipts else 'bare'}",
                               persistent_session=persistent_session) as client:
        if not persistent_session:
            await client.subscribe(topics.updates_filter(fleet), qos=1)
        ready.set()
        return await drain(client, fleet, count, receipts)


async def drain(client: aiomqtt.Client, fleet: str, count: int, receipts: bool) -> dict[str, Any]:
    """Count ``count`` messages and their bytes; with ``receipts``, answer each as the daemon does."""
    from fedmq.aggregator.daemon import MAX_RECEIPTS_IN_FLIGHT, RECEIPT_TIMEOUT_S
    from fedmq.aggregator.receipts import ReceiptSender

    received = nbytes = 0
    sender = ReceiptSender(client, limit=MAX_RECEIPTS_IN_FLIGHT, timeout=RECEIPT_TIMEOUT_S) if receipts else None
    last = time.time()
    try:
        async for message in client.messages:
            received += 1
            nbytes += len(message.payload) if isinstance(message.payload, bytes | bytearray) else 0
            if sender is not None:
                device = topics.parse_topic(str(message.topic)).device
                # the update id is not parsed (no decoding here): one of the daemon's usual length
                sender.send(topics.receipt_topic(fleet, device),
                            Receipt(device, f"u{received:07d}", "accepted", 1).encode())
                await sender.room()
            if received == count:
                last = time.time()  # as the daemon's clock: the last update taken, its receipt may still be on its way
                break
        if sender is not None:
            await sender.settle(RECEIPT_TIMEOUT_S)
    finally:
        if sender is not None:
            sender.close()
    return {"received": received, "bytes": nbytes, "ingested_at": last}


def make_aggregator(settings: BrokerSettings, fleet: str, model_name: str, count: int, state_dir: Path) -> Aggregator:
    config = AggregatorConfig(
        fleet=fleet, state_dir=state_dir, broker=settings, client_id=f"{fleet}-aggregator", arch=bench.model(model_name),
        policy=RoundPolicy(min_updates=count, target_updates=count, deadline_s=3600.0), max_rounds=1,
    )
    return Aggregator(config)


def count_ingests(agg: Aggregator, count: int) -> asyncio.Event:
    """An event set when ``agg.ingest`` has returned ``count`` times (wraps the instance's method,
    which the shell looks up on the instance), so that nothing polls the aggregator. The shell
    calls ``ingest`` from a worker thread, so the event is set through the loop."""
    done = asyncio.Event()
    loop = asyncio.get_running_loop()
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
                loop.call_soon_threadsafe(done.set)

    agg.ingest = counted  # type: ignore[method-assign]
    return done


async def daemon_consumer(agg: Aggregator, count: int, ready: asyncio.Event) -> dict[str, Any]:
    """The daemon as it runs: ``Aggregator.run()`` until its one round closes."""
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


class FirstArrival:
    """The time and this process's CPU use when the MQTT client library hands over the first
    message after :meth:`arm`: the clock of a backlog drain, the same for both consumers (paho
    starts reading the queued stream as soon as it connects, before the aggregator takes any)."""

    def __init__(self) -> None:
        self.seen: dict[str, Any] = {}
        self.armed = False
        on_message = aiomqtt.Client._on_message

        def first_arrival(client: aiomqtt.Client, *args: Any) -> None:
            if self.armed and not self.seen:
                self.seen.update(at=time.time(), split=bench.cpu_split())
            on_message(client, *args)

        aiomqtt.Client._on_message = first_arrival  # type: ignore[method-assign]

    def arm(self) -> dict[str, Any]:
        self.seen = {}
        self.armed = True
        return self.seen


FIRST = FirstArrival()


async def measure_backlog(consumer: str, broker: Any, fleet: str, model_name: str, count: int, inflight: int,
                          state_root: Path) -> dict[str, Any]:
    """Queue the whole stream in the consumer's persistent session, then time the consumer draining it."""
    settings = BrokerSettings(host=broker.host, port=broker.port, protocol="5")
    client_id = f"{fleet}-{consumer}"
    state_dir = Path(tempfile.mkdtemp(prefix=f"{consumer}-", dir=state_root))
    if consumer in SUBSCRIBERS:
        async with settings.client(identifier=client_id, persistent_session=True) as client:
            await client.subscribe(topics.updates_filter(fleet), qos=1)
    else:  # the aggregator's own session: run it until it has subscribed, then stop it
        first_run = make_aggregator(settings, fleet, model_name, count, state_dir)
        await asyncio.wait_for(daemon_until_subscribed(first_run), timeout=60)
    publisher = await asyncio.to_thread(Publisher, broker.port, fleet, model_name, count, inflight)
    publisher.go()
    pub = await asyncio.to_thread(publisher.result, max(120, count * 0.5))  # all queued in Mosquitto
    broker_cpu0 = bench.cpu_seconds(broker.pid)
    bench.reset_peak_rss()
    agg = None
    first = FIRST.arm()
    out: dict[str, Any] = {}
    if consumer in SUBSCRIBERS:
        out = await bare_subscriber(settings, fleet, count, asyncio.Event(), receipts=consumer == "receipts",
                                    persistent_session=True)
        end = out["ingested_at"]
    else:
        agg = make_aggregator(settings, fleet, model_name, count, state_dir)
        done = count_ingests(agg, count)
        stop = asyncio.Event()
        run = asyncio.create_task(agg.run(stop))
        await asyncio.wait([run, asyncio.create_task(done.wait())], return_when=asyncio.FIRST_COMPLETED,
                           timeout=max(120, count * 0.5))
        end = getattr(agg, "ingested_at", time.time())
        await asyncio.wait_for(run, timeout=120)
    split = bench.cpu_split_since(first["split"])
    row = consumer_row(consumer, "backlog", model_name, count, end - first["at"], pub, split,
                       bench.cpu_seconds(broker.pid) - broker_cpu0, agg, out.get("received", 0))
    if agg is None:
        row["bytes"] = out["bytes"]
    shutil.rmtree(state_dir, ignore_errors=True)
    return row


async def daemon_until_subscribed(agg: Aggregator) -> None:
    """Run the aggregator until its first status (it has subscribed), then stop it gracefully."""
    stop = asyncio.Event()
    run = asyncio.create_task(agg.run(stop))
    async with agg.config.broker.client(identifier=f"{agg.config.fleet}-watch0") as client:
        await client.subscribe(topics.aggregator_status_topic(agg.config.fleet), qos=1)
        async for _ in client.messages:
            break
    stop.set()
    await run


async def measure(consumer: str, broker: Any, fleet: str, model_name: str, count: int, inflight: int,
                  state_root: Path) -> dict[str, Any]:
    settings = BrokerSettings(host=broker.host, port=broker.port, protocol="5")
    publisher = await asyncio.to_thread(Publisher, broker.port, fleet, model_name, count, inflight)
    ready = asyncio.Event()
    agg = None
    if consumer in SUBSCRIBERS:
        task: asyncio.Task[dict[str, Any]] = asyncio.create_task(
            bare_subscriber(settings, fleet, count, ready, receipts=consumer == "receipts"))
    else:
        state_dir = Path(tempfile.mkdtemp(prefix=f"{consumer}-", dir=state_root))
        agg = make_aggregator(settings, fleet, model_name, count, state_dir)
        task = asyncio.create_task(daemon_consumer(agg, count, ready))
    await asyncio.wait_for(ready.wait(), timeout=60)
    bench.reset_peak_rss()
    broker_cpu0, split0 = bench.cpu_seconds(broker.pid), bench.cpu_split()
    started = publisher.go()
    try:
        out = await asyncio.wait_for(task, timeout=max(120, count * 0.5))
    finally:
        if not task.done():
            task.cancel()
    finished = time.time()
    broker_cpu = bench.cpu_seconds(broker.pid) - broker_cpu0
    split = bench.cpu_split_since(split0)
    pub = await asyncio.to_thread(publisher.result, 60)
    row = consumer_row(consumer, "live", model_name, count, out.get("ingested_at", finished) - started, pub, split,
                       broker_cpu, agg, out.get("received", 0))
    if agg is not None:
        row["total_seconds_with_round_close"] = finished - started
        shutil.rmtree(agg.config.state_dir, ignore_errors=True)
    return row


def consumer_row(consumer: str, mode: str, model_name: str, count: int, seconds: float, pub: dict[str, Any],
                 split: list[float], broker_cpu: float, agg: Aggregator | None, received: int) -> dict[str, Any]:
    """One measurement's figures; ``split`` is the consumer's (user s, sys s, minor faults) over it."""
    row: dict[str, Any] = {
        "consumer": consumer, "mode": mode, "model": model_name, "updates": count, "seconds": seconds,
        "updates_per_s": count / seconds, "mb_per_s": pub["bytes"] / seconds / 1e6,
        "consumer_cpu_s": split[0] + split[1], "consumer_user_s": split[0], "consumer_sys_s": split[1],
        "consumer_minor_faults": split[2], "broker_cpu_s": broker_cpu, "publisher_cpu_s": pub["cpu_s"],
        "publisher_seconds": pub["end"] - pub["start"], "consumer_peak_rss_mb": bench.peak_rss_mb(),
    }
    if agg is None:
        row["received"] = received
        row["lost"] = count - received
    else:
        row["accepted"] = agg.counters["accepted"]
        row["rejected"] = agg.counters["rejected"]
        row["lost"] = count - agg.counters["accepted"]
        row["rounds_closed"] = agg.model.version - 1
    return row


def journal_only(model_name: str, count: int, state_root: Path) -> dict[str, Any]:
    """The journal's work alone, as the daemon does it: ``count`` records in group commits of
    MAX_BATCH with one fsync each, on the same disk. An aggregator that writes every byte before
    its receipt cannot drain a backlog faster than this."""
    from fedmq.aggregator.daemon import MAX_BATCH
    from fedmq.aggregator.journal import UpdateJournal

    arch = bench.model(model_name)
    payloads = [bench.update_payload(bench.device_name(i), f"j{i}", bench.delta_tensors(arch, i)) for i in range(4)]
    directory = Path(tempfile.mkdtemp(prefix="journal-", dir=state_root))
    journal = UpdateJournal(directory)
    journal.open_round(1)
    bench.reset_peak_rss()
    split0, started = bench.cpu_split(), time.perf_counter()
    for first in range(0, count, MAX_BATCH):
        with journal.group_commit():
            for i in range(first, min(first + MAX_BATCH, count)):
                journal.append(bench.device_name(i), payloads[i % 4])
    seconds = time.perf_counter() - started
    split = bench.cpu_split_since(split0)
    direct = journal.direct
    journal.close()
    shutil.rmtree(directory, ignore_errors=True)
    nbytes = sum(len(payloads[i % 4]) for i in range(count))
    return {"consumer": "journal", "mode": "alone", "model": model_name, "updates": count, "seconds": seconds,
            "updates_per_s": count / seconds, "mb_per_s": nbytes / seconds / 1e6, "consumer_cpu_s": split[0] + split[1],
            "consumer_user_s": split[0], "consumer_sys_s": split[1], "consumer_minor_faults": split[2],
            "broker_cpu_s": 0.0, "consumer_peak_rss_mb": bench.peak_rss_mb(), "lost": 0, "o_direct": direct}


def all_cpu_ms(row: dict[str, Any]) -> float:
    """CPU per update of every process in the measured window, in ms: the consumer and Mosquitto,
    and in ``live`` mode the publisher too (in ``backlog`` it published before the clock)."""
    total = row["consumer_cpu_s"] + row["broker_cpu_s"] + (row["publisher_cpu_s"] if row["mode"] == "live" else 0.0)
    return total / row["updates"] * 1e3


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
            bench.progress("  the journal alone (group commits of 16, on the same disk) ...")
            rows.append(journal_only(model_name, int(count), state_root))
            for mode in args.modes.split(","):
                measure_one = {"live": measure, "backlog": measure_backlog}[mode]
                base = None
                for consumer in args.consumers.split(","):
                    for attempt in range(args.repeat):
                        bench.progress(f"  {mode}: {consumer} (run {attempt + 1}/{args.repeat}) ...")
                        fleet = f"{FLEET_PREFIX}{len(rows)}"
                        row = await measure_one(consumer, broker, fleet, model_name, int(count), args.inflight, state_root)
                        row["run"] = attempt + 1
                        if consumer == "bare":
                            base = row if base is None or row["updates_per_s"] > base["updates_per_s"] else base
                        rows.append(row)
                for row in rows:
                    if row["model"] == model_name and row["mode"] == mode and base is not None:
                        row["vs_bare"] = row["updates_per_s"] / base["updates_per_s"]
                        # (a tiny case can take less than the clock's tick of CPU: no prediction)
                        own = all_cpu_ms(row)
                        row["cpu_bound_vs_bare"] = all_cpu_ms(base) / own if own > 0 else float("nan")
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
    parser.add_argument("--modes", default="live,backlog",
                        help="live (publish while consuming), backlog (drain a queued stream); default both")
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
    print(f"{'case':12} {'mode':8} {'consumer':9} {'updates/s':>9} {'MB/s':>7} {'vs bare':>7} {'lost':>4} "
          f"{'cpu s':>6} {'of it sys':>9} {'broker cpu s':>12} {'pub cpu s':>9} {'all ms/up':>9} {'cpu-bound':>9} "
          f"{'peak MB':>8}")
    for row in rows:
        publisher = row.get("publisher_cpu_s", float("nan")) if row["mode"] == "live" else float("nan")
        print(f"{row['model'] + ':' + str(row['updates']):12} {row['mode']:8} {row['consumer']:9} {row['updates_per_s']:9.1f} "
              f"{row['mb_per_s']:7.1f} {row.get('vs_bare', float('nan')):7.2f} {row['lost']:4d} "
              f"{row['consumer_cpu_s']:6.2f} {row['consumer_sys_s']:9.2f} {row['broker_cpu_s']:12.2f} "
              f"{publisher:9.2f} {all_cpu_ms(row):9.3f} {row.get('cpu_bound_vs_bare', float('nan')):9.2f} "
              f"{row['consumer_peak_rss_mb']:8.0f}")
    bench.write_json(args.json, {"benchmark": "aggregator_ingest", "machine": info, "results": rows})


if __name__ == "__main__":
    main()
