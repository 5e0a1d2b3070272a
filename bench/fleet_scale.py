"""A fleet of K simulated agents against the real aggregator, several rounds, on Mosquitto on loopback.

    .venv/bin/python bench/fleet_scale.py [--agents 100,1000] [--rounds 3] [--model 100k] [--json out.json]

The aggregator (``Aggregator.run()``, journal on) runs in its own process with one round per
model version: it closes when all K updates are in. The K agents are asyncio clients, one MQTT
connection each, spread over ``--processes`` processes. An agent installs each new model version
(it decodes the whole model message, as a real agent does), publishes an fp32 update computed from
it (no training: the figures are about the plumbing) and waits for its receipt, re-sending after
``--receipt-timeout`` seconds as the agent's outbox does.

Figures: the wall time of each round (the first includes the agents' connecting and is shown
apart), updates lost (published but never accepted: must be 0), re-sends, and the aggregator's
CPU seconds and peak RSS.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as bench  # noqa: E402

from fedmq.broker import topics  # noqa: E402
from fedmq.broker.errors import RejectedMessage  # noqa: E402
from fedmq.broker.messages import ModelMessage, Receipt, decode_message  # noqa: E402
from fedmq.broker.settings import BrokerSettings  # noqa: E402


def fleet_name(agents: int) -> str:
    """Each fleet size gets its own topic tree: the broker keeps the previous case's retained model
    (a higher version), which the next case's agents would install and then refuse to go back from."""
    return f"fleet{agents}"
MAX_BYTES = 64 * 1024 * 1024


# -- aggregator process ------------------------------------------------------------------------------

def run_aggregator(port: int, model_name: str, agents: int, rounds: int, state_dir: Path) -> None:
    from fedmq.aggregator.config import AggregatorConfig
    from fedmq.aggregator.daemon import Aggregator
    from fedmq.aggregator.rounds import RoundPolicy

    bench.raise_nofile(4096)
    config = AggregatorConfig(
        fleet=fleet_name(agents), state_dir=state_dir, broker=BrokerSettings(host="127.0.0.1", port=port, protocol="5"),
        client_id="bench-fleet-aggregator", arch=bench.model(model_name), max_rounds=rounds,
        policy=RoundPolicy(min_updates=agents, target_updates=agents, deadline_s=3600.0),
    )
    agg = Aggregator(config)
    closes: list[float] = []
    close_round = agg.close_round

    def timed_close_round() -> Any:  # the shell looks the method up on the instance
        record = close_round()
        closes.append(time.time())
        return record

    agg.close_round = timed_close_round  # type: ignore[method-assign]
    started = time.time()
    print(json.dumps({"ready": started}), flush=True)
    asyncio.run(agg.run())
    print(json.dumps({"started": started, "closes": closes, "cpu_s": bench.cpu_seconds(),
                      "peak_rss_mb": bench.peak_rss_mb(), "counters": dict(agg.counters)}), flush=True)


# -- agent processes -----------------------------------------------------------------------------------

async def agent(index: int, settings: BrokerSettings, deltas: list[Any], rounds: int, receipt_timeout: float,
                tally: dict[str, int], connected: asyncio.Event, all_connected: list[int], total: int,
                fleet: str) -> None:
    device = bench.device_name(index)
    async with settings.client(identifier=f"agent-{device}") as client:
        await client.subscribe(topics.receipt_topic(fleet, device), qos=1)
        await client.subscribe(topics.model_topic(fleet), qos=1)
        all_connected[0] += 1
        if all_connected[0] == total:
            connected.set()
        installed = 0
        waiting: str | None = None
        payload = b""
        while installed <= rounds:
            try:
                async with asyncio.timeout(receipt_timeout if waiting else None):
                    message = await anext(client.messages)
            except TimeoutError:
                tally["resent"] += 1
                await client.publish(topics.update_topic(fleet, device), payload, qos=1)
                continue
            raw = message.payload if isinstance(message.payload, bytes | bytearray) else b""
            if message.topic.matches(topics.model_topic(fleet)):
                try:
                    model = decode_message(raw, max_bytes=MAX_BYTES, expect=ModelMessage)
                except RejectedMessage:
                    tally["bad_models"] += 1
                    continue
                if model.version <= installed:
                    continue
                installed = model.version
                if installed > rounds:  # the last version: the run is over
                    break
                waiting = f"{device}-v{installed}"
                payload = bench.update_payload(device, waiting, deltas[index % len(deltas)], base_version=installed,
                                               num_examples=10 + index % 50)
                tally["sent"] += 1
                await client.publish(topics.update_topic(fleet, device), payload, qos=1)
            else:
                receipt = decode_message(raw, max_bytes=MAX_BYTES, expect=Receipt)
                if receipt.update_id != waiting:
                    continue
                tally[receipt.status if receipt.status == "accepted" else f"rejected_{receipt.reason}"] += 1
                if receipt.status == "accepted" or receipt.reason == "duplicate":
                    waiting = None


async def run_agents(port: int, model_name: str, first: int, count: int, total_agents: int, rounds: int,
                     receipt_timeout: float) -> None:
    bench.raise_nofile(count + 256)
    bench.quiet_aiomqtt()
    arch = bench.model(model_name)
    deltas = [bench.delta_tensors(arch, seed) for seed in range(2)]
    settings = BrokerSettings(host="127.0.0.1", port=port, protocol="5", connect_timeout=60.0, keepalive=120)
    tally = {"sent": 0, "accepted": 0, "resent": 0, "bad_models": 0}
    connected = asyncio.Event()
    counter = [0]
    tasks = [asyncio.create_task(agent(i, settings, deltas, rounds, receipt_timeout, tally, connected, counter,
                                       count, fleet_name(total_agents)))
             for i in range(first, first + count)]
    await asyncio.wait_for(connected.wait(), timeout=120)
    print(json.dumps({"connected": time.time()}), flush=True)
    done, _ = await asyncio.wait(tasks)
    failures = [repr(t.exception()) for t in done if t.exception() is not None]
    print(json.dumps({"tally": tally, "failures": failures[:5], "failed_agents": len(failures),
                      "cpu_s": bench.cpu_seconds(), "peak_rss_mb": bench.peak_rss_mb()}), flush=True)


# -- driver ---------------------------------------------------------------------------------------------

def read_json_line(proc: subprocess.Popen[str]) -> dict[str, Any]:
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line:
        raise RuntimeError(f"process {proc.args} ended without output (exit code {proc.wait()})")
    return json.loads(line)


def run_fleet(broker: Any, model_name: str, agents: int, rounds: int, processes: int, receipt_timeout: float,
              state_root: Path, timeout: float) -> dict[str, Any]:
    state_dir = Path(tempfile.mkdtemp(prefix=f"k{agents}-", dir=state_root))
    script = str(Path(__file__).resolve())
    aggregator = subprocess.Popen(
        [sys.executable, script, "--aggregator-worker", "--port", str(broker.port), "--model", model_name,
         "--agents", str(agents), "--rounds", str(rounds), "--state", str(state_dir)],
        stdout=subprocess.PIPE, text=True)
    read_json_line(aggregator)
    shares = [agents // processes + (1 if i < agents % processes else 0) for i in range(processes)]
    workers, first = [], 0
    for share in shares:
        if share:
            workers.append(subprocess.Popen(
                [sys.executable, script, "--agents-worker", "--port", str(broker.port), "--model", model_name,
                 "--first", str(first), "--agents", str(share), "--total", str(agents), "--rounds", str(rounds),
                 "--receipt-timeout", str(receipt_timeout)],
                stdout=subprocess.PIPE, text=True))
        first += share
    try:
        connected = max(read_json_line(w)["connected"] for w in workers)
        bench.progress(f"  {agents} agents connected; rounds running ...")
        agent_results = [read_json_line(w) for w in workers]
        agg = read_json_line(aggregator)
        for proc in (*workers, aggregator):
            proc.wait(timeout=timeout)
    finally:
        for proc in (*workers, aggregator):
            if proc.poll() is None:
                proc.kill()
        shutil.rmtree(state_dir, ignore_errors=True)
    tally: dict[str, int] = {}
    for result in agent_results:
        for key, value in result["tally"].items():
            tally[key] = tally.get(key, 0) + value
    closes = agg["closes"]
    round_s = [b - a for a, b in zip([connected, *closes], closes, strict=False)]
    accepted = int(agg["counters"].get("accepted", 0))
    return {
        "agents": agents, "rounds": rounds, "processes": len(workers), "model": model_name,
        "first_round_s": round_s[0] if round_s else None, "round_s": round_s[1:],
        "mean_round_s": sum(round_s[1:]) / len(round_s[1:]) if len(round_s) > 1 else None,
        "updates_expected": agents * rounds, "updates_accepted": accepted,
        "updates_lost": agents * rounds - accepted, "agent_receipts_accepted": tally.get("accepted", 0),
        "resent": tally.get("resent", 0), "failed_agents": sum(r["failed_agents"] for r in agent_results),
        "agent_failures": [f for r in agent_results for f in r["failures"]][:5],
        "rejected": {k: v for k, v in tally.items() if k.startswith("rejected_")},
        "aggregator_cpu_s": agg["cpu_s"], "aggregator_peak_rss_mb": agg["peak_rss_mb"],
        "agent_processes_cpu_s": sum(r["cpu_s"] for r in agent_results),
        "rounds_closed": len(closes),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--agents", default="100,1000", help="comma-separated fleet sizes K (default 100,1000)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds per fleet (default 3)")
    parser.add_argument("--model", default="100k", choices=sorted(bench.MODELS), help="model preset (default 100k)")
    parser.add_argument("--processes", type=int, default=4, help="agent processes (default 4)")
    parser.add_argument("--receipt-timeout", type=float, default=30.0,
                        help="seconds an agent waits for its receipt before re-sending (default 30)")
    parser.add_argument("--state-dir", default="/var/tmp", help="where the aggregator's state goes (default /var/tmp)")
    parser.add_argument("--timeout", type=float, default=600.0, help="give up on a fleet after this many seconds")
    parser.add_argument("--json", metavar="FILE", help="write the figures as JSON")
    parser.add_argument("--aggregator-worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--agents-worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--first", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--total", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--state", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.aggregator_worker:
        run_aggregator(args.port, args.model, int(args.agents), args.rounds, Path(args.state))
        return
    if args.agents_worker:
        asyncio.run(run_agents(args.port, args.model, args.first, int(args.agents), args.total, args.rounds,
                               args.receipt_timeout))
        return

    info = bench.machine()
    print(bench.describe_machine(info))
    sizes = [int(k) for k in args.agents.split(",")]
    bench.raise_nofile(max(sizes) * 2 + 1024)  # Mosquitto inherits it: one descriptor per connection
    broker = bench.start_mosquitto()
    state_root = Path(tempfile.mkdtemp(prefix="fedmq-fleet-", dir=args.state_dir))
    results = []
    try:
        for k in sizes:
            bench.progress(f"fleet of {k} agents over {min(args.processes, k)} processes, {args.rounds} rounds, "
                           f"model {args.model} ...")
            results.append(run_fleet(broker, args.model, k, args.rounds, min(args.processes, k),
                                     args.receipt_timeout, state_root, args.timeout))
    finally:
        broker.stop()
        broker.cleanup()
        shutil.rmtree(state_root, ignore_errors=True)
    print(f"{'agents':>6} {'first round s':>13} {'later rounds s':>20} {'lost':>4} {'resent':>6} "
          f"{'agg cpu s':>9} {'agg peak MB':>11} {'agents cpu s':>12}")
    for r in results:
        later = " ".join(f"{s:.2f}" for s in r["round_s"]) or "-"
        print(f"{r['agents']:6d} {r['first_round_s'] or 0:13.2f} {later:>20} {r['updates_lost']:4d} {r['resent']:6d} "
              f"{r['aggregator_cpu_s']:9.2f} {r['aggregator_peak_rss_mb']:11.0f} {r['agent_processes_cpu_s']:12.2f}")
    bench.write_json(args.json, {"benchmark": "fleet_scale", "machine": info, "results": results})


if __name__ == "__main__":
    main()
