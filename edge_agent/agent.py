"""The agent daemon: receive the global model, train locally, publish the delta, keep status.

Three activities share one agent: the connection (reconnecting with backoff), the trainer (a
long-lived task that trains off the event loop whenever a newer model is installed) and the
outbox sender (publishes finished updates until a receipt arrives). The trainer and the outbox
live across reconnects, so a broker outage loses nothing.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import platform
import time
import uuid
from collections import Counter
from pathlib import Path

import aiomqtt
import numpy as np

from fedmq import __version__
from fedmq.broker import topics
from fedmq.broker.codecs import CODECS, get_codec
from fedmq.broker.errors import Reason, RejectedMessage
from fedmq.broker.files import write_atomic
from fedmq.broker.messages import (
    MAX_CLOCK_SKEW_S,
    BackboneRef,
    Command,
    DeviceStatus,
    ModelMessage,
    Receipt,
    UpdateMessage,
    decode_message,
)
from fedmq.broker.operators import OperatorVerifier
from fedmq.broker.sdnotify import Notifier, watchdog_loop
from fedmq.broker.session import cancel_tasks, raise_first_failure, run_connected, sleep_or_stop
from fedmq.broker.signing import TrustStore, load_public_key

from .backends import Backend, BackendError, load_backend
from .config import AgentConfig
from .data import DataError, load_npz
from .error_feedback import ErrorFeedback
from .export import export_current_model
from .metrics import AgentMetrics
from .outbox import Outbox
from .training import evaluate as evaluate_params

log = logging.getLogger(__name__)

MODEL_FILE = "model.fmq"
RESIDUAL_FILE = "residual.npz"
COMMAND_FILE = "command.json"
#: How long a stopping agent waits for the training thread in hand.
TRAINING_EXIT_TIMEOUT_S = 60.0


class AlreadyInstalled(RejectedMessage):
    """The model is the installed one (the retained copy again after a reconnect): not an error."""


def platform_string() -> str:
    return f"{platform.system()}-{platform.machine()} Python {platform.python_version()}"


class Agent:
    """One edge device. ``await Agent(config).run(stop)`` until ``stop`` is set."""

    def __init__(self, config: AgentConfig, *, dataset: tuple[np.ndarray, np.ndarray] | None = None) -> None:
        self.config = config
        self.device = config.device_id
        self.counters: Counter[str] = Counter()
        self.state_dir = Path(config.state_dir)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.outbox = Outbox(self.state_dir / "outbox")
        # what lossy codecs left out of earlier updates, added to the next delta (survives restarts)
        self.error_feedback = ErrorFeedback()
        self.error_feedback.load(self.state_dir / RESIDUAL_FILE)
        self.trust = (TrustStore(self.state_dir / "trust.json", load_public_key(config.fleet_public_key))
                      if config.fleet_public_key else None)
        # with the fleet CA known, only commands signed by one of its operator certificates count
        self.operators = (OperatorVerifier.from_files(config.operator_ca_file, config.operator_crl_file)
                          if config.operator_ca_file else None)
        self._dataset = dataset
        self.model: ModelMessage | None = None
        self.detail = ""
        self.backend: Backend | None = None
        self._backend_error = ""
        try:
            self.backend = load_backend(config.backend, wasm_module=config.wasm_module)
        except BackendError as exc:
            # keep running: serve the installed model, stay visible, say what is wrong on the status topic
            self._backend_error = f"backend {config.backend} unavailable: {exc}"
            self.detail = self._backend_error
            log.error("%s: %s", config.device_id, self.detail)
        self._status_dirty = asyncio.Event()
        self._training: asyncio.Future[tuple[UpdateMessage, bytes]] | None = None
        # installed models are written (model.fmq, current.onnx) by a worker thread, newest only:
        # fsync on an SD card must not stall the event loop (keepalives, receipts, other agents)
        self._pending_write: tuple[ModelMessage, bytes] | None = None
        self._write_wake: asyncio.Event | None = None
        self._writing: asyncio.Future[None] | None = None
        self._artifact_arrived = asyncio.Event()
        self._embedded: tuple[str, np.ndarray] | None = None  # (backbone sha256, embedded local x)
        self._model_changed = asyncio.Event()
        self._outbox_changed = asyncio.Event()
        self._receipt_arrived = asyncio.Event()
        self._client: aiomqtt.Client | None = None
        self._since = time.time()
        self._stop = asyncio.Event()
        self.paused = False
        self.frozen = 0  # an operator's freeze: install nothing newer than this version (0 = none)
        self._held_by_freeze: bytes | None = None  # the newest model a freeze kept out, installed once it lifts
        self.evaluation: dict[str, float] = {}  # the newest model's (or candidate's) evaluation on local data
        self._evaluating: set[asyncio.Task[None]] = set()
        self.metrics = AgentMetrics()
        # issued_at of the command in force per setting (newest of cmd/{device} and cmd/all)
        self._command_at: dict[str, float] = {"pause": 0.0, "freeze": 0.0}
        self._load_installed_model()
        self._load_command()
        if self.trust is not None and self.trust.legacy and self.model is not None and self.model.signed_by is not None:
            # a trust store from before key retirement: the installed model says which key is current
            log.info("%s: %s", self.device, self.trust.settle(str(self.model.signed_by[2].get("key")), self.model.next_key))

    # -- state ------------------------------------------------------------------------------------

    @property
    def model_version(self) -> int:
        return self.model.version if self.model else 0

    def _load_installed_model(self) -> None:
        path = self.state_dir / MODEL_FILE
        if not path.exists():
            return
        try:
            payload = path.read_bytes()
            self.model = decode_message(payload, max_bytes=len(payload) + 1, expect=ModelMessage)
            log.info("%s: serving installed model v%d from %s", self.device, self.model.version, path)
        except (OSError, RejectedMessage) as exc:
            log.warning("%s: ignoring unreadable installed model %s: %s", self.device, path, exc)

    def _load_command(self) -> None:
        # the operator's pause and freeze hold across restarts, also before the broker is reachable
        path = self.state_dir / COMMAND_FILE
        try:
            saved = json.loads(path.read_text())
            if "command" in saved:  # written before freeze existed: one pause/resume
                saved = {"pause": saved}
            for setting in ("pause", "freeze"):
                if setting in saved:
                    self._command_at[setting] = float(saved[setting]["issued_at"])
            self.paused = saved.get("pause", {}).get("command") == "pause"
            self.frozen = int(saved.get("freeze", {}).get("version", 0)) if saved.get("freeze", {}).get("command") == "freeze" else 0
        except FileNotFoundError:
            return
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            log.warning("%s: ignoring unreadable %s: %s", self.device, path, exc)

    def apply_command(self, payload: bytes, target: str = "", now: float | None = None,
                      setting: str | None = None) -> Command | None:
        """Obey an operator command received on ``target``'s command topic (this device's id, or
        ``all``) for ``setting`` (``pause``: ``cmd/...``, ``freeze``: ``cmd/.../freeze``) if it
        counts and is newer than the one in force for its setting; return it, or None.

        With the fleet's operator CA configured, a command counts only when an operator
        certificate of that CA signed it for this fleet and this target. Whatever its signature,
        none from more than :data:`~fedmq.broker.messages.MAX_CLOCK_SKEW_S` in the future counts
        (it would outrank every later command for good).
        """
        now = time.time() if now is None else now
        try:
            command: Command = decode_message(payload, max_bytes=64 * 1024, expect=Command)
            if self.operators is not None:
                signer = self.operators.verify(command.signed_by, now=now)
                if command.fleet != self.config.fleet or not command.target:
                    raise RejectedMessage(Reason.UNAUTHENTICATED, f"command signed by {signer} names fleet "
                                          f"{command.fleet!r} and target {command.target!r}, not this fleet and device")
            if command.target and (command.target not in ("all", self.device) or (target and command.target != target)):
                raise RejectedMessage(Reason.REPLAYED, f"command for {command.target!r} arrived on the topic of "
                                      f"{target or self.device!r}")
            kind = "freeze" if command.command in ("freeze", "unfreeze") else "pause"
            if setting is not None and kind != setting:
                raise RejectedMessage(Reason.REPLAYED, f"a {command.command} command on the {setting} topic")
            if command.issued_at > now + MAX_CLOCK_SKEW_S:
                raise RejectedMessage(Reason.REPLAYED, f"command issued_at is {command.issued_at - now:.0f} s in the future; "
                                      "check the operator's clock")
        except RejectedMessage as exc:
            self.counters["commands_rejected"] += 1
            self.counters[f"commands_rejected_{exc.reason.value}"] += 1
            self.detail = f"refused a command: {exc}"
            log.warning("%s: refused command: %s", self.device, exc)
            return None
        setting = "freeze" if command.command in ("freeze", "unfreeze") else "pause"
        if command.issued_at <= self._command_at[setting]:
            return None  # an older command (the other topic's retained copy): the newer one stands
        self._command_at[setting] = command.issued_at
        if setting == "pause":
            self.paused = command.command == "pause"
        else:
            self.frozen = command.version if command.command == "freeze" else 0
        saved = {"pause": {"command": "pause" if self.paused else "resume", "issued_at": self._command_at["pause"]},
                 "freeze": {"command": "freeze" if self.frozen else "unfreeze", "version": self.frozen,
                            "issued_at": self._command_at["freeze"]}}
        write_atomic(self.state_dir / COMMAND_FILE, json.dumps(saved).encode())
        self.counters[f"commands_{command.command}"] += 1
        what = {"pause": "paused", "resume": "resumed", "freeze": f"frozen at v{command.version}",
                "unfreeze": "unfrozen"}[command.command]
        log.info("%s: %s by %s%s", self.device, what, command.issued_by or "operator",
                 f": {command.reason}" if command.reason else "")
        if not self.paused:
            self._model_changed.set()  # train on the model in hand if it is new to us
        if setting == "freeze" and self._held_by_freeze is not None:
            held, self._held_by_freeze = self._held_by_freeze, None
            self._on_model(held)  # the newest model a freeze kept out: installed now if allowed
        return command

    def dataset(self) -> tuple[np.ndarray, np.ndarray]:
        if self._dataset is None:
            if self.config.data is None:
                raise DataError("no local data: set 'data' in the agent config to an .npz file with x and y")
            self._dataset = load_npz(self.config.data)
        return self._dataset

    def install(self, payload: bytes) -> ModelMessage:
        """Check a model payload and make it the current model (atomically, on disk first).

        Raises :class:`RejectedMessage` for a malformed model or one that is not newer.
        """
        model: ModelMessage = decode_message(payload, max_bytes=self.config.max_model_bytes, expect=ModelMessage)
        if model.fleet != self.config.fleet:
            raise RejectedMessage(Reason.FIELD, f"model is for fleet {model.fleet!r}, this device is in {self.config.fleet!r}")
        if model.is_candidate:
            raise RejectedMessage(Reason.ROLE, f"v{model.version} is a staged-rollout candidate (cohort "
                                  f"{list(model.cohort)[:5]}); candidates are evaluated by their cohort, never installed")
        if model.task.codec not in CODECS:
            raise RejectedMessage(Reason.CODEC, f"model v{model.version} asks for codec {model.task.codec!r}, "
                                  f"which this agent does not have (known: {sorted(CODECS)}); upgrade fedmq")
        signer = self.trust.verify(*(model.signed_by or (None, None, None))) if self.trust is not None else ""
        if model.version == self.model_version:
            raise AlreadyInstalled(Reason.VERSION, f"model v{model.version} is already installed")
        if model.version < self.model_version:
            raise RejectedMessage(Reason.VERSION, f"model v{model.version} is older than the installed v{self.model_version}: "
                                  "rollback refused")
        jump = self.config.max_version_jump
        if jump and self.model_version and model.version > self.model_version + jump:
            raise RejectedMessage(Reason.VERSION, f"model v{model.version} is more than max_version_jump={jump} versions "
                                  f"ahead of the installed v{self.model_version}")
        if self.frozen and model.version > self.frozen:
            raise RejectedMessage(Reason.FROZEN, f"model v{model.version} not installed: an operator froze this device "
                                  f"at v{self.frozen} (fedmq fleet unfreeze lifts it)")
        self.model = model
        if self.trust is not None:
            for change in self.trust.installed(signer, model.next_key):
                log.info("%s: v%d: %s", self.device, model.version, change)
        self.counters["models_installed"] += 1
        self._drop_superseded()
        if self._write_wake is None:
            self._write_model(model, payload)  # not running (tests, tools): write now
        else:
            self._pending_write = (model, payload)
            self._write_wake.set()
        return model

    def _write_model(self, model: ModelMessage, payload: bytes) -> None:
        write_atomic(self.state_dir / MODEL_FILE, payload)
        self._export(model)

    async def _write_models_forever(self) -> None:
        assert self._write_wake is not None
        while True:
            await self._write_wake.wait()
            self._write_wake.clear()
            pending, self._pending_write = self._pending_write, None
            if pending is not None:
                self._writing = asyncio.get_running_loop().run_in_executor(None, self._write_model, *pending)
                await asyncio.shield(self._writing)

    async def _finish_writes(self) -> None:
        if self._writing is not None:
            await asyncio.wait([self._writing], timeout=TRAINING_EXIT_TIMEOUT_S)
        pending, self._pending_write = self._pending_write, None
        if pending is not None:
            await asyncio.to_thread(self._write_model, *pending)
        self._write_wake = None

    def _export(self, model: ModelMessage) -> None:
        backbone = None
        if model.backbone is not None:
            backbone = self.artifact(model.backbone)
            if backbone is None:
                return  # exported once the artifact arrives
        try:
            export_current_model(self.state_dir, model, backbone)
        except Exception as exc:  # noqa: BLE001 - inference export must never block training
            log.warning("%s: could not export current.onnx for v%d: %s", self.device, model.version, exc)

    # -- backbone artifacts ------------------------------------------------------------------------

    def _artifact_path(self, ref: BackboneRef) -> Path:
        return self.state_dir / "artifacts" / f"{ref.sha256}.onnx"

    def artifact(self, ref: BackboneRef) -> bytes | None:
        """The backbone's bytes if this device has them (checked against the reference)."""
        try:
            data = self._artifact_path(ref).read_bytes()
        except FileNotFoundError:
            return None
        if len(data) != ref.size or hashlib.sha256(data).hexdigest() != ref.sha256:
            log.warning("%s: stored artifact %s is corrupt; fetching it again", self.device, ref.sha256)
            self._artifact_path(ref).unlink(missing_ok=True)
            return None
        return data

    def store_artifact(self, sha256: str, payload: bytes) -> bool:
        """Keep an artifact received from the broker if the current model names it and it matches."""
        ref = self.model.backbone if self.model else None
        if ref is None or ref.sha256 != sha256:
            return False
        if len(payload) != ref.size or hashlib.sha256(payload).hexdigest() != ref.sha256:
            self.detail = f"artifact {sha256} does not match its reference (size {len(payload)}, expected {ref.size})"
            self.counters["artifacts_rejected"] += 1
            log.warning("%s: %s", self.device, self.detail)
            return False
        path = self._artifact_path(ref)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, payload)
        self.counters["artifacts_received"] += 1
        if self.model is not None:
            self._export(self.model)
        self._artifact_arrived.set()
        return True

    def features(self, model: ModelMessage, x: np.ndarray) -> np.ndarray:
        """Local data as the MLP sees it: through the model's frozen backbone when it has one."""
        if model.backbone is None:
            return x
        if self._embedded is not None and self._embedded[0] == model.backbone.sha256:
            return self._embedded[1]
        backbone = self.artifact(model.backbone)
        if backbone is None:
            raise BackendError(f"backbone artifact {model.backbone.sha256} has not arrived")
        from .onnx_backend import run_backbone  # the backbone runs in onnxruntime whatever the backend

        embedded = run_backbone(backbone, x)
        self._embedded = (model.backbone.sha256, embedded)
        return embedded

    def still_wanted(self, base_version: int) -> bool:
        """Whether the aggregator still takes an update computed from ``base_version``: in sync
        mode only for the current version, in async mode up to ``max_staleness`` versions behind."""
        if self.model is None:
            return True
        task = self.model.task
        allowed = task.max_staleness if task.mode == "async" else 0
        return base_version >= self.model.version - allowed

    def _drop_superseded(self) -> None:
        for entry in self.outbox.entries():
            if not self.still_wanted(entry.base_version):
                self.outbox.remove(entry.update_id)
                self._return_to_residual(entry.payload)
                self.counters["updates_superseded"] += 1
                log.info("%s: dropped update %s for v%d: superseded by v%d before its receipt came",
                         self.device, entry.update_id, entry.base_version, self.model_version)

    def _return_to_residual(self, payload: bytes) -> None:
        """A lossy-codec update is dropped unsent: its content goes back into the error-feedback
        residual, so it is delayed to the next update rather than lost."""
        try:
            update: UpdateMessage = decode_message(payload, max_bytes=len(payload) + 1, expect=UpdateMessage)
            if update.codec == "fp32":
                return
            if self.model is None:
                return
            shapes = self.model.arch.param_shapes()
            self.error_feedback.restore(get_codec(update.codec).decode(update.tensors, shapes))
            self.error_feedback.save(self.state_dir / RESIDUAL_FILE)
        except (RejectedMessage, ValueError, KeyError) as exc:
            log.warning("%s: could not return a dropped update to the residual: %s", self.device, exc)

    def status(self, state: str = "online") -> DeviceStatus:
        return DeviceStatus(
            device=self.device, state=state, model_version=self.model_version, software=__version__,  # type: ignore[arg-type]
            platform=platform_string(), backend=self.backend.name if self.backend else self.config.backend, since=self._since, detail=self.detail,
            counters={k: float(v) for k, v in sorted(self.counters.items())}, paused=self.paused,
            evaluation=self.evaluation, frozen=self.frozen,
        )

    def evaluate(self, model: ModelMessage) -> tuple[float, float, int]:
        """Accuracy, loss and example count of ``model`` on this device's data (blocking)."""
        raw_x, y = self.dataset()
        accuracy, loss = evaluate_params(model.params, model.arch, self.features(model, raw_x), y)
        return accuracy, loss, len(y)

    def _evaluation_metrics(self, model: ModelMessage) -> dict[str, float]:
        # the received model's accuracy on this device's data, measured before training on it:
        # averaged over the updates, the aggregator gets a federated evaluation of each version
        if self.evaluation.get("version") != model.version or "baseline_version" in self.evaluation:
            return {}
        return {"eval_accuracy": self.evaluation["accuracy"], "eval_loss": self.evaluation["loss"]}

    def evaluation_of(self, model: ModelMessage) -> dict[str, float]:
        accuracy, loss, examples = self.evaluate(model)
        return {"version": float(model.version), "accuracy": accuracy, "loss": loss, "examples": float(examples)}

    def _set_evaluation(self, evaluation: dict[str, float]) -> None:
        # a pending candidate's report outranks the evaluation of an older installed model
        if evaluation["version"] >= self.evaluation.get("version", 0):
            self.evaluation = evaluation
            self._status_dirty.set()

    def evaluate_candidate(self, payload: bytes) -> dict[str, float] | None:
        """Evaluate a staged-rollout candidate against the installed model if this device is in
        its cohort; return the report (also put in the status), or None. Blocking."""
        try:
            candidate: ModelMessage = decode_message(payload, max_bytes=self.config.max_model_bytes, expect=ModelMessage)
            if candidate.fleet != self.config.fleet:
                raise RejectedMessage(Reason.FIELD, f"candidate is for fleet {candidate.fleet!r}")
            if not candidate.is_candidate:
                raise RejectedMessage(Reason.ROLE, f"v{candidate.version} on the canary topic is a release, not a candidate")
            if self.trust is not None:
                self.trust.verify(*(candidate.signed_by or (None, None, None)))
        except RejectedMessage as exc:
            self.counters["candidates_rejected"] += 1
            log.warning("%s: rejected canary candidate: %s", self.device, exc)
            return None
        baseline = self.model
        if self.device not in candidate.cohort or baseline is None or candidate.version <= baseline.version:
            return None
        accuracy, loss, examples = self.evaluate(candidate)
        base_accuracy, base_loss, _ = self.evaluate(baseline)
        self.counters["candidates_evaluated"] += 1
        log.info("%s: candidate v%d accuracy %.4f on local data (installed v%d: %.4f)", self.device, candidate.version,
                 accuracy, baseline.version, base_accuracy)
        return {"version": float(candidate.version), "accuracy": accuracy, "loss": loss, "examples": float(examples),
                "baseline_version": float(baseline.version), "baseline_accuracy": base_accuracy, "baseline_loss": base_loss}

    async def _on_candidate(self, payload: bytes) -> None:
        try:
            report = await asyncio.to_thread(self.evaluate_candidate, payload)
        except (DataError, BackendError) as exc:
            log.error("%s: cannot evaluate the canary candidate: %s", self.device, exc)
            return
        if report is not None:
            self._set_evaluation(report)

    def train_once(self, model: ModelMessage) -> tuple[UpdateMessage, bytes]:
        """Train on local data from ``model`` and build the update (blocking: run it in a thread)."""
        if self.backend is None:
            raise BackendError(self._backend_error)
        raw_x, y = self.dataset()
        x = self.features(model, raw_x)
        if x.shape[1] != model.arch.inputs or int(y.max()) >= model.arch.classes:
            raise DataError(
                f"local data{' embedded by the backbone' if model.backbone else ''} has {x.shape[1]} features and labels up to {int(y.max())}, but model v{model.version} "
                f"takes {model.arch.inputs} inputs and {model.arch.classes} classes"
            )
        task = model.task
        seed_text = f"{self.config.seed or self.device}/{model.version}"
        seed = int.from_bytes(hashlib.sha256(seed_text.encode()).digest()[:8], "little")
        result = self.backend.train(model.params, model.arch, x, y, epochs=task.epochs, batch_size=task.batch_size,
                                    lr=task.lr, seed=seed)
        delta = {name: result.params[name] - model.params[name] for name in model.params}
        codec = get_codec(task.codec)
        if task.codec == "fp32":
            wire = codec.encode(delta)
        else:
            compensated = self.error_feedback.compensate(delta)
            wire = codec.encode(compensated)
            self.error_feedback.update(compensated, codec.decode(wire, model.arch.param_shapes()))
            self.error_feedback.save(self.state_dir / RESIDUAL_FILE)
        update = UpdateMessage(
            device=self.device, update_id=f"v{model.version}-{uuid.uuid4().hex[:12]}", base_version=model.version,
            num_examples=result.num_examples, codec=task.codec, tensors=wire,
            metrics={"loss": result.loss, "accuracy": result.accuracy, **self._evaluation_metrics(model)},
            created=time.time(),
        )
        return update, update.encode()

    # -- I/O --------------------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event | None = None) -> None:
        self._stop = stop = stop or asyncio.Event()
        self.metrics.serve_or_log(self.config.metrics_host, self.config.metrics_port, self.device)
        notifier = Notifier.from_env()
        notifier.ready(f"model v{self.model_version}")
        watchdog = asyncio.create_task(watchdog_loop(notifier, stop), name=f"{self.device}-watchdog")
        self._write_wake = asyncio.Event()
        writer = asyncio.create_task(self._write_models_forever(), name=f"{self.device}-writer")
        trainer = asyncio.create_task(self._train_forever(), name=f"{self.device}-trainer")
        if self.model is not None:
            self._model_changed.set()
        offline = DeviceStatus(device=self.device, state="offline", software=__version__).encode()
        try:
            await run_connected(
                self.config.broker, self._session, identifier=self.device, stop=stop,
                will=lambda: aiomqtt.Will(topics.status_topic(self.config.fleet, self.device), offline, qos=1, retain=True),
            )
        finally:
            notifier.stopping()
            await cancel_tasks([trainer, watchdog, writer])
            await self._finish_writes()
            self.metrics.close()
            if self._training is not None:
                # a thread cannot be cancelled: let the training in hand finish its writes first
                await asyncio.wait([self._training], timeout=TRAINING_EXIT_TIMEOUT_S)
                if self._training.done() and not self._training.cancelled():
                    self._training.exception()  # read, so that a failure is not reported as unretrieved

    async def _session(self, client: aiomqtt.Client, protocol: str) -> None:
        fleet = self.config.fleet
        self._client = client
        await client.subscribe(topics.model_topic(fleet), qos=1)
        await client.subscribe(topics.receipt_topic(fleet, self.device), qos=1)
        await client.subscribe(topics.command_topic(fleet, self.device), qos=1)
        await client.subscribe(topics.broadcast_command_topic(fleet), qos=1)
        await client.subscribe(topics.freeze_topic(fleet, self.device), qos=1)
        await client.subscribe(topics.broadcast_freeze_topic(fleet), qos=1)
        await client.subscribe(topics.canary_topic(fleet), qos=1)
        await self._fetch_artifact_if_missing(client)
        await self.publish_status(client)
        self.outbox.reset_schedule()
        sender = asyncio.create_task(self._send_outbox(client), name=f"{self.device}-sender")
        stop_wait = asyncio.create_task(self._stop.wait(), name=f"{self.device}-stop")
        consume = asyncio.create_task(self._consume(client), name=f"{self.device}-consume")
        status = asyncio.create_task(self._publish_status_changes(client), name=f"{self.device}-status")
        tasks = [sender, stop_wait, consume, status]
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            self._client = None
            await cancel_tasks(tasks)
        raise_first_failure(tasks)
        await client.publish(topics.status_topic(fleet, self.device), self.status("offline").encode(), qos=1, retain=True)

    async def _fetch_artifact_if_missing(self, client: aiomqtt.Client) -> None:
        ref = self.model.backbone if self.model else None
        if ref is not None and self.artifact(ref) is None:
            log.info("%s: fetching backbone artifact %s (%d bytes)", self.device, ref.sha256, ref.size)
            await client.subscribe(topics.artifact_topic(self.config.fleet, ref.sha256), qos=1)

    async def _publish_status_changes(self, client: aiomqtt.Client) -> None:
        while not self._stop.is_set():
            await self._status_dirty.wait()
            self._status_dirty.clear()
            await self.publish_status(client)

    def update_metrics(self) -> None:
        self.metrics.update(self.counters, model_version=self.model_version, paused=self.paused)

    async def publish_status(self, client: aiomqtt.Client) -> None:
        self.update_metrics()
        payload = self.status().encode()
        await client.publish(topics.status_topic(self.config.fleet, self.device), payload, qos=1, retain=True)

    async def _consume(self, client: aiomqtt.Client) -> None:
        fleet = self.config.fleet
        model_filter = topics.model_topic(fleet)
        artifact_filter = topics.artifacts_filter(fleet)
        receipt_topic = topics.receipt_topic(fleet, self.device)
        canary_topic = topics.canary_topic(fleet)
        broadcast_topics = (topics.broadcast_command_topic(fleet), topics.broadcast_freeze_topic(fleet))
        freeze_topics = (topics.freeze_topic(fleet, self.device), topics.broadcast_freeze_topic(fleet))
        async for message in client.messages:
            payload = message.payload if isinstance(message.payload, bytes | bytearray) else b""
            self.counters["bytes_received"] += len(payload)
            if message.topic.matches(model_filter):
                self._on_model(payload)
                self._status_dirty.set()
                await self._fetch_artifact_if_missing(client)
            elif message.topic.matches(artifact_filter):
                sha256 = str(message.topic).rsplit("/", 1)[-1]
                if self.store_artifact(sha256, payload):
                    await client.unsubscribe(str(message.topic))  # retained and large: once is enough
                self._status_dirty.set()
            elif message.topic.matches(receipt_topic):
                self._on_receipt(payload)
            elif message.topic.matches(canary_topic):
                if payload:  # empty: the candidate was decided and cleared
                    task = asyncio.create_task(self._on_candidate(bytes(payload)), name=f"{self.device}-canary")
                    self._evaluating.add(task)
                    task.add_done_callback(self._evaluating.discard)
            elif payload:  # cmd/{device|all}[/freeze]; an empty payload only clears the retained command
                target = "all" if any(message.topic.matches(t) for t in broadcast_topics) else self.device
                setting = "freeze" if any(message.topic.matches(t) for t in freeze_topics) else "pause"
                self.apply_command(payload, target, setting=setting)
                self._status_dirty.set()

    def _on_model(self, payload: bytes) -> None:
        try:
            model = self.install(payload)
        except RejectedMessage as exc:
            if isinstance(exc, AlreadyInstalled):
                log.debug("%s: %s", self.device, exc)  # the retained model again after a reconnect
                return
            self.counters[f"models_rejected_{exc.reason.value}"] += 1
            if exc.reason is Reason.FROZEN:
                self._held_by_freeze = bytes(payload)
            self.detail = f"rejected model: {exc}"
            log.warning("%s: rejected model: %s", self.device, exc)
            return
        self.detail = ""
        log.info("%s: installed model v%d", self.device, model.version)
        self._model_changed.set()

    def _on_receipt(self, payload: bytes) -> None:
        try:
            receipt: Receipt = decode_message(payload, max_bytes=64 * 1024, expect=Receipt)
        except RejectedMessage as exc:
            log.warning("%s: unreadable receipt: %s", self.device, exc)
            return
        if not receipt.final:
            # not now (rate_limited): the update stays in the outbox and goes again when asked
            if self.outbox.retry_after(receipt.update_id, receipt.retry_after_s):
                self.counters[f"deferred_{receipt.reason}"] += 1
                log.debug("%s: update %s deferred %.2f s (%s)", self.device, receipt.update_id, receipt.retry_after_s,
                          receipt.reason)
            return
        known = self.outbox.forget(receipt.update_id)
        if known:
            asyncio.get_running_loop().run_in_executor(None, self.outbox.delete_file, receipt.update_id)
        self._receipt_arrived.set()
        if receipt.status == "accepted":
            self.counters["accepted"] += 1
            log.info("%s: update %s accepted", self.device, receipt.update_id)
        elif receipt.reason == Reason.DUPLICATE.value:
            # already counted once by the aggregator: the receipt of the first copy was lost
            self.counters["duplicate_receipts"] += 1
        else:
            self.counters["rejected"] += 1
            self.counters[f"rejected_{receipt.reason}"] += 1
            log.warning("%s: update %s rejected (%s): %s", self.device, receipt.update_id, receipt.reason, receipt.detail)
        if not known:
            log.debug("%s: receipt for unknown update %s", self.device, receipt.update_id)

    async def _train_forever(self) -> None:
        trained_version = 0
        while True:
            await self._model_changed.wait()
            self._model_changed.clear()
            model = self.model
            if model is None or model.version <= trained_version or self.paused:
                continue  # a resume sets _model_changed again
            if model.task.mode == "async" and len(self.outbox):
                # one update in flight per device (FedBuff's concurrency): a device that outpaces
                # the aggregator would otherwise queue updates that are stale on arrival
                self._receipt_arrived.clear()
                try:
                    async with asyncio.timeout(1.0):
                        await self._receipt_arrived.wait()
                except TimeoutError:
                    pass
                self._model_changed.set()  # look again, at the newest model
                continue
            if model.backbone is not None and self.artifact(model.backbone) is None:
                self._artifact_arrived.clear()
                await self._artifact_arrived.wait()
                self._model_changed.set()  # look again: a newer model may have come meanwhile
                continue
            try:
                # evaluated on local data before training on it (the status reports it)
                self._set_evaluation(await asyncio.to_thread(self.evaluation_of, model))
                started = time.monotonic()
                # shielded: cancelling the trainer must not abandon a thread that is writing state
                self._training = asyncio.get_running_loop().run_in_executor(None, self.train_once, model)
                update, payload = await asyncio.shield(self._training)
                if self.config.slowdown > 1.0:
                    # a simulated straggler: as if this device's CPU were `slowdown` times slower
                    await sleep_or_stop(self._stop, (self.config.slowdown - 1.0) * (time.monotonic() - started))
            except Exception as exc:  # noqa: BLE001 - the trainer must outlive any one failure
                # reported on the status topic; the agent keeps serving and waits for the next model
                self.detail = f"training v{model.version} failed: {exc}"
                self.counters["training_errors"] += 1
                if isinstance(exc, DataError | BackendError | RejectedMessage):
                    log.error("%s: cannot train v%d: %s", self.device, model.version, exc)
                else:
                    log.exception("%s: training v%d failed", self.device, model.version)
                trained_version = model.version
                self._status_dirty.set()
                continue
            trained_version = model.version
            if not self.still_wanted(model.version):
                self.counters["updates_superseded"] += 1
                log.info("%s: v%d arrived while training on v%d; discarding that update", self.device,
                         self.model_version, model.version)
                self._return_to_residual(payload)
                self._model_changed.set()
                continue
            await asyncio.to_thread(self.outbox.store, update, payload)  # fsync off the event loop
            self.outbox.register(update, payload)
            self.counters["updates_trained"] += 1
            if self.detail.startswith("training"):
                self.detail = ""
                self._status_dirty.set()
            self._outbox_changed.set()

    async def _send_outbox(self, client: aiomqtt.Client) -> None:
        # loops on the stop flag as well as on cancellation: aiomqtt's publish() waits with
        # asyncio.wait_for, which can swallow a cancellation on Python 3.11
        while not self._stop.is_set():
            self._outbox_changed.clear()
            for entry in self.outbox.due():
                await client.publish(topics.update_topic(self.config.fleet, self.device), entry.payload, qos=1)
                self.outbox.sent(entry, self.config.resend_after_s)  # backs off between re-sends
                self.counters["updates_sent"] += 1
                self.counters["bytes_sent"] += len(entry.payload)
            self.update_metrics()
            try:
                async with asyncio.timeout(1.0):  # not wait_for: it can swallow a cancellation in 3.11
                    await self._outbox_changed.wait()
            except TimeoutError:
                pass
