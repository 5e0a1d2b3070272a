"""The aggregator daemon: the thin I/O shell around rounds, strategies and the registry.

It keeps one MQTT connection (reconnecting with backoff), publishes the current model retained,
checks every update, answers each with a receipt, closes rounds and publishes the next version.
A bad update is counted and answered, never fatal.
"""

from __future__ import annotations

import asyncio
import gc
import hashlib
import io
import json
import logging
import time
from collections import Counter, OrderedDict
from dataclasses import replace
from pathlib import Path
from typing import Any

import aiomqtt
import numpy as np

from fedmq import __version__
from fedmq.broker import topics
from fedmq.broker.errors import ConfigError, Reason, RejectedMessage
from fedmq.broker.files import write_atomic
from fedmq.broker.messages import AggregatorStatus, BackboneRef, DeviceStatus, ModelMessage, Receipt, decode_message
from fedmq.broker.sdnotify import Notifier, watchdog_loop
from fedmq.broker.session import cancel_tasks, raise_first_failure, run_connected
from fedmq.broker.signing import SigningKey, load_public_key
from fedmq.broker.zerocopy import zero_copy

from . import fold
from .config import AggregatorConfig
from .influence import InfluenceHistory
from .intake import DeviceRateLimit, check_update, decode_update, retry_after, salvage_update_id
from .journal import JournalError, UpdateJournal
from .metrics import AggregatorMetrics
from .ops import OpsService
from .receipts import ReceiptSender
from .registry import ModelRegistry, RegistryError, VersionRecord
from .robust import make_accumulator
from .rollout import Canary, Decision
from .rounds import AsyncBuffer, RoundPolicy, SyncRound
from .strategy import WeightedMean

log = logging.getLogger(__name__)

#: Seconds a receipt may wait for its PUBACK while nothing at all comes from the broker before the
#: connection is treated as dead (ten times as long while other data keeps coming: a PUBACK may
#: queue behind a backlog of updates on a slow link).
RECEIPT_TIMEOUT_S = 3.0

#: Most updates and bytes one ingest batch takes (bounds the payloads held at once).
MAX_BATCH = 16
MAX_BATCH_BYTES = 32 * 1024 * 1024

#: An update taken off the connection: (device, payload).
Incoming = tuple[str, bytes]

#: Receipts sent but not yet acknowledged by the broker, at most.
MAX_RECEIPTS_IN_FLIGHT = 64

#: Seconds between status messages while counters change within a round.
STATUS_INTERVAL_S = 5.0

#: How many recently accepted (device, update id) pairs are remembered for de-duplication.
DEDUP_WINDOW = 200_000

#: How many devices the per-device statistics hold.
DEVICE_STATS_LIMIT = 100_000


class Aggregator:
    """Synchronous FedAvg over MQTT. ``await Aggregator(config).run(stop)`` until ``stop`` is set."""

    def __init__(self, config: AggregatorConfig) -> None:
        self.config = config
        self.counters: Counter[str] = Counter()
        self.registry = ModelRegistry(config.state_dir)
        self.optimizer = config.make_optimizer()
        self._shapes = config.arch.param_shapes()
        self._lock = asyncio.Lock()
        self._seen: OrderedDict[tuple[str, str], int] = OrderedDict()
        # per device since start: accepted, rejected, last_update (unix time) - for `fedmq fleet status`
        self.device_stats: dict[str, Counter[str]] = {}
        self.devices_online: set[str] = set()  # from the devices' retained status topics
        self.metrics = AggregatorMetrics()
        self._started = time.time()
        self._stop: asyncio.Event | None = None
        self._deadline_warned = False
        self._status_published_at = 0.0
        self._status_counters: Counter[str] = Counter()
        self.signer = SigningKey.from_file(config.signing_key) if config.signing_key else None
        self.next_key = load_public_key(config.next_public_key) if config.next_public_key else None
        # staged rollout: the candidate under evaluation by its cohort (aggregator/rollout.py)
        self.canary: Canary | None = None
        self.canary_payload = b""
        self._canary_params: dict[str, np.ndarray] = {}
        self._baseline_optimizer: dict[str, np.ndarray] | None = None
        self._stored_canary: VersionRecord | None = None
        self.model, self.model_payload = self._load_or_create_model()
        self._load_optimizer_state()
        self.history = self._load_history()
        self.rate_limit = DeviceRateLimit(config.limits.per_second, config.limits.burst, max_devices=DEVICE_STATS_LIMIT)
        self.journal = UpdateJournal(config.state_dir / "journal")
        self.round = self._open_round()
        self._replay_journal()
        if self._stored_canary is not None:
            self._resume_canary(self._stored_canary)
        self.ops = OpsService(self)
        self._ops_tasks: set[asyncio.Task[None]] = set()

    # -- state ------------------------------------------------------------------------------------

    def _load_or_create_model(self) -> tuple[ModelMessage, bytes]:
        record = self.registry.latest()
        if record is None:
            backbone = self._store_backbone() if self.config.backbone else None
            model = ModelMessage(
                fleet=self.config.fleet, version=1, parent=0, arch=self.config.arch, task=self.config.task,
                params=self.config.arch.init_params(self.config.seed), created=time.time(), backbone=backbone,
                next_key=self.next_key,
            )
            payload = model.encode(self.signer)
            self.registry.add(1, 0, payload, {"initial": True, "seed": self.config.seed})
            log.info("created initial model v1 (%s, %d parameters) in %s", self.config.arch.widths,
                     self.config.arch.num_params(), self.config.state_dir)
            return model, payload
        if record.info.get("stage") == "canary":
            # stopped during a staged rollout: the fleet runs the candidate's parent; the canary resumes
            self._stored_canary = record
            baseline = self.registry.get(record.parent)
            if baseline is None:
                raise RegistryError(f"candidate v{record.version} names v{record.parent}, which the registry lacks")
            record = baseline
        payload = self.registry.load_payload(record)
        model = decode_message(payload, max_bytes=len(payload), expect=ModelMessage)
        if model.arch != self.config.arch or model.fleet != self.config.fleet:
            raise ConfigError(
                f"the registry in {self.config.state_dir} holds fleet {model.fleet!r} with architecture "
                f"{model.arch.widths}, but the config asks for fleet {self.config.fleet!r} with "
                f"{self.config.arch.widths}; use another state_dir for a new model"
            )
        if model.task != self.config.task:
            # the task is part of the published model: changing it takes effect from the next version
            log.info("task settings changed; they apply from version %d on", model.version + 1)
        if model.backbone is not None:
            self.artifact_payload(model.backbone)  # fail now, not when the first device asks
        if self.signer is not None and (model.signed_by is None or model.signed_by[2].get("key") != self.signer.key_id
                                        or model.next_key != self.next_key):
            # signing was switched on or the key rotated since this version was stored: publish it
            # signed with the current key (same version, same weights)
            model = replace(model, next_key=self.next_key, signed_by=None)
            payload = model.encode(self.signer)
            log.info("re-signed stored model v%d with key %s", model.version, self.signer.key_id)
        log.info("resuming from model v%d in %s", model.version, self.config.state_dir)
        return model, payload

    def _store_backbone(self) -> BackboneRef:
        """Copy the configured backbone into the state directory (so the registry does not depend
        on the original file) and return its reference."""
        assert self.config.backbone is not None
        try:
            data = Path(self.config.backbone).read_bytes()
        except OSError as exc:
            raise ConfigError(f"cannot read the backbone: {exc}", key="model.backbone") from None
        ref = BackboneRef(hashlib.sha256(data).hexdigest(), len(data))
        directory = self.config.state_dir / "artifacts"
        directory.mkdir(parents=True, exist_ok=True)
        write_atomic(directory / f"{ref.sha256}.onnx", data)
        log.info("backbone %s (%d bytes) will be published as artifact %s", self.config.backbone, ref.size, ref.sha256)
        return ref

    def artifact_payload(self, ref: BackboneRef) -> bytes:
        path = self.config.state_dir / "artifacts" / f"{ref.sha256}.onnx"
        try:
            data = path.read_bytes()
        except OSError:
            raise RegistryError(f"backbone artifact {path} of the current model is missing") from None
        if hashlib.sha256(data).hexdigest() != ref.sha256:
            raise RegistryError(f"backbone artifact {path} is corrupt (sha256 mismatch)")
        return data

    def _optimizer_path(self, version: int) -> Path:
        return self.config.state_dir / "optimizer" / f"v{version:08d}.npz"

    def _save_optimizer_state(self, version: int) -> None:
        path = self._optimizer_path(version)
        path.parent.mkdir(parents=True, exist_ok=True)
        buffer = io.BytesIO()
        np.savez(buffer, **self.optimizer.state())
        write_atomic(path, buffer.getvalue())

    def _load_optimizer_state(self) -> None:
        path = self._optimizer_path(self.model.version)
        if self.optimizer.name != "sgd" and path.exists():
            with np.load(path, allow_pickle=False) as data:
                self.optimizer.load_state({k: data[k] for k in data.files})
            log.info("%s state restored for v%d", self.optimizer.name, self.model.version)

    def _history_path(self) -> Path:
        return self.config.state_dir / "influence.json"

    def _load_history(self) -> InfluenceHistory:
        """The weights and norms of the fleet's recent accepted updates (they bound every round)."""
        try:
            data = json.loads(self._history_path().read_text())
            latest = self.registry.latest()  # (a staged candidate is stored although the fleet runs its parent)
            if data.get("version", 0) > (latest.version if latest else 0):
                # stopped between storing the history and the registry row of that version: the
                # round resumes from the journal, so it gets the bounds it had
                data = data.get("before", {})
            return InfluenceHistory.from_json(data)
        except FileNotFoundError:
            return InfluenceHistory()
        except (OSError, ValueError, TypeError, AttributeError) as exc:
            log.warning("ignoring unreadable %s (%s); the bounds start from the model's own norm again",
                        self._history_path(), exc)
            return InfluenceHistory()

    def _save_history(self, version: int, history: InfluenceHistory) -> None:
        # with the version, before its registry row; the history before it too, for a restart
        # that finds no registry row for ``version`` (see _load_history)
        write_atomic(self._history_path(), json.dumps({"version": version, **history.to_json(),
                                                       "before": self.history.to_json()}).encode())

    def _open_round(self) -> SyncRound | AsyncBuffer:
        self._deadline_warned = False
        bounds = self.history.bounds(self.config.influence_settings, self.model.params)
        accumulator: Any
        if self.config.strategy == "fedavg":
            # the norm bound folds into the streaming mean itself (one pass per update, as without it)
            accumulator = WeightedMean(self._shapes, max_norm=bounds.max_norm, norm_mode=self.config.norm_mode)
        else:
            # one update per device and the round closes at target_updates: the buffer never overflows
            options: dict[str, Any] = {"max_updates": self.config.policy.target_updates}
            if self.config.strategy == "trimmed_mean":
                options["trim_fraction"] = self.config.trim_fraction
            if self.config.robust_weighted:
                options["weighted"] = True
            if bounds.max_norm is not None:
                options.update(max_norm=bounds.max_norm, norm_mode=self.config.norm_mode)
            accumulator = make_accumulator(self.config.strategy, self._shapes, **options)
        if self.config.task.mode == "async":
            policy = RoundPolicy(min_updates=self.config.policy.min_updates, target_updates=self.config.buffer_size,
                                 deadline_s=self.config.policy.deadline_s)
            return AsyncBuffer(self.model.version, self._shapes, policy, opened_at=time.time(),
                               max_staleness=self.config.task.max_staleness, weight=self.config.staleness,
                               accumulator=accumulator, bounds=bounds)
        return SyncRound(self.model.version, self._shapes, self.config.policy, opened_at=time.time(),
                         accumulator=accumulator, bounds=bounds)

    def _replay_journal(self) -> None:
        """Rebuild the open round and the de-duplication memory from the journal after a restart."""
        records = self.journal.open_round(self.model.version)
        if records and self.round.checks_values:
            # fold as the live daemon did: with the kernel compiled, small tensors are folded (and
            # their sums of squares, which set a clipped delta's weight, taken) by it too
            fold.warm_up(max((int(np.prod(shape)) for shape in self._shapes.values()), default=0))
        for _, closed in self.journal.closed_rounds():
            for device, payload in closed:
                try:
                    self._remember((device, decode_update(payload, max_bytes=len(payload) + 1).update_id))
                except RejectedMessage:
                    log.warning("journal holds an unreadable update from %s; skipped", device)
        for device, payload in records:
            update = decode_update(payload, max_bytes=len(payload) + 1)
            self._remember((device, update.update_id))
            try:
                delta = check_update(update, topic_device=device, shapes=self._shapes, codec=update.codec,
                                     check_values=not self.round.checks_values)
                self.round.add(update, delta, len(payload))
            except RejectedMessage as exc:
                # only after a configuration change (a lower norm bound, another strategy) between restarts
                self.counters["replay_refused"] += 1
                log.error("journaled update %s from %s no longer passes the round's checks (%s); it is not counted",
                          update.update_id, device, exc)
        if records:
            self.counters["replayed"] += len(records)
            log.info("round for v%d resumed from the journal with %d accepted update(s)", self.model.version, len(records))

    def status(self, state: str = "online") -> AggregatorStatus:
        counters = {k: float(v) for k, v in sorted(self.counters.items())}
        counters["round_updates"] = float(self.round.count)
        return AggregatorStatus(state=state, model_version=self.model.version, mode=self.config.task.mode,  # type: ignore[arg-type]
                                software=__version__, since=self._started, counters=counters)

    @property
    def done(self) -> bool:
        return 0 < self.config.max_rounds <= self.model.version - 1

    # -- I/O --------------------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event | None = None) -> None:
        """Serve until ``stop`` is set (or ``max_rounds`` rounds are done), then publish offline."""
        self._stop = stop = stop or asyncio.Event()
        fleet = self.config.fleet
        offline = AggregatorStatus(state="offline", model_version=0, software=__version__).encode()
        self.metrics.serve_or_log(self.config.metrics_host, self.config.metrics_port, self.config.client_id)
        notifier = Notifier.from_env()
        if self.round.checks_values:  # compile the fold kernel now, not on the first update
            largest = max((int(np.prod(shape)) for shape in self._shapes.values()), default=0)
            log.info("fold kernel: %s", await asyncio.to_thread(fold.warm_up, largest))
        # the modules and the compiled kernel live as long as the process: keep them out of every
        # later garbage collection (numba alone brings ~10^5 objects that each full pass would scan)
        gc.collect()
        gc.freeze()
        # READY once the state is loaded: a broker that is down at boot is a reconnect loop, not a failed start
        notifier.ready(f"serving model v{self.model.version}")
        watchdog = asyncio.create_task(watchdog_loop(notifier, stop), name="watchdog")
        try:
            await run_connected(
                self.config.broker, self._session, identifier=self.config.client_id, stop=stop,
                will=lambda: aiomqtt.Will(topics.aggregator_status_topic(fleet), offline, qos=1, retain=True),
                persistent_session=True,
            )
        finally:
            notifier.stopping()
            await cancel_tasks([watchdog])
            self.metrics.close()
            self.journal.close()
            self.registry.close()

    def update_metrics(self) -> None:
        self.metrics.update(self.counters, model_version=self.model.version, devices_online=len(self.devices_online),
                            buffered_updates=self.round.count)

    async def _session(self, client: aiomqtt.Client, protocol: str) -> None:
        fleet = self.config.fleet
        assert self._stop is not None
        zero_copy(client)  # updates arrive as paho's receive buffers, not four copies of them
        await client.subscribe(topics.updates_filter(fleet), qos=1)
        await client.subscribe(topics.ops_requests_filter(fleet), qos=1)
        await client.subscribe(topics.statuses_filter(fleet), qos=1)  # who is online, for metrics and ops
        if self.model.backbone is not None:
            # before the model that names it, so a device never waits for an artifact that is not there
            await client.publish(topics.artifact_topic(fleet, self.model.backbone.sha256),
                                 self.artifact_payload(self.model.backbone), qos=1, retain=True)
        await client.publish(topics.model_topic(fleet), self.model_payload, qos=1, retain=True)
        self.counters["bytes_out"] += len(self.model_payload)
        if self.canary is not None:
            await client.publish(topics.canary_topic(fleet), self.canary_payload, qos=1, retain=True)
        await self._publish_status(client)
        if self.done:
            # max_rounds reached (perhaps before a crash that came between storing and publishing
            # the last version): the model is out now; take no more updates, answer none
            log.info("max_rounds (%d) reached at v%d; stopping", self.config.max_rounds, self.model.version)
            self._stop.set()
            await client.publish(topics.aggregator_status_topic(fleet), self.status("offline").encode(), qos=1, retain=True)
            return
        receipts = ReceiptSender(client, limit=MAX_RECEIPTS_IN_FLIGHT, timeout=RECEIPT_TIMEOUT_S)
        tasks = [
            asyncio.create_task(self._consume(client, receipts), name="consume"),
            asyncio.create_task(receipts.watch(), name="receipts"),  # a dead broker ends the session
            asyncio.create_task(self._watch_deadline(client), name="deadline"),
            asyncio.create_task(self._stop.wait(), name="stop"),
        ]
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            await cancel_tasks([*tasks, *self._ops_tasks])
            # a graceful stop gives the receipts already sent their PUBACK wait (else a device
            # never hears that its last update counted, and sends it again); a failure does not
            graceful = not any(t.done() and not t.cancelled() and t.exception() for t in tasks)
            try:
                unanswered = await receipts.settle(RECEIPT_TIMEOUT_S if graceful else 0.0)
            finally:
                receipts.close()
            if unanswered:
                log.warning("%d receipt(s) got no PUBACK before the connection ended; their devices "
                            "re-send and are answered 'duplicate'", unanswered)
        raise_first_failure(tasks)
        # graceful stop: say so before the connection closes (the Will covers crashes only)
        async with self._lock:
            await client.publish(topics.aggregator_status_topic(fleet), self.status("offline").encode(), qos=1, retain=True)
        log.info("aggregator stopped at v%d; counters %s", self.model.version, dict(self.counters))

    async def _publish_status(self, client: aiomqtt.Client) -> None:
        self.update_metrics()
        self._status_published_at = time.time()
        self._status_counters = self.counters.copy()
        await client.publish(topics.aggregator_status_topic(self.config.fleet), self.status().encode(), qos=1, retain=True)

    async def _consume(self, client: aiomqtt.Client, receipts: ReceiptSender) -> None:
        """Ingest updates in batches, in a worker thread, with one journal fsync per batch.

        A batch is the updates already received (at most MAX_BATCH or MAX_BATCH_BYTES). The event
        loop goes on reading the socket while the batch is checked, journaled and folded (the fold
        kernel, the CRC and the disk release the GIL). Receipts go out once their batch is durable;
        they are not waited for one by one: at most MAX_RECEIPTS_IN_FLIGHT wait for their PUBACK,
        and an overdue one (a dead broker, see :mod:`.receipts`) ends the session.
        """
        messages = client.messages
        pending: list[Incoming] = []
        while True:
            if not pending:
                self._take(client, await anext(messages), pending)
            while len(messages) and len(pending) < MAX_BATCH and sum(len(p) for _, p in pending) < MAX_BATCH_BYTES:
                self._take(client, await anext(messages), pending)  # already received: no waiting
            if not pending:
                continue
            async with self._lock:
                batch = pending
                batch_receipts, pending = await self._ingest_in_thread(batch)
                log.debug("ingested a batch of %d update(s), %d left for the next round, %d queued", len(batch) - len(pending), len(pending), len(messages))
                for receipt in batch_receipts:
                    # queued in paho in this order, before anything published later: the receipts
                    # of a round-closing batch reach the devices before the next model does (a
                    # device drops what it still holds for an older version)
                    encoded = receipt.encode()
                    receipts.send(topics.receipt_topic(self.config.fleet, receipt.device), encoded)
                    self.counters["bytes_out"] += len(encoded)
                await receipts.room()  # raises once a receipt is overdue: the broker is gone
                if self.canary is None and self.round.ready(time.time()):
                    await self._close_round(client)

    def _take(self, client: aiomqtt.Client, message: aiomqtt.Message, updates: list[Incoming]) -> None:
        """Append an update to ``updates``; handle any other message at once."""
        try:
            parsed = topics.parse_topic(str(message.topic))
        except topics.TopicError:
            parsed = None
        if parsed is not None and parsed.kind == "update" and parsed.fleet == self.config.fleet and parsed.device:
            if not message.payload:
                return  # an empty payload deletes a retained update (ours, below): nothing to answer
            updates.append((parsed.device, message.payload if isinstance(message.payload, bytes | bytearray) else b""))
            if message.retain and message.payload:
                # agents never retain an update: one parked on the broker would come back at every
                # subscription (and to anyone allowed to read it); answered as usual, then deleted
                self._clear_retained(client, str(message.topic), parsed.device, "update", len(message.payload))
            return
        if parsed is not None and parsed.kind == "ops_request" and parsed.fleet == self.config.fleet:
            task = asyncio.create_task(self.ops.handle(client, message), name="ops")
            self._ops_tasks.add(task)
            task.add_done_callback(self._ops_tasks.discard)
        elif parsed is not None and parsed.kind == "status" and parsed.fleet == self.config.fleet and parsed.device:
            size = len(message.payload) if isinstance(message.payload, bytes | bytearray) else 0
            if size > self.config.limits.max_status_bytes:
                self.devices_online.discard(parsed.device)
                self._clear_retained(client, str(message.topic), parsed.device, "status", size)
                return
            self._on_device_status(parsed.device, message.payload)
            self.ops.observe_status(parsed.device, message.payload, retained=message.retain)
        else:
            self.counters["ignored"] += 1
            log.warning("ignoring message on unexpected topic %s", message.topic)

    def _clear_retained(self, client: aiomqtt.Client, topic: str, device: str, what: str, size: int) -> None:
        """A device parked a message on the broker that every reader gets: an oversized status
        (over ``[limits] max_status_bytes``) or a retained update. Replace it with an empty
        retained message, which deletes it. The broker has no per-topic size limit and no way to
        forbid the retain flag (``max_packet_size`` must fit the model), so the aggregator
        enforces these."""
        counter = {"status": "statuses_cleared", "update": "retained_updates_cleared"}[what]
        self.counters[counter] += 1
        self._device_stat(device, counter)
        log.warning("device %s retained a %s of %d bytes on %s; deleting it", device, what, size, topic)
        task = asyncio.create_task(client.publish(topic, b"", qos=1, retain=True), name=f"clear-{what}")
        self._ops_tasks.add(task)  # type: ignore[arg-type]

        def done(finished: asyncio.Task[Any]) -> None:
            self._ops_tasks.discard(finished)  # type: ignore[arg-type]
            if not finished.cancelled() and finished.exception() is not None:
                log.warning("could not delete the retained %s of %s: %s", what, device, finished.exception())

        task.add_done_callback(done)

    async def _ingest_in_thread(self, batch: list[Incoming]) -> tuple[list[Receipt], list[Incoming]]:
        """:meth:`_ingest_batch` in a worker thread; a cancellation first waits for the thread, so
        that no batch is still being ingested once the caller has released the lock."""
        work = asyncio.get_running_loop().run_in_executor(None, self._ingest_batch, batch)
        try:
            return await asyncio.shield(work)
        except asyncio.CancelledError:
            while not work.done():
                await asyncio.wait([work])
            raise

    def _ingest_batch(self, batch: list[Incoming]) -> tuple[list[Receipt], list[Incoming]]:
        """Ingest ``batch`` of (device, payload) under one journal group commit, stopping once the
        round is ready; return the receipts to send and the updates left for the next round.

        Every update the receipts accept is on disk when this returns. A failed group fsync raises
        JournalError, which ends the daemon: none of the batch is acknowledged, and a restart
        replays what reached the disk.
        """
        receipts: list[Receipt] = []
        with self.journal.group_commit():
            for index, (device, payload) in enumerate(batch):
                receipt = self.ingest(device, payload)
                if receipt is not None:
                    receipts.append(receipt)
                if self.canary is None and self.round.ready(time.time()):
                    return receipts, batch[index + 1:]
        return receipts, []

    def _on_device_status(self, device: str, payload: Any) -> None:
        try:
            status: DeviceStatus = decode_message(payload if isinstance(payload, bytes | bytearray) else b"",
                                                  max_bytes=self.config.limits.max_status_bytes, expect=DeviceStatus)
        except RejectedMessage:
            self.devices_online.discard(device)  # an empty payload clears a retained status: gone
            return
        if status.evaluation:
            self._on_evaluation(device, dict(status.evaluation))
        if status.state == "online" and len(self.devices_online) < DEVICE_STATS_LIMIT:
            self.devices_online.add(device)
        else:
            self.devices_online.discard(device)

    async def _watch_deadline(self, client: aiomqtt.Client) -> None:
        assert self._stop is not None
        # loops on the stop flag as well as on cancellation: aiomqtt's publish() waits with
        # asyncio.wait_for, which can swallow a cancellation on Python 3.11
        while not self._stop.is_set():
            wait = self.round.deadline - time.time()
            await asyncio.sleep(min(max(wait, 0.05), 1.0))
            async with self._lock:
                now = time.time()
                if self.canary is not None:
                    if self.decide_canary(now) is not None:
                        await self._publish_decision(client)
                elif self.round.ready(now):
                    await self._close_round(client)
                elif now >= self.round.deadline and not self._deadline_warned:
                    self._deadline_warned = True
                    log.warning("round for v%d passed its deadline with %d of min_updates=%d; waiting for more",
                                self.model.version, self.round.count, self.config.policy.min_updates)
                if now - self._status_published_at >= STATUS_INTERVAL_S and self.counters != self._status_counters:
                    await self._publish_status(client)  # live counters between rounds too
                else:
                    self.update_metrics()

    # -- the sans-IO steps the shell calls -------------------------------------------------------

    def ingest(self, device: str, payload: bytes, now: float | None = None) -> Receipt | None:
        """Check one update from ``device`` and fold it into the open round; return its receipt.

        Every update whose header can be read is answered with a receipt that names its
        ``update_id``; only ``rate_limited`` is transient (``retry_after_s``), every other
        rejection is final. None means "no answer": the update could not be made durable
        (journal error), so the device must keep it and send it again later. ``now`` is the
        monotonic clock (for the rate limit).
        """
        update_id = ""
        try:
            wait = self.rate_limit.take(device, time.monotonic() if now is None else now)
            if wait:
                update_id = salvage_update_id(payload)
                self.counters["rate_limited"] += 1
                self._device_stat(device, "rate_limited")
                log.debug("update %r from %s rate limited for %.2f s", update_id, device, wait)
                detail = (f"more than {self.config.limits.burst} updates at once or "
                          f"{self.config.limits.per_second:g} a second from this device")
                return Receipt(device, update_id, "rejected", self.model.version, Reason.RATE_LIMITED.value, detail,
                               retry_after_s=retry_after(wait))
            update = decode_update(payload, max_bytes=self.config.max_update_bytes)
            update_id = update.update_id  # from here on, receipts name the update they answer
            delta = check_update(update, topic_device=device, shapes=self._shapes, codec=self.config.task.codec,
                                 check_values=not self.round.checks_values)  # else checked as it is folded
            self.round.check_delta(update, delta)  # values, norm bound: before it is durable
            key = (device, update.update_id)
            if key in self._seen:
                self.counters["duplicates"] += 1
                raise RejectedMessage(Reason.DUPLICATE, f"update {update.update_id} was already accepted")
            try:
                self.round.check(update)
            except RejectedMessage as exc:
                if exc.reason is Reason.STALE:
                    self.counters["late"] += 1
                raise
            self.journal.append(device, payload)  # durable before the receipt says "accepted"
            self.round.add(update, delta, len(payload))
            self._remember(key)
        except JournalError as exc:
            self.counters["journal_errors"] += 1
            self._device_stat(device, "journal_errors")
            log.error("update %r from %s not accepted, no receipt sent: %s", update_id, device, exc)
            return None
        except RejectedMessage as exc:
            # refused before its fields were read (too large, a bad field): the receipt still names it
            update_id = update_id or salvage_update_id(payload)
            self.counters["rejected"] += 1
            self.counters[f"rejected_{exc.reason.value}"] += 1
            self._device_stat(device, "rejected")
            self._device_stat(device, f"rejected_{exc.reason.value}")  # why, for fleet status
            log.warning("rejected update %r from %s: %s", update_id, device, exc)
            return Receipt(device, update_id, "rejected", self.model.version, exc.reason.value, exc.detail)
        except Exception as exc:  # a bug must cost one update, not the daemon
            update_id = update_id or salvage_update_id(payload)
            self.counters["rejected"] += 1
            self.counters["rejected_internal"] += 1
            log.exception("internal error on update %r from %s", update_id, device)
            return Receipt(device, update_id, "rejected", self.model.version, Reason.INTERNAL.value, repr(exc)[:200])
        self.counters["accepted"] += 1
        self.counters["bytes_in"] += len(payload)
        self._device_stat(device, "accepted")
        log.debug("accepted update %s from %s (%d examples)", update.update_id, device, update.num_examples)
        return Receipt(device, update.update_id, "accepted", self.model.version)

    def _device_stat(self, device: str, key: str) -> None:
        if device not in self.device_stats and len(self.device_stats) >= DEVICE_STATS_LIMIT:
            return  # topic names are checked, but a flood of made-up device ids must not grow memory
        stats = self.device_stats.setdefault(device, Counter())
        stats[key] += 1
        stats["last_update"] = time.time()

    def _remember(self, key: tuple[str, str]) -> None:
        self._seen[key] = self.model.version
        while len(self._seen) > DEDUP_WINDOW:
            self._seen.popitem(last=False)

    def _next_version(self) -> int:
        latest = self.registry.latest()  # a rejected candidate's number is never reused
        return max(latest.version if latest else 0, self.model.version) + 1

    def _model_message(self, version: int, parent: int, params: dict[str, np.ndarray],
                       cohort: tuple[str, ...] | None = None) -> tuple[ModelMessage, bytes]:
        """A release, or with ``cohort`` (even an empty one) a staged candidate."""
        model = ModelMessage(fleet=self.config.fleet, version=version, parent=parent, arch=self.config.arch,
                             task=self.config.task, params=params, created=time.time(), backbone=self.model.backbone,
                             next_key=self.next_key, cohort=cohort or (),
                             stage="release" if cohort is None else "candidate")
        return model, model.encode(self.signer)

    def _make_current(self, params: dict[str, np.ndarray], info: dict[str, Any], *, parent: int | None = None,
                      history: InfluenceHistory | None = None) -> VersionRecord:
        """Store ``params`` as the next version, make it the fleet's model and open its round
        (with ``history``, the fleet's history with the closed round in it, from then on)."""
        history = self.history if history is None else history
        version = self._next_version()
        model, payload = self._model_message(version, self.model.version if parent is None else parent, params)
        if self.optimizer.name != "sgd":
            # with the version, before its registry row: a restart continues the same trajectory
            self._save_optimizer_state(version)
        self._save_history(version, history)
        record = self.registry.add(version, model.parent, payload, info)
        self.model, self.model_payload, self.history = model, payload, history
        # the old round is over (its result taken, or dropped): the new one reuses its buffers.
        # Safe because every change of round holds self._lock, as every ingest does
        self.round.release()
        self.round = self._open_round()
        self.journal.open_round(version)  # the registry row exists: the old round is closed for good
        self.journal.prune()
        return record

    def close_round(self) -> VersionRecord:
        """Average the round, step the model, store the new version and open the next round
        (with a staged rollout configured, the new version is a candidate for the cohort first)."""
        result = self.round.result()
        if self.config.rollout.enabled:
            self._baseline_optimizer = {k: np.array(v) for k, v in self.optimizer.state().items()}
        params = self.optimizer.step(self.model.params, result.mean_delta)
        info: dict[str, Any] = {
            "updates": result.num_updates, "examples": result.num_examples, "bytes_in": result.bytes_in,
            "round_seconds": round(time.time() - self.round.opened_at, 3), **self.round.bounds.to_info(),
            **result.metrics,
        }
        clipped = getattr(self.round.accumulator, "clipped", 0)
        if clipped:
            info["clipped"] = clipped
            self.counters["updates_clipped"] += clipped
        # kept once the version is stored: a failed store and its retry must not count the round twice
        history = self.history.with_round(result.applied)
        self.metrics.observe_round(info["round_seconds"])
        self.counters["rounds"] += 1
        if self.config.rollout.enabled:
            return self._stage(params, {**info, "source": "round"}, history)
        record = self._make_current(params, info, history=history)
        log.info("v%d published: %d updates, %d examples, train loss %.4f", record.version, result.num_updates,
                 result.num_examples, result.metrics.get("train_loss", float("nan")))
        return record

    # -- staged rollout ---------------------------------------------------------------------------

    def _stage(self, params: dict[str, np.ndarray], info: dict[str, Any],
               history: InfluenceHistory | None = None) -> VersionRecord:
        """Store ``params`` as a candidate and hand it to a cohort; the fleet stays on its model."""
        history = self.history if history is None else history
        version = self._next_version()
        cohort = self.config.rollout.choose_cohort(self.devices_online, version)
        model, payload = self._model_message(version, self.model.version, params, cohort)
        if self.optimizer.name != "sgd":
            self._save_optimizer_state(version)
        self._save_history(version, history)
        record = self.registry.add(version, self.model.version, payload, {**info, "stage": "canary", "cohort": list(cohort)})
        self.history = history
        self.canary = Canary(version, self.model.version, cohort, time.time())
        self.canary_payload, self._canary_params = payload, params
        self.round.release()
        self.round = self._open_round()  # held until the decision: the fleet keeps v{baseline}
        self.counters["rollouts_staged"] += 1
        log.info("v%d staged for a cohort of %d device(s) %s; the fleet stays on v%d until they evaluate it",
                 version, len(cohort), list(cohort)[:10], self.model.version)
        return record

    def _resume_canary(self, record: VersionRecord) -> None:
        payload = self.registry.load_payload(record)
        candidate: ModelMessage = decode_message(payload, max_bytes=len(payload), expect=ModelMessage)
        self.canary = Canary(record.version, record.parent, tuple(record.info.get("cohort", [])), time.time())
        self.canary_payload = payload
        self._canary_params = {k: np.array(v) for k, v in candidate.params.items()}
        log.info("resuming the staged rollout of v%d (cohort %s); its clock restarts now", record.version,
                 list(self.canary.cohort)[:10])

    def decide_canary(self, now: float) -> Decision | None:
        """Promote or roll back the candidate if its cohort has spoken (or the time is up)."""
        if self.canary is None:
            return None
        decision = self.canary.decide(now, self.config.rollout)
        if decision is None:
            return None
        canary, dropped = self.canary, self.round.count
        self.canary = None
        if decision.promote:
            record = self._make_current(self._canary_params, {"source": "promotion", "candidate": canary.candidate,
                                                              "updates": 0, "dropped_updates": dropped, **decision.info()},
                                        parent=canary.candidate)
            self.counters["rollouts_promoted"] += 1
            log.info("v%d promoted as v%d: %s", canary.candidate, record.version, decision.reason)
        else:
            if self._baseline_optimizer is not None:
                self.optimizer.load_state(self._baseline_optimizer)
            record = self._make_current({k: np.array(v) for k, v in self.model.params.items()},
                                        {"source": "rollback", "rollback_of": canary.baseline,
                                         "rejected_candidate": canary.candidate, "updates": 0,
                                         "dropped_updates": dropped, **decision.info()}, parent=canary.baseline)
            self.counters["rollouts_rolled_back"] += 1
            log.warning("v%d rolled back: %s; the fleet gets v%d's weights as v%d", canary.candidate, decision.reason,
                        canary.baseline, record.version)
        self.canary_payload, self._canary_params, self._baseline_optimizer = b"", {}, None
        return decision

    def _on_evaluation(self, device: str, evaluation: dict[str, float]) -> None:
        if self.canary is not None and self.canary.add_report(device, evaluation):
            log.info("cohort device %s: candidate v%d accuracy %.4f, v%d %.4f", device, self.canary.candidate,
                     evaluation["accuracy"], self.canary.baseline, evaluation["baseline_accuracy"])

    async def _publish_decision(self, client: aiomqtt.Client) -> None:
        await client.publish(topics.model_topic(self.config.fleet), self.model_payload, qos=1, retain=True)
        self.counters["bytes_out"] += len(self.model_payload)
        await client.publish(topics.canary_topic(self.config.fleet), b"", qos=1, retain=True)  # clears the candidate
        await self._publish_status(client)
        if self.done and self._stop is not None:
            log.info("max_rounds (%d) reached at v%d", self.config.max_rounds, self.model.version)
            self._stop.set()

    def install_params(self, params: dict[str, np.ndarray], info: dict[str, Any]) -> VersionRecord:
        """Publish operator-chosen weights (``fedmq model push`` / ``rollback``) as the next version.

        The new version is always higher, so devices' rollback protection holds. The open round is
        dropped (its updates were computed from the weights being replaced) and the server
        optimizer starts afresh from the new weights.
        """
        shapes = {name: tuple(np.shape(value)) for name, value in params.items()}
        if shapes != {name: tuple(shape) for name, shape in self._shapes.items()}:
            raise ValueError(f"the weights do not fit the fleet's architecture {self.config.arch.widths}: "
                             f"got {shapes}, expected {self._shapes}")
        params = {name: np.ascontiguousarray(value, dtype=np.float32) for name, value in params.items()}
        if not all(np.isfinite(value).all() for value in params.values()):
            raise ValueError("the weights contain NaN or infinity")
        if self.canary is not None:
            raise ValueError(f"candidate v{self.canary.candidate} is being evaluated by its cohort; "
                             "try again after its promotion or rollback")
        if self.config.rollout.enabled and info.get("source") != "rollback":
            # an operator's model goes through the same staged rollout as any new version
            self._baseline_optimizer = {k: np.array(v) for k, v in self.optimizer.state().items()}
            self.optimizer = self.config.make_optimizer()
            return self._stage(params, {**info, "updates": 0})
        dropped = self.round.count
        self.optimizer = self.config.make_optimizer()
        # a rollback's parent is the version whose weights it carries (as the canary's roll-back)
        parent = info.get("rollback_of") if info.get("source") == "rollback" else None
        record = self._make_current(params, {**info, "updates": 0, "dropped_updates": dropped}, parent=parent)
        version = record.version
        self.counters["replaced"] += 1
        self.counters["dropped_by_replace"] += dropped
        log.warning("v%d published from %s; %d buffered update(s) dropped", version, info.get("source", "an operator"),
                    dropped)
        return record

    async def replace_model(self, client: aiomqtt.Client, params: dict[str, np.ndarray],
                            info: dict[str, Any]) -> VersionRecord:
        """:meth:`install_params` and publish the new version (for the ops handler)."""
        async with self._lock:
            record = self.install_params(params, info)
            if self.canary is not None and self.canary.candidate == record.version:
                await client.publish(topics.canary_topic(self.config.fleet), self.canary_payload, qos=1, retain=True)
            else:
                await client.publish(topics.model_topic(self.config.fleet), self.model_payload, qos=1, retain=True)
            await self._publish_status(client)
            return record

    async def _close_round(self, client: aiomqtt.Client) -> None:
        self.close_round()
        if self.canary is not None:  # staged: the candidate goes to its cohort, the fleet waits
            await client.publish(topics.canary_topic(self.config.fleet), self.canary_payload, qos=1, retain=True)
            await self._publish_status(client)
            return
        # if this publish fails, the next session publishes the stored version first (and stops
        # there when max_rounds is reached): the version is never lost nor made twice
        await client.publish(topics.model_topic(self.config.fleet), self.model_payload, qos=1, retain=True)
        self.counters["bytes_out"] += len(self.model_payload)
        await self._publish_status(client)
        if self.done and self._stop is not None:
            log.info("max_rounds (%d) reached at v%d", self.config.max_rounds, self.model.version)
            self._stop.set()
