"""``fedmq demo``: a whole federated run on one machine, through a real MQTT broker.

Starts a local broker (Mosquitto if installed, else the embedded amqtt broker) unless ``--broker``
names one, an aggregator and N agents, each with its own non-IID shard of scikit-learn's digits
(Dirichlet label skew) written to its own ``.npz`` file, and evaluates every model version on a
held-out test split as it is published.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import secrets
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fedmq.aggregator.config import AggregatorConfig, OpsAuth
from fedmq.aggregator.daemon import Aggregator
from fedmq.aggregator.registry import ModelRegistry
from fedmq.aggregator.rounds import RoundPolicy
from fedmq.broker import topics
from fedmq.broker.architecture import MLPArchitecture
from fedmq.broker.local import LocalBroker
from fedmq.broker.messages import ModelMessage, Task, decode_message
from fedmq.broker.session import cancel_tasks
from fedmq.broker.settings import BrokerSettings
from fedmq.edge_agent.agent import Agent
from fedmq.edge_agent.config import AgentConfig
from fedmq.edge_agent.training import evaluate
from fedmq.secure_demo import SecureFleet

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class DemoOptions:
    agents: int = 10
    rounds: int = 20
    alpha: float = 0.5
    seed: int = 0
    broker_url: str | None = None
    prefer_broker: str = "auto"         # auto | mosquitto | amqtt, when no --broker is given
    epochs: int = 5
    batch_size: int = 16
    lr: float = 0.2
    hidden: tuple[int, ...] = (64, 32)
    deadline_s: float = 60.0
    test_fraction: float = 0.2
    report: Path | None = None
    workdir: Path | None = None
    timeout_s: float = 600.0
    backend: str = "auto"               # the agents' training backend: auto | numpy | onnx | wasm
    codec: str = "fp32"                 # the delta codec the task asks for
    secure: bool = False                # TLS with per-device certificates, ACLs and signed models
    mode: str = "sync"                  # sync rounds | async buffered aggregation (FedBuff)
    stragglers: float = 0.0             # this fraction of the agents is `slowdown` times slower
    slowdown: float = 5.0
    buffer_size: int | None = None      # async: updates per version (default: half the agents)
    max_staleness: int = 10             # async: oldest base version taken, in versions behind
    server_lr: float = 1.0
    keep_running: bool = False          # after the rounds, keep the fleet training until stopped (for ops tools)
    target_accuracy: float | None = None  # stop at the first version that reaches this test accuracy

    def __post_init__(self) -> None:
        if not 1 <= self.agents <= 1000:
            raise ValueError(f"--agents must be from 1 to 1000, got {self.agents}")
        if not 1 <= self.rounds <= 10000:
            raise ValueError(f"--rounds must be from 1 to 10000, got {self.rounds}")
        if not self.alpha > 0:
            raise ValueError(f"--alpha must be positive, got {self.alpha}")
        if self.mode not in ("sync", "async"):
            raise ValueError(f"--mode must be sync or async, got {self.mode!r}")
        if not 0 <= self.stragglers <= 1:
            raise ValueError(f"--stragglers is a fraction of the agents, from 0 to 1, got {self.stragglers}")
        if not 1 <= self.slowdown <= 1000:
            raise ValueError(f"--slowdown must be from 1 to 1000, got {self.slowdown}")
        if self.buffer_size is not None and not 1 <= self.buffer_size:
            raise ValueError(f"--buffer-size must be at least 1, got {self.buffer_size}")

    @property
    def effective_buffer_size(self) -> int:
        return self.buffer_size or max(1, self.agents // 2)

    def straggler_indices(self) -> set[int]:
        """Which agents are slowed down: a seeded choice, the same for sync and async runs."""
        count = round(self.stragglers * self.agents)
        return set(np.random.default_rng([self.seed, 7]).permutation(self.agents)[:count].tolist())


def load_digits_split(seed: int, test_fraction: float) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Digits scaled to [0, 1], split into a stratified train and test part."""
    from sklearn.datasets import load_digits  # the data ships inside scikit-learn: nothing is downloaded

    digits = load_digits()
    x = (digits.data / 16.0).astype(np.float32)
    y = digits.target.astype(np.int64)
    rng = np.random.default_rng(seed)
    test_idx = []
    for label in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == label))
        test_idx.extend(idx[: int(round(len(idx) * test_fraction))])
    test = np.zeros(len(y), dtype=bool)
    test[test_idx] = True
    return x[~test], y[~test], x[test], y[test]


def dirichlet_partition(y: np.ndarray, parts: int, alpha: float, seed: int, min_size: int = 10) -> list[np.ndarray]:
    """Split example indices into ``parts`` shards with Dirichlet(``alpha``) label proportions.

    Smaller ``alpha`` means more skew. Redraws (up to 100 times) until every shard has at least
    ``min_size`` examples, as is usual for this benchmark partition.
    """
    if parts * min_size > len(y):
        raise ValueError(f"cannot give {parts} agents {min_size} examples each from {len(y)} examples")
    rng = np.random.default_rng(seed)
    for _ in range(100):
        shards: list[list[int]] = [[] for _ in range(parts)]
        for label in np.unique(y):
            idx = rng.permutation(np.flatnonzero(y == label))
            cuts = (np.cumsum(rng.dirichlet(np.full(parts, alpha))) * len(idx)).astype(int)[:-1]
            for shard, chunk in zip(shards, np.split(idx, cuts), strict=True):
                shard.extend(chunk.tolist())
        if min(len(s) for s in shards) >= min_size:
            return [np.array(sorted(s), dtype=np.int64) for s in shards]
    raise ValueError(f"could not partition with alpha={alpha} so that every agent has {min_size} examples; raise --alpha")


@dataclass(slots=True)
class VersionRow:
    version: int
    accuracy: float
    loss: float
    updates: int
    bytes_up: int
    bytes_down: int
    seconds: float

    def as_dict(self) -> dict[str, Any]:
        return {"version": self.version, "accuracy": round(self.accuracy, 4), "loss": round(self.loss, 4),
                "updates": self.updates, "bytes_up": self.bytes_up, "bytes_down": self.bytes_down,
                "seconds": round(self.seconds, 3)}


HEADER = f"{'version':>7} {'accuracy':>8} {'loss':>7} {'updates':>7} {'bytes up':>10} {'bytes down':>10} {'seconds':>7}"


def format_row(row: VersionRow) -> str:
    return (f"{row.version:>7} {row.accuracy:>8.4f} {row.loss:>7.4f} {row.updates:>7} {row.bytes_up:>10} "
            f"{row.bytes_down:>10} {row.seconds:>7.2f}")


class DemoError(RuntimeError):
    pass


async def run_demo(opts: DemoOptions, *, say: Callable[[str], None] = print) -> list[VersionRow]:
    """Run the demo and return one row per model version (the initial model included)."""
    x_train, y_train, x_test, y_test = load_digits_split(opts.seed, opts.test_fraction)
    shards = dirichlet_partition(y_train, opts.agents, opts.alpha, opts.seed)
    arch = MLPArchitecture(x_train.shape[1], opts.hidden, int(y_train.max()) + 1)
    fleet = f"demo-{secrets.token_hex(3)}"

    with contextlib.ExitStack() as stack:
        workdir = opts.workdir or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="fedmq-demo-")))
        async with contextlib.AsyncExitStack() as astack:
            secure = None
            if opts.secure:
                if opts.broker_url:
                    raise DemoError("--secure starts its own TLS Mosquitto; it cannot be combined with --broker")
                secure = SecureFleet(workdir, fleet, [f"{fleet}-agent{i:03d}" for i in range(opts.agents)],
                                     aggregator=f"{fleet}-aggregator", observer=f"{fleet}-observer")
                secure.create()
                secure.start_broker()
                stack.callback(secure.stop_broker)
                settings = secure.settings(secure.aggregator)
                broker_name = (f"mosquitto at mqtts://127.0.0.1:{secure.port} (mutual TLS, per-device certificates, "
                               "ACLs, signed models)")
            elif opts.broker_url:
                settings = BrokerSettings.from_url(opts.broker_url)
                broker_name = settings.url
            else:
                broker = LocalBroker(prefer=opts.prefer_broker, workdir=workdir / "broker")  # type: ignore[arg-type]
                await astack.enter_async_context(broker)
                settings = BrokerSettings.from_url(broker.url, protocol="5" if "5" in broker.protocols else "3.1.1")
                broker_name = f"{broker.kind} at {broker.url}"
            say(f"fedmq demo: {opts.agents} agents, {opts.rounds} rounds, digits split with Dirichlet alpha={opts.alpha} "
                f"(shard sizes {min(map(len, shards))}-{max(map(len, shards))}), test set {len(y_test)}; broker: {broker_name}")
            return await _run_fleet(opts, settings, arch, fleet, shards, x_train, y_train, x_test, y_test, workdir, say,
                                    secure)
    raise AssertionError("unreachable")


async def _run_fleet(opts: DemoOptions, settings: BrokerSettings, arch: MLPArchitecture, fleet: str,
                     shards: list[np.ndarray], x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray,
                     y_test: np.ndarray, workdir: Path, say: Callable[[str], None],
                     secure: SecureFleet | None = None) -> list[VersionRow]:
    stop = asyncio.Event()
    task = Task(epochs=opts.epochs, batch_size=opts.batch_size, lr=opts.lr, deadline_s=opts.deadline_s, codec=opts.codec,
                mode=opts.mode, max_staleness=opts.max_staleness if opts.mode == "async" else 0)  # type: ignore[arg-type]
    buffer_size = opts.effective_buffer_size
    min_updates = math.ceil(opts.agents / 2) if opts.mode == "sync" else min(math.ceil(opts.agents / 2), buffer_size)
    aggregator = Aggregator(AggregatorConfig(
        fleet=fleet, state_dir=workdir / "aggregator", broker=settings, client_id=f"{fleet}-aggregator",
        arch=arch, seed=opts.seed, task=task, buffer_size=buffer_size, server_lr=opts.server_lr,
        policy=RoundPolicy(min_updates=min_updates, target_updates=opts.agents, deadline_s=opts.deadline_s),
        max_rounds=0 if opts.keep_running else opts.rounds, signing_key=secure.signing_key if secure else None,
        # the secure fleet takes ops requests only signed by an operator certificate of its CA
        ops_auth=OpsAuth(ca_file=secure.pki_dir / "ca.pem", crl_file=secure.pki_dir / "crl.pem") if secure else OpsAuth(),
    ))
    slow = opts.straggler_indices()
    if opts.mode == "async":
        say(f"async buffered aggregation: a version every {buffer_size} updates, staleness up to {opts.max_staleness} "
            f"versions weighted {aggregator.config.staleness.describe()}")
    if slow:
        say(f"stragglers: agents {sorted(slow)} train {opts.slowdown:g}x slower")
    agents = []
    for i, shard in enumerate(shards):
        device = f"{fleet}-agent{i:03d}"
        data_file = workdir / "agents" / device / "data.npz"
        data_file.parent.mkdir(parents=True, exist_ok=True)
        np.savez(data_file, x=x_train[shard], y=y_train[shard])
        agents.append(Agent(AgentConfig(device_id=device, fleet=fleet, state_dir=data_file.parent, data=data_file,
                                        broker=secure.settings(device) if secure else settings,
                                        fleet_public_key=secure.public_key if secure else None, seed=f"demo-{opts.seed}-agent{i}",
                                        operator_ca_file=secure.pki_dir / "ca.pem" if secure else None,
                                        backend=opts.backend, slowdown=opts.slowdown if i in slow else 1.0)))

    rows: list[VersionRow] = []
    final = opts.rounds + 1
    history = ModelRegistry(workdir / "aggregator")  # our own handle: the aggregator closes its own when done
    observer_ready = asyncio.Event()

    async def observe() -> None:
        last_time = time.monotonic()
        observer_settings = secure.settings(secure.observer) if secure else settings
        observer = observer_settings.client(identifier=f"{fleet}-observer", max_queued_incoming=1000)
        async with observer:
            await observer.subscribe(topics.model_topic(fleet), qos=1)
            observer_ready.set()
            async for message in observer.messages:
                payload = message.payload if isinstance(message.payload, bytes) else b""
                model: ModelMessage = decode_message(payload, max_bytes=1 << 30, expect=ModelMessage)
                if rows and model.version <= rows[-1].version:
                    continue
                now = time.monotonic()
                accuracy, loss = evaluate(model.params, model.arch, x_test, y_test)
                record = history.get(model.version)
                info = record.info if record else {}
                row = VersionRow(model.version, accuracy, loss, int(info.get("updates", 0)), int(info.get("bytes_in", 0)),
                                 len(payload) * len(agents), now - last_time if rows else 0.0)
                last_time = now
                rows.append(row)
                if model.version <= final or model.version % 10 == 0:  # --keep-running: every 10th from then on
                    say(format_row(row))
                if opts.target_accuracy is not None and accuracy >= opts.target_accuracy:
                    return
                if model.version == final and opts.keep_running:
                    say(f"{opts.rounds} rounds done; the fleet keeps training until Ctrl-C. Try, in another shell:\n"
                        f"  fedmq fleet status --broker '{settings.url}' --fleet {fleet}\n"
                        f"  fedmq fleet pause --broker '{settings.url}' --fleet {fleet} --device {fleet}-agent000\n"
                        f"  fedmq rounds --broker '{settings.url}' --fleet {fleet}\n"
                        f"  fedmq report --state-dir {workdir / 'aggregator'} --out fedmq-report\n"
                        "(rows are printed for every 10th version from now on)")
                if model.version >= final and not opts.keep_running:
                    return

    started = time.monotonic()
    if agents[0].backend is None:
        raise DemoError(agents[0].detail)
    say(f"agents train with the {agents[0].backend.name} backend")
    say(HEADER)
    observer_task = asyncio.create_task(observe(), name="observer")
    await asyncio.wait([observer_task, asyncio.create_task(observer_ready.wait())], return_when=asyncio.FIRST_COMPLETED,
                       timeout=30)
    if observer_task.done():
        observer_task.result()  # raises the connection error
    runners = [asyncio.create_task(aggregator.run(stop), name="aggregator")]
    runners += [asyncio.create_task(a.run(stop), name=a.device) for a in agents]
    try:
        # until the observer has its last row (or a task fails): the aggregator may end first
        # (max_rounds), the agents only when told to
        pending: set[asyncio.Task[Any]] = {observer_task, *runners}
        deadline = None if opts.keep_running else time.monotonic() + opts.timeout_s
        while observer_task in pending:
            timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
            done, pending = await asyncio.wait(pending, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
            if not done:
                break
            for t in done:
                if t.exception() is not None:
                    log.error("%s failed", t.get_name(), exc_info=t.exception())
                    raise DemoError(f"{t.get_name()} failed: {t.exception()!r}") from t.exception()
        if observer_task in pending:
            raise DemoError(f"no model v{final} after {opts.timeout_s:.0f}s (have {rows[-1].version if rows else 0}); "
                            "see the log (--log-level info)")
    finally:
        stop.set()
        await asyncio.wait(runners, timeout=10)
        await cancel_tasks([observer_task, *runners])
        history.close()
    elapsed = time.monotonic() - started
    best = rows[-1]
    say(f"final model v{best.version}: test accuracy {best.accuracy:.4f}, loss {best.loss:.4f} after {best.version - 1} "
        f"{'rounds' if opts.mode == 'sync' else 'buffered versions'} "
        f"in {elapsed:.1f}s; uploaded {sum(r.bytes_up for r in rows)} bytes in "
        f"{sum(r.updates for r in rows)} updates; rejected {int(aggregator.counters['rejected'])}")
    if opts.report:
        opts.report.parent.mkdir(parents=True, exist_ok=True)
        opts.report.write_text(json.dumps([r.as_dict() for r in rows], indent=2) + "\n")
        say(f"report written to {opts.report}")
    return rows
