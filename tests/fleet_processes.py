"""A whole fleet as real processes for fault tests: Mosquitto, the CLI aggregator and CLI agents.

:class:`FleetProcesses` starts, kills (SIGKILL), pauses (SIGSTOP) and restarts every part and
watches the broker through :class:`TopicProbe`, a paho client that records every message of the
fleet. :func:`reference_models` replays the same federated run without any broker, so a test can
check that crashes neither lost nor double-counted an update: every round holds exactly the
updates of the same agents, trained deterministically (each agent has an explicit seed).
"""

from __future__ import annotations

import hashlib
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

from fedmq.aggregator.registry import ModelRegistry, VersionRecord
from fedmq.broker import topics
from fedmq.broker.architecture import MLPArchitecture
from fedmq.broker.errors import RejectedMessage
from fedmq.broker.local import MosquittoProcess
from fedmq.broker.messages import (
    AggregatorStatus,
    DeviceStatus,
    ModelMessage,
    Receipt,
    Task,
    UpdateMessage,
    decode_message,
)
from fedmq.edge_agent.training import train

HOST = "127.0.0.1"
MAX_PAYLOAD = 1 << 22
LOG_TAIL_LINES = 60

_DECODERS: dict[str, type] = {
    "model": ModelMessage, "update": UpdateMessage, "receipt": Receipt, "status": DeviceStatus,
    "aggregator_status": AggregatorStatus,
}


# -- the broker as the fleet sees it ----------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Seen:
    """One message the probe received: ``kind`` as in :func:`topics.parse_topic`, decoded ``message``
    (None when it could not be decoded, with the reason in ``error``)."""

    at: float
    kind: str
    device: str | None
    message: Any
    retained: bool
    error: str = ""


class TopicProbe:
    """Records every message under the fleet's prefix; reconnects (and re-subscribes) by itself
    after a broker restart, so it also sees the retained state the broker kept or lost."""

    def __init__(self, port: int, fleet: str) -> None:
        self.fleet = fleet
        self._seen: list[Seen] = []
        self._changed = threading.Condition()
        self._client = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"{fleet}-probe", clean_session=True,
                                   protocol=paho.MQTTv311)
        self._client.on_connect = self._on_connect
        self._client.on_message = self._on_message
        # a broker restart in a test takes well under a second: come back quickly
        self._client.reconnect_delay_set(min_delay=0.1, max_delay=0.5)  # type: ignore[arg-type]
        self._subscribed = threading.Event()
        self._client.connect(HOST, port, keepalive=5)
        self._client.loop_start()
        if not self._subscribed.wait(10.0):
            self.close()
            raise AssertionError(f"the probe could not subscribe on {HOST}:{port} within 10 s")

    def _on_connect(self, client: paho.Client, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
        client.subscribe(f"{topics.fleet_prefix(self.fleet)}/#", qos=1)
        self._subscribed.set()

    def _on_message(self, client: paho.Client, userdata: Any, message: paho.MQTTMessage) -> None:
        # never raise here: an exception would end paho's network thread
        try:
            parsed = topics.parse_topic(message.topic)
            kind, device = parsed.kind, parsed.device
        except Exception:  # noqa: BLE001
            kind, device = "unknown", None
        decoded, error = None, ""
        expect = _DECODERS.get(kind)
        if expect is not None and message.payload:
            try:
                decoded = decode_message(message.payload, max_bytes=MAX_PAYLOAD, expect=expect)
            except RejectedMessage as exc:
                error = str(exc)
        with self._changed:
            self._seen.append(Seen(time.monotonic(), kind, device, decoded, bool(message.retain), error))
            self._changed.notify_all()

    def close(self) -> None:
        self._client.loop_stop()
        self._client.disconnect()

    def seen(self, kind: str | None = None, device: str | None = None) -> list[Seen]:
        with self._changed:
            return [s for s in self._seen if (kind is None or s.kind == kind) and (device is None or s.device == device)]

    def wait_for(self, predicate: Callable[[], bool], timeout: float) -> bool:
        """Wait until ``predicate()`` (evaluated after each message) is true; False after ``timeout``."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                # the predicate reads the records through seen(): the condition's lock is reentrant
                if predicate():
                    return True
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._changed.wait(min(remaining, 0.2))

    # what tests usually ask

    def model_versions(self) -> list[int]:
        return [s.message.version for s in self.seen("model") if s.message is not None]

    def updates(self, device: str | None = None) -> list[UpdateMessage]:
        return [s.message for s in self.seen("update", device) if s.message is not None]

    def receipts(self, device: str | None = None) -> list[Receipt]:
        return [s.message for s in self.seen("receipt", device) if s.message is not None]

    def last_device_status(self, device: str) -> DeviceStatus | None:
        statuses = [s.message for s in self.seen("status", device) if s.message is not None]
        return statuses[-1] if statuses else None

    def last_aggregator_status(self) -> AggregatorStatus | None:
        statuses = [s.message for s in self.seen("aggregator_status") if s.message is not None]
        return statuses[-1] if statuses else None

    def undecodable(self) -> list[Seen]:
        return [s for s in self.seen() if s.error]

    def summary(self) -> str:
        seen = self.seen()
        counts: dict[str, int] = {}
        for s in seen:
            counts[s.kind] = counts.get(s.kind, 0) + 1
        receipts = [f"{r.device}:{r.update_id}:{r.status}{'/' + r.reason if r.reason else ''}" for r in self.receipts()]
        return (f"probe saw {counts}; model versions {self.model_versions()}; "
                f"updates {[(u.device, u.update_id) for u in self.updates()]}; receipts {receipts}")


# -- the processes ----------------------------------------------------------------------------------

@dataclass(slots=True)
class AgentProcess:
    index: int
    device: str
    seed: str
    config: Path
    state_dir: Path
    data: Path
    log: Path
    examples: int
    proc: subprocess.Popen[bytes] | None = None
    starts: int = 0


@dataclass(slots=True)
class FleetSpec:
    fleet: str
    rounds: int
    shards: Sequence[tuple[np.ndarray, np.ndarray]]     # (x, y) of every agent
    arch: MLPArchitecture = field(default_factory=lambda: MLPArchitecture(64, (16,), 10))
    model_seed: int = 7
    epochs: int = 1
    batch_size: int = 32
    lr: float = 0.1
    resend_after_s: float = 1.0
    keepalive: int = 5
    persistence: bool = False


class FleetProcesses:
    """Mosquitto, one CLI aggregator and N CLI agents under ``root``, every one a real process.

    Use as a context manager: on an exception it prints the tail of every log (so a failing test
    shows what each process did), and on exit it kills whatever is still running.
    """

    def __init__(self, root: Path, spec: FleetSpec) -> None:
        self.root = Path(root)
        self.spec = spec
        self.fleet = spec.fleet
        self.broker = MosquittoProcess(host=HOST, workdir=self.root / "broker", persistence=spec.persistence)
        self.probe: TopicProbe | None = None
        self.aggregator_dir = self.root / "aggregator"
        self.aggregator_config = self.root / "aggregator.toml"
        self.aggregator_log = self.root / "aggregator.log"
        self.aggregator: subprocess.Popen[bytes] | None = None
        self.aggregator_starts = 0
        self.aggregator_paused = False
        self.agents: list[AgentProcess] = []
        self._killed: set[int] = set()    # pids this harness ended on purpose
        self._started = time.monotonic()
        self.notes: list[str] = []          # what the test did when (printed with the logs on failure)
        for i, (x, y) in enumerate(spec.shards):
            device = f"{spec.fleet}-a{i}"
            directory = self.root / f"agent{i}"
            directory.mkdir(parents=True, exist_ok=True)
            data = directory / "data.npz"
            np.savez(data, x=x, y=y)
            self.agents.append(AgentProcess(i, device, f"fault-seed-{i}", self.root / f"agent{i}.toml",
                                            directory / "state", data, self.root / f"agent{i}.log", len(y)))

    # lifecycle

    def __enter__(self) -> FleetProcesses:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        try:
            # shown by pytest with the logs when the test fails, and with -rP when it passes
            print(self.diagnostics() if exc_type is not None else "\n".join([self.state(), *self.notes]))
        finally:
            self.close()

    def note(self, text: str) -> None:
        self.notes.append(f"{time.monotonic() - self._started:7.3f}s {text}")

    def start_broker(self) -> None:
        """Start Mosquitto, write the configs (they name its port) and connect the probe."""
        self.broker.start()
        self._write_configs()
        self.probe = TopicProbe(self.broker.port, self.fleet)

    def close(self) -> None:
        """Kill every process still running (paused ones too) and the broker. Idempotent."""
        procs = [a.proc for a in self.agents] + [self.aggregator]
        for proc in procs:
            if proc is not None and proc.poll() is None:
                proc.kill()  # SIGKILL also ends a SIGSTOPped process
        for proc in procs:
            if proc is not None:
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    print(f"process {proc.pid} did not end after SIGKILL")
        if self.probe is not None:
            self.probe.close()
            self.probe = None
        self.broker.kill()

    def _write_configs(self) -> None:
        s = self.spec
        broker = (f'[broker]\nurl = "mqtt://{HOST}:{self.broker.port}"\nprotocol = "5"\n'
                  f"keepalive = {s.keepalive}\n")
        hidden = ", ".join(str(h) for h in s.arch.hidden)
        self.aggregator_config.write_text(
            f'fleet = "{self.fleet}"\nstate_dir = "{self.aggregator_dir}"\nclient_id = "{self.fleet}-agg"\n'
            + broker
            + f"[model]\ninputs = {s.arch.inputs}\nhidden = [{hidden}]\nclasses = {s.arch.classes}\nseed = {s.model_seed}\n"
            f"[task]\nepochs = {s.epochs}\nbatch_size = {s.batch_size}\nlr = {s.lr}\ndeadline_s = 600\n"
            f"[rounds]\nmin_updates = {len(self.agents)}\ntarget_updates = {len(self.agents)}\nmax_rounds = {s.rounds}\n"
            # the replay in reference_models() is plain FedAvg: no norm bound, no weight cap (the
            # bounds are tested in test_influence.py and test_attacks.py; exactly-once does not depend on them)
            'max_norm = "off"\nweight_factor = 0\n'
        )
        for agent in self.agents:
            agent.config.write_text(
                f'device_id = "{agent.device}"\nfleet = "{self.fleet}"\nstate_dir = "{agent.state_dir}"\n'
                f'data = "{agent.data}"\nbackend = "numpy"\nseed = "{agent.seed}"\nresend_after_s = {s.resend_after_s}\n'
                + broker
            )

    @staticmethod
    def _spawn(role: str, config: Path, log: Path, start: int) -> subprocess.Popen[bytes]:
        with log.open("ab") as out:
            out.write(f"\n===== {role} start #{start} at {time.strftime('%H:%M:%S')} =====\n".encode())
            out.flush()
            return subprocess.Popen(
                [sys.executable, "-m", "fedmq.cli", "--log-level", "info", role, "--config", str(config)],
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
            )

    def start_aggregator(self) -> None:
        assert self.aggregator is None or self.aggregator.poll() is not None, "the aggregator is still running"
        self.aggregator_starts += 1
        self.aggregator = self._spawn("aggregator", self.aggregator_config, self.aggregator_log, self.aggregator_starts)
        self.aggregator_paused = False

    def kill_aggregator(self) -> None:
        """SIGKILL, as in a crash or a power loss, and reap it."""
        proc = self.aggregator
        assert proc is not None
        if proc.poll() is None:
            self._killed.add(proc.pid)
            proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
        self.aggregator_paused = False

    def pause_aggregator(self) -> None:
        assert self.aggregator is not None and self.aggregator.poll() is None, "no running aggregator to pause"
        self.aggregator.send_signal(signal.SIGSTOP)
        self.aggregator_paused = True

    def resume_aggregator(self) -> None:
        assert self.aggregator is not None
        self.aggregator.send_signal(signal.SIGCONT)
        self.aggregator_paused = False

    def start_agent(self, index: int) -> None:
        agent = self.agents[index]
        assert agent.proc is None or agent.proc.poll() is not None, f"{agent.device} is still running"
        agent.starts += 1
        agent.proc = self._spawn("agent", agent.config, agent.log, agent.starts)

    def start_agents(self) -> None:
        for agent in self.agents:
            self.start_agent(agent.index)

    def kill_agent(self, index: int) -> None:
        proc = self.agents[index].proc
        assert proc is not None
        if proc.poll() is None:
            self._killed.add(proc.pid)
            proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)

    def stop_agents(self, timeout: float = 15.0) -> None:
        """SIGTERM every agent (they then publish their offline status with counters) and wait."""
        running = [a for a in self.agents if a.proc is not None and a.proc.poll() is None]
        for agent in running:
            assert agent.proc is not None
            agent.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for agent in running:
            assert agent.proc is not None
            try:
                code = agent.proc.wait(timeout=max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                raise AssertionError(f"{agent.device} did not stop within {timeout:.0f} s of SIGTERM") from None
            assert code == 0, f"{agent.device} exited with code {code} on SIGTERM"

    # watching

    def registry_version(self) -> int:
        """The latest version the aggregator committed (0 before it created its registry)."""
        path = self.aggregator_dir / "registry.sqlite3"
        if not path.exists():
            return 0
        try:
            db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=2.0)
            try:
                row = db.execute("SELECT MAX(version) FROM versions").fetchone()
            finally:
                db.close()
        except sqlite3.OperationalError:
            return 0  # created but no table yet
        return int(row[0] or 0)

    def outbox(self, index: int) -> list[Path]:
        return sorted((self.agents[index].state_dir / "outbox").glob("*.fmq"))

    def outbox_versions(self, index: int) -> list[int]:
        versions = []
        for path in self.outbox(index):
            try:
                payload = path.read_bytes()
            except FileNotFoundError:
                continue  # removed by a receipt meanwhile
            versions.append(decode_message(payload, max_bytes=MAX_PAYLOAD, expect=UpdateMessage).base_version)
        return sorted(versions)

    def check_processes(self) -> None:
        """Fail fast when a process died that the test did not kill, or the aggregator quit too early."""
        for agent in self.agents:
            proc = agent.proc
            if proc is not None and proc.poll() is not None and proc.pid not in self._killed and proc.returncode != 0:
                raise AssertionError(f"{agent.device} exited with code {proc.returncode} (see {agent.log})")
        proc = self.aggregator
        if proc is not None and proc.poll() is not None and proc.pid not in self._killed:
            if proc.returncode != 0:
                raise AssertionError(f"the aggregator exited with code {proc.returncode} (see {self.aggregator_log})")
            if self.registry_version() < self.spec.rounds + 1:
                raise AssertionError(f"the aggregator exited at v{self.registry_version()}, before max_rounds")

    def wait_until(self, condition: Callable[[], bool], timeout: float, what: str, *, poll: float = 0.05) -> None:
        """Poll ``condition`` (and the processes' health) until true; fail naming ``what`` after ``timeout``."""
        deadline = time.monotonic() + timeout
        while not condition():
            self.check_processes()
            if time.monotonic() >= deadline:
                raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}; {self.state()}")
            time.sleep(poll)

    def wait_seen(self, condition: Callable[[TopicProbe], bool], timeout: float, what: str) -> None:
        """Like :meth:`wait_until` for a condition on what the probe saw (woken by each message)."""
        assert self.probe is not None
        probe = self.probe
        deadline = time.monotonic() + timeout
        while not probe.wait_for(lambda: condition(probe), timeout=min(0.5, max(deadline - time.monotonic(), 0.0))):
            self.check_processes()
            if time.monotonic() >= deadline:
                raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}; {self.state()}")

    def wait_aggregator_exit(self, timeout: float) -> int:
        proc = self.aggregator
        assert proc is not None
        try:
            return proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"the aggregator did not exit by itself within {timeout:.0f} s "
                                 f"(max_rounds={self.spec.rounds}); {self.state()}") from None

    def state(self) -> str:
        aggregator = ("never started" if self.aggregator is None else
                      f"pid {self.aggregator.pid} " + ("paused" if self.aggregator_paused else
                                                       "running" if self.aggregator.poll() is None else
                                                       f"exited {self.aggregator.returncode}"))
        agents = ", ".join(f"{a.device}: " + ("-" if a.proc is None else "running" if a.proc.poll() is None
                                              else f"exited {a.proc.returncode}") + f" outbox {len(self.outbox(a.index))}"
                           for a in self.agents)
        return (f"registry at v{self.registry_version()}; aggregator {aggregator} (started {self.aggregator_starts}x); "
                f"broker {'up' if self.broker.is_running() else 'down'}; {agents}")

    def diagnostics(self) -> str:
        parts = [f"===== fleet {self.fleet}: {self.state()}", *self.notes]
        if self.probe is not None:
            parts.append(self.probe.summary())
        logs = [("aggregator", self.aggregator_log)] + [(a.device, a.log) for a in self.agents]
        logs.append(("mosquitto", self.broker.log_path))
        for name, path in logs:
            try:
                lines = path.read_text(errors="replace").splitlines()
            except FileNotFoundError:
                continue
            parts.append(f"----- {name} ({path}), last {LOG_TAIL_LINES} lines:")
            parts.extend(lines[-LOG_TAIL_LINES:])
        return "\n".join(parts)

    # the result

    def read_registry(self) -> list[tuple[VersionRecord, ModelMessage]]:
        """Every version in the registry with its decoded model (read after the aggregator exited)."""
        registry = ModelRegistry(self.aggregator_dir)
        try:
            return [(record, decode_message(registry.load_payload(record), max_bytes=MAX_PAYLOAD, expect=ModelMessage))
                    for record in registry.versions()]
        finally:
            registry.close()


# -- the run without any broker --------------------------------------------------------------------

def training_seed(agent_seed: str, version: int) -> int:
    """The agent's shuffling seed for ``version`` (as ``Agent.train_once`` derives it)."""
    return int.from_bytes(hashlib.sha256(f"{agent_seed}/{version}".encode()).digest()[:8], "little")


def fedavg_step(params: Mapping[str, np.ndarray], version: int, arch: MLPArchitecture, task: Task,
                agents: Sequence[tuple[np.ndarray, np.ndarray, str]]) -> dict[str, np.ndarray]:
    """The next global model: ``params`` plus the example-weighted mean of every agent's delta
    (server learning rate 1), each agent training from ``params`` of ``version``."""
    sums = {name: np.zeros(p.shape, dtype=np.float64) for name, p in params.items()}
    total = 0
    for x, y, seed in agents:
        result = train(params, arch, x, y, epochs=task.epochs, batch_size=task.batch_size, lr=task.lr,
                       seed=training_seed(seed, version))
        for name in sums:
            sums[name] += (result.params[name] - params[name]).astype(np.float64) * len(y)
        total += len(y)
    return {name: (params[name] + (sums[name] / total).astype(np.float32)).astype(np.float32) for name in params}


def reference_models(initial: Mapping[str, np.ndarray], arch: MLPArchitecture, task: Task,
                     agents: Sequence[tuple[np.ndarray, np.ndarray, str]], rounds: int) -> list[dict[str, np.ndarray]]:
    """Parameters of versions 1 .. rounds + 1 of a fault-free run that starts from ``initial``."""
    models = [{name: np.asarray(p, dtype=np.float32) for name, p in initial.items()}]
    for version in range(1, rounds + 1):
        models.append(fedavg_step(models[-1], version, arch, task, agents))
    return models

