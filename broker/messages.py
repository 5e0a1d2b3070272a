"""fedmq v1 messages: frozen dataclasses, validated when built from the wire.

Every message is a :mod:`.wire` frame whose header has ``kind`` and ``schema``. ``encode()``
returns the payload; :func:`decode_message` parses an untrusted payload and raises
:class:`~.errors.RejectedMessage` with a reason code for anything it does not accept. Field-level
checks here are the ones that need no model state; checks against the current model (tensor
names and shapes, versions, duplicates) belong to the receiver.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import numpy as np

from .architecture import MLPArchitecture
from .errors import Reason, RejectedMessage
from .topics import TopicError, check_device, check_name, check_sha256
from .wire import Frame, decode_frame, encode_frame

SCHEMA = 1
MAX_METRICS = 32
MAX_COUNTERS = 256          # status counters: one per rejection reason and more, so more room than metrics
MAX_METRIC = 1e15
MAX_TEXT = 512
MAX_EXAMPLES = 2**31 - 1
MAX_VERSION = 2**53
_UPDATE_ID = re.compile(r"[A-Za-z0-9_.:-]{1,64}")
MODES = ("sync", "async")
MAX_COHORT = 1_000           # ids in a candidate's header: well inside the header's 256 KiB and 8,192 entries
MAX_STALENESS = 1000
COMMANDS = ("pause", "resume", "freeze", "unfreeze")
STAGES = ("release", "candidate")
#: How far in the future (by the receiver's clock) a signed command's or request's ``issued_at``
#: may be: clocks of Pis without an RTC drift, but a command "from the future" must not outrank
#: every later one for good.
MAX_CLOCK_SKEW_S = 120.0


# -- field readers: each raises RejectedMessage(FIELD) naming the field -------------------------

def _need(h: Mapping[str, Any], key: str) -> Any:
    if key not in h:
        raise RejectedMessage(Reason.FIELD, f"missing field {key!r}")
    return h[key]


def _int(h: Mapping[str, Any], key: str, lo: int, hi: int) -> int:
    value = _need(h, key)
    if type(value) is not int or not lo <= value <= hi:
        raise RejectedMessage(Reason.FIELD, f"{key} must be an integer from {lo} to {hi}, got {value!r}")
    return value


def _float(h: Mapping[str, Any], key: str, lo: float, hi: float) -> float:
    value = _need(h, key)
    if type(value) not in (int, float):
        raise RejectedMessage(Reason.FIELD, f"{key} must be a number, got {type(value).__name__}")
    if not math.isfinite(value):
        raise RejectedMessage(Reason.NON_FINITE, f"{key} is {value}")
    if not lo <= value <= hi:
        raise RejectedMessage(Reason.FIELD, f"{key} must be from {lo} to {hi}, got {value}")
    return float(value)


def _text(h: Mapping[str, Any], key: str, *, max_len: int = MAX_TEXT, optional: bool = False) -> str:
    if optional and key not in h:
        return ""
    value = _need(h, key)
    if not isinstance(value, str) or len(value) > max_len:
        raise RejectedMessage(Reason.FIELD, f"{key} must be a string of at most {max_len} characters")
    return value


def _choice(h: Mapping[str, Any], key: str, choices: tuple[str, ...]) -> str:
    value = _need(h, key)
    if value not in choices:
        raise RejectedMessage(Reason.FIELD, f"{key} must be one of {list(choices)}, got {value!r}")
    return value


def _device(h: Mapping[str, Any], key: str = "device") -> str:
    value = _need(h, key)
    try:
        return check_device(value)
    except TopicError as exc:
        raise RejectedMessage(Reason.FIELD, str(exc)) from None


def _fleet(h: Mapping[str, Any]) -> str:
    value = _need(h, "fleet")
    try:
        return check_name(value, "fleet")
    except TopicError as exc:
        raise RejectedMessage(Reason.FIELD, str(exc)) from None


def _metrics(h: Mapping[str, Any], key: str = "metrics", limit: int = MAX_METRICS) -> dict[str, float]:
    value = h.get(key, {})
    if not isinstance(value, dict) or len(value) > limit:
        raise RejectedMessage(Reason.FIELD, f"{key} must be a map of at most {limit} numbers")
    out: dict[str, float] = {}
    for name, number in value.items():
        if not isinstance(name, str) or len(name) > 64 or type(number) not in (int, float):
            raise RejectedMessage(Reason.FIELD, f"{key} must map short names to numbers")
        if not math.isfinite(number):
            raise RejectedMessage(Reason.NON_FINITE, f"{key}.{name} is {number}")
        if abs(number) > MAX_METRIC:
            raise RejectedMessage(Reason.FIELD, f"{key}.{name} = {number} is beyond +-{MAX_METRIC:g}")
        out[name] = float(number)
    return out


def _signed_by(frame: Frame, keys: set[str]) -> tuple[memoryview, bytes, dict[str, Any]] | None:
    """(signed bytes, signature, "sig" header) of a signed frame, checked for shape only."""
    sig = frame.header.get("sig")
    if sig is None:
        return None
    if not (isinstance(sig, dict) and set(sig) == keys):
        raise RejectedMessage(Reason.FIELD, f"sig must be a map of {' and '.join(sorted(keys))}")
    if frame.signed is None or frame.signature is None:
        raise RejectedMessage(Reason.MALFORMED, "signed frame without its signature trailer")
    return frame.signed, frame.signature, sig


def _encode_signed(header: dict[str, Any], tensors: Mapping[str, np.ndarray] | None, signer: Any) -> bytes:
    """The payload, signed by ``signer`` (an object with ``sig_header()`` and ``sign(bytes)``) when given."""
    if signer is None:
        return encode_frame(header, tensors)
    header["sig"] = signer.sig_header()
    return encode_frame(header, tensors, sign=signer.sign)


def _check_keys(h: Mapping[str, Any], kind: str, required: set[str], optional: set[str] = frozenset()) -> None:
    unknown = set(h) - required - optional - {"kind", "schema"}
    if unknown:
        raise RejectedMessage(Reason.FIELD, f"unknown fields in {kind} message: {sorted(unknown)}")


def _no_tensors(frame: Frame, kind: str) -> None:
    if frame.tensors:
        raise RejectedMessage(Reason.TENSORS, f"a {kind} message carries no tensors")


# -- messages -------------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Task:
    """What devices do with a model: the training settings the aggregator asks for.

    ``mode`` is ``sync`` (rounds: one update per device per version; an update for an older version
    is dead) or ``async`` (buffered: devices train whenever they hold a model, and an update whose
    base is at most ``max_staleness`` versions old is still taken, weighted down by its staleness).
    """

    mode: Literal["sync", "async"] = "sync"
    epochs: int = 5
    batch_size: int = 16
    lr: float = 0.2
    codec: str = "fp32"
    deadline_s: float = 60.0
    max_staleness: int = 0              # async: how many versions old an update's base may be

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"task mode must be one of {MODES}, got {self.mode!r}")
        if not (type(self.epochs) is int and 1 <= self.epochs <= 1000):
            raise ValueError(f"task epochs must be an integer from 1 to 1000, got {self.epochs!r}")
        if not (type(self.batch_size) is int and 1 <= self.batch_size <= 65536):
            raise ValueError(f"task batch_size must be an integer from 1 to 65536, got {self.batch_size!r}")
        if not (type(self.lr) in (int, float) and math.isfinite(self.lr) and 0 < self.lr <= 100):
            raise ValueError(f"task lr must be a number in (0, 100], got {self.lr!r}")
        if not (type(self.deadline_s) in (int, float) and math.isfinite(self.deadline_s)
                and 0 < self.deadline_s <= 7 * 86400):
            raise ValueError(f"task deadline_s must be in (0, 604800], got {self.deadline_s!r}")
        if not (type(self.max_staleness) is int and 0 <= self.max_staleness <= MAX_STALENESS):
            raise ValueError(f"task max_staleness must be an integer from 0 to {MAX_STALENESS}, got {self.max_staleness!r}")
        if self.mode == "sync" and self.max_staleness:
            raise ValueError("task max_staleness applies to mode 'async' only; a sync round takes no stale update")

    def to_wire(self) -> dict[str, Any]:
        wire: dict[str, Any] = {"mode": self.mode, "epochs": self.epochs, "batch_size": self.batch_size, "lr": self.lr,
                                "codec": self.codec, "deadline_s": self.deadline_s}
        if self.mode == "async":
            wire["max_staleness"] = self.max_staleness
        return wire

    @classmethod
    def from_wire(cls, value: Any) -> Task:
        if not isinstance(value, dict):
            raise RejectedMessage(Reason.FIELD, "task must be a map")
        _check_keys(value, "task", {"mode", "epochs", "batch_size", "lr", "codec", "deadline_s"}, {"max_staleness"})
        try:
            return cls(
                mode=_choice(value, "mode", MODES),  # type: ignore[arg-type]
                epochs=_int(value, "epochs", 1, 1000),
                batch_size=_int(value, "batch_size", 1, 65536),
                lr=_float(value, "lr", 0.0, 100.0),
                codec=_text(value, "codec", max_len=32),
                deadline_s=_float(value, "deadline_s", 0.0, 7 * 86400.0),
                max_staleness=_int(value, "max_staleness", 0, MAX_STALENESS) if "max_staleness" in value else 0,
            )
        except ValueError as exc:
            if isinstance(exc, RejectedMessage):
                raise
            raise RejectedMessage(Reason.FIELD, str(exc)) from None


MAX_ARTIFACT_BYTES = 200 * 1024 * 1024  # an MQTT packet carries at most 256 MiB, topic included


@dataclass(frozen=True, slots=True)
class BackboneRef:
    """A frozen ONNX feature extractor, published once as a retained artifact
    (:func:`~.topics.artifact_topic`) and named here by its sha256 and length. Devices embed their
    data with it and train only the MLP head; ``arch.inputs`` is the backbone's output width."""

    sha256: str
    size: int

    def to_wire(self) -> dict[str, Any]:
        return {"sha256": self.sha256, "size": self.size}

    @classmethod
    def from_wire(cls, value: Any) -> BackboneRef:
        if not isinstance(value, dict):
            raise RejectedMessage(Reason.FIELD, "backbone must be a map of sha256 and size")
        _check_keys(value, "backbone", {"sha256", "size"})
        digest = _need(value, "sha256")
        try:
            check_sha256(digest)
        except TopicError as exc:
            raise RejectedMessage(Reason.FIELD, f"backbone: {exc}") from None
        return cls(digest, _int(value, "size", 1, MAX_ARTIFACT_BYTES))


@dataclass(frozen=True, eq=False, slots=True)
class ModelMessage:
    """A global model version, published retained on the model topic."""

    KIND: ClassVar[str] = "model"
    fleet: str
    version: int
    parent: int
    arch: MLPArchitecture
    task: Task
    params: Mapping[str, np.ndarray] = field(repr=False)
    created: float = 0.0
    backbone: BackboneRef | None = None
    next_key: bytes | None = None       # a signed model may announce the fleet's next public key
    #: a candidate on the canary topic names the devices that evaluate it first (staged rollout)
    cohort: tuple[str, ...] = ()
    #: "release" (the model topic: devices install it) or "candidate" (the canary topic: the
    #: cohort evaluates it, nobody installs it). Inside the signed bytes, so a signed candidate
    #: replayed on the model topic is refused.
    stage: str = "release"
    #: (signed bytes, signature, "sig" header) of a decoded signed model, for verification
    signed_by: tuple[memoryview, bytes, dict[str, Any]] | None = field(default=None, repr=False)

    def encode(self, signer: Any = None) -> bytes:
        """The payload; with ``signer`` (a :class:`~.signing.SigningKey`) a signed one."""
        header: dict[str, Any] = {"kind": self.KIND, "schema": SCHEMA, "fleet": self.fleet, "version": self.version,
                                  "parent": self.parent, "created": self.created, "arch": self.arch.to_wire(),
                                  "task": self.task.to_wire()}
        if self.backbone is not None:
            header["backbone"] = self.backbone.to_wire()
        if self.next_key is not None:
            header["next_key"] = self.next_key
        if self.cohort:
            header["cohort"] = list(self.cohort)  # only on candidates: older readers refuse unknown keys
        if self.stage != "release" and not self.cohort:
            # a cohort already marks a candidate (inside the signed bytes too); the key is written
            # only when it is needed, as devices before this version refuse unknown keys
            header["stage"] = self.stage
        return _encode_signed(header, self.params, signer)

    @property
    def is_candidate(self) -> bool:
        """A staged-rollout candidate (by its stage, or its cohort for candidates of older aggregators)."""
        return self.stage == "candidate" or bool(self.cohort)

    @classmethod
    def from_frame(cls, frame: Frame) -> ModelMessage:
        h = frame.header
        _check_keys(h, cls.KIND, {"fleet", "version", "parent", "created", "arch", "task"},
                    {"backbone", "next_key", "sig", "cohort", "stage"})
        cohort = h.get("cohort", [])
        if not (isinstance(cohort, list) and len(cohort) <= MAX_COHORT):
            raise RejectedMessage(Reason.FIELD, f"cohort must be a list of at most {MAX_COHORT} device ids")
        cohort = tuple(_device({"device": device}) for device in cohort)
        next_key = h.get("next_key")
        if next_key is not None and not (isinstance(next_key, bytes) and len(next_key) == 32):
            raise RejectedMessage(Reason.FIELD, "next_key must be the 32 raw bytes of an Ed25519 public key")
        signed_by = _signed_by(frame, {"alg", "key"})
        stage = _choice(h, "stage", STAGES) if "stage" in h else ("candidate" if h.get("cohort") else "release")
        version = _int(h, "version", 1, MAX_VERSION)
        parent = _int(h, "parent", 0, version - 1)
        arch = MLPArchitecture.from_wire(_need(h, "arch"))
        shapes = arch.param_shapes()
        if frame.tensors.keys() != shapes.keys():
            raise RejectedMessage(Reason.TENSORS, f"model tensors {sorted(frame.tensors)} do not match arch {sorted(shapes)}")
        for name, shape in shapes.items():
            t = frame.tensors[name]
            if t.dtype != np.float32:
                raise RejectedMessage(Reason.DTYPE, f"model tensor {name!r} must be float32, is {t.dtype}")
            if t.shape != shape:
                raise RejectedMessage(Reason.SHAPE, f"model tensor {name!r} has shape {t.shape}, arch says {shape}")
            if not np.isfinite(t).all():
                raise RejectedMessage(Reason.NON_FINITE, f"model tensor {name!r} has NaN or infinity")
        return cls(
            fleet=_fleet(h),
            version=version,
            parent=parent,
            arch=arch,
            task=Task.from_wire(_need(h, "task")),
            params=frame.tensors,
            created=_float(h, "created", 0.0, 1e11),
            backbone=BackboneRef.from_wire(h["backbone"]) if "backbone" in h else None,
            next_key=next_key,
            cohort=cohort,
            stage=stage,
            signed_by=signed_by,
        )


@dataclass(frozen=True, eq=False, slots=True)
class UpdateMessage:
    """A weight delta (trained minus received weights) from one device, encoded by ``codec``."""

    KIND: ClassVar[str] = "update"
    device: str
    update_id: str
    base_version: int
    num_examples: int
    codec: str
    tensors: Mapping[str, np.ndarray] = field(repr=False)
    metrics: Mapping[str, float] = field(default_factory=dict)
    created: float = 0.0

    def encode(self) -> bytes:
        header = {"kind": self.KIND, "schema": SCHEMA, "device": self.device, "update_id": self.update_id,
                  "base_version": self.base_version, "num_examples": self.num_examples, "codec": self.codec,
                  "metrics": dict(self.metrics), "created": self.created}
        return encode_frame(header, self.tensors)

    @classmethod
    def from_frame(cls, frame: Frame) -> UpdateMessage:
        h = frame.header
        _check_keys(h, cls.KIND, {"device", "update_id", "base_version", "num_examples", "codec"},
                    {"metrics", "created"})
        update_id = _need(h, "update_id")
        if not isinstance(update_id, str) or not _UPDATE_ID.fullmatch(update_id):
            raise RejectedMessage(Reason.FIELD, "update_id must be 1-64 characters from A-Z a-z 0-9 _ . : -")
        codec = _need(h, "codec")
        if not isinstance(codec, str) or len(codec) > 32:
            raise RejectedMessage(Reason.CODEC, f"codec must be a short string, got {codec!r}")
        if not frame.tensors:
            raise RejectedMessage(Reason.TENSORS, "an update carries at least one tensor")
        return cls(
            device=_device(h),
            update_id=update_id,
            base_version=_int(h, "base_version", 1, MAX_VERSION),
            num_examples=_int(h, "num_examples", 1, MAX_EXAMPLES),
            codec=codec,
            tensors=frame.tensors,
            metrics=_metrics(h),
            created=_float(h, "created", 0.0, 1e11) if "created" in h else 0.0,
        )


@dataclass(frozen=True, slots=True)
class Receipt:
    """The aggregator's answer to one update. ``reason`` is set when ``status`` is ``rejected``.

    A ``duplicate`` rejection means the update was already accepted earlier: the device may drop it.
    Every rejection is final (the device drops the update from its outbox) except one with
    ``retry_after_s > 0`` (``rate_limited``): the device keeps it and sends it again after that long.
    """

    KIND: ClassVar[str] = "receipt"
    device: str
    update_id: str
    status: Literal["accepted", "rejected"]
    model_version: int
    reason: str | None = None
    detail: str = ""
    retry_after_s: float = 0.0

    @property
    def final(self) -> bool:
        """Whether the device is done with the update (accepted, or refused for good)."""
        return not self.retry_after_s > 0

    def encode(self) -> bytes:
        header = {"kind": self.KIND, "schema": SCHEMA, "device": self.device, "update_id": self.update_id,
                  "status": self.status, "model_version": self.model_version, "reason": self.reason,
                  "detail": self.detail[:MAX_TEXT]}
        if self.retry_after_s > 0:
            header["retry_after_s"] = self.retry_after_s
        return encode_frame(header)

    @classmethod
    def from_frame(cls, frame: Frame) -> Receipt:
        h = frame.header
        _no_tensors(frame, cls.KIND)
        _check_keys(h, cls.KIND, {"device", "update_id", "status", "model_version"}, {"reason", "detail", "retry_after_s"})
        status = _choice(h, "status", ("accepted", "rejected"))
        reason = h.get("reason")
        if status == "rejected" and reason not in {r.value for r in Reason}:
            raise RejectedMessage(Reason.FIELD, f"a rejected receipt needs a known reason, got {reason!r}")
        return cls(
            device=_device(h),
            update_id=_text(h, "update_id", max_len=64),
            status=status,  # type: ignore[arg-type]
            model_version=_int(h, "model_version", 0, MAX_VERSION),
            reason=reason if status == "rejected" else None,
            detail=_text(h, "detail", optional=True),
            retry_after_s=_float(h, "retry_after_s", 0.0, 86400.0) if "retry_after_s" in h else 0.0,
        )


@dataclass(frozen=True, slots=True)
class DeviceStatus:
    """Retained presence and health of one device; the ``offline`` form is its Last Will."""

    KIND: ClassVar[str] = "status"
    device: str
    state: Literal["online", "offline"]
    model_version: int = 0
    software: str = ""
    platform: str = ""
    backend: str = ""
    since: float = 0.0
    detail: str = ""
    counters: Mapping[str, float] = field(default_factory=dict)
    paused: bool = False                # an operator paused local training (Command "pause")
    frozen: int = 0                     # an operator froze the device at this version (Command "freeze"); 0 = not
    #: the device's evaluation of its newest model on local data, before training on it: version,
    #: accuracy, loss, examples; for a canary candidate also baseline_version, baseline_accuracy, baseline_loss
    evaluation: Mapping[str, float] = field(default_factory=dict)

    def encode(self) -> bytes:
        header = {"kind": self.KIND, "schema": SCHEMA, "device": self.device, "state": self.state,
                  "model_version": self.model_version, "software": self.software, "platform": self.platform,
                  "backend": self.backend, "since": self.since, "detail": self.detail[:MAX_TEXT],
                  "counters": dict(self.counters)}
        if self.paused:
            header["paused"] = True  # only when set: older readers refuse unknown keys
        if self.frozen:
            header["frozen"] = self.frozen
        if self.evaluation:
            header["evaluation"] = dict(self.evaluation)
        return encode_frame(header)

    @classmethod
    def from_frame(cls, frame: Frame) -> DeviceStatus:
        h = frame.header
        _no_tensors(frame, cls.KIND)
        _check_keys(h, cls.KIND, {"device", "state"},
                    {"model_version", "software", "platform", "backend", "since", "detail", "counters", "paused",
                     "evaluation", "frozen"})
        if "paused" in h and type(h["paused"]) is not bool:
            raise RejectedMessage(Reason.FIELD, f"paused must be true or false, got {h['paused']!r}")
        return cls(
            device=_device(h),
            state=_choice(h, "state", ("online", "offline")),  # type: ignore[arg-type]
            model_version=_int(h, "model_version", 0, MAX_VERSION) if "model_version" in h else 0,
            software=_text(h, "software", max_len=64, optional=True),
            platform=_text(h, "platform", max_len=128, optional=True),
            backend=_text(h, "backend", max_len=32, optional=True),
            since=_float(h, "since", 0.0, 1e11) if "since" in h else 0.0,
            detail=_text(h, "detail", optional=True),
            counters=_metrics(h, "counters", MAX_COUNTERS),
            paused=bool(h.get("paused", False)),
            frozen=_int(h, "frozen", 0, MAX_VERSION) if "frozen" in h else 0,
            evaluation=_metrics(h, "evaluation") if "evaluation" in h else {},
        )


@dataclass(frozen=True, slots=True)
class AggregatorStatus:
    """Retained aggregator presence with its counters; the ``offline`` form is its Last Will."""

    KIND: ClassVar[str] = "aggregator_status"
    state: Literal["online", "offline"]
    model_version: int = 0
    mode: str = ""
    software: str = ""
    since: float = 0.0
    counters: Mapping[str, float] = field(default_factory=dict)

    def encode(self) -> bytes:
        header = {"kind": self.KIND, "schema": SCHEMA, "state": self.state, "model_version": self.model_version,
                  "mode": self.mode, "software": self.software, "since": self.since, "counters": dict(self.counters)}
        return encode_frame(header)

    @classmethod
    def from_frame(cls, frame: Frame) -> AggregatorStatus:
        h = frame.header
        _no_tensors(frame, cls.KIND)
        _check_keys(h, cls.KIND, {"state"}, {"model_version", "mode", "software", "since", "counters"})
        return cls(
            state=_choice(h, "state", ("online", "offline")),  # type: ignore[arg-type]
            model_version=_int(h, "model_version", 0, MAX_VERSION) if "model_version" in h else 0,
            mode=_text(h, "mode", max_len=32, optional=True),
            software=_text(h, "software", max_len=64, optional=True),
            since=_float(h, "since", 0.0, 1e11) if "since" in h else 0.0,
            counters=_metrics(h, "counters", MAX_COUNTERS) if "counters" in h else {},
        )


@dataclass(frozen=True, slots=True)
class Command:
    """An operator's command to one device (``cmd/{device}``) or to all (``cmd/all``), retained.

    ``pause`` stops local training (the device stays online, keeps its model and still sends
    updates already trained); ``resume`` restarts it. ``freeze`` keeps the device on ``version``
    (it installs nothing newer) until ``unfreeze``. Pause/resume and freeze/unfreeze are two
    separate settings; for each, a device obeys the newest command by ``issued_at`` of the two
    topics, so a fleet-wide resume overrides an older per-device pause.

    ``target`` (the device id, or ``all``) and ``fleet`` are inside the signed bytes: a command
    signed for one device cannot be replayed on ``cmd/all`` or in another fleet. A device that
    knows the fleet's operator CA obeys only commands signed by an operator certificate of it
    (:mod:`.operators`), and none whose ``issued_at`` is more than :data:`MAX_CLOCK_SKEW_S` ahead
    of its clock.
    """

    KIND: ClassVar[str] = "command"
    command: Literal["pause", "resume", "freeze", "unfreeze"]
    issued_at: float
    issued_by: str = ""
    reason: str = ""
    target: str = ""                    # the device id or "all"; "" only from older operators' tools
    fleet: str = ""
    version: int = 0                    # freeze: the newest version the device may run
    signed_by: tuple[memoryview, bytes, dict[str, Any]] | None = field(default=None, repr=False, compare=False)

    def encode(self, signer: Any = None) -> bytes:
        header: dict[str, Any] = {"kind": self.KIND, "schema": SCHEMA, "command": self.command,
                                  "issued_at": self.issued_at, "issued_by": self.issued_by,
                                  "reason": self.reason[:MAX_TEXT]}
        # target and fleet bind a signature; unsigned, they are left out for devices before this
        # version, which refuse unknown keys (freeze is new anyway)
        for key in ("target", "fleet", "version") if signer is not None else ("version",):
            if getattr(self, key):
                header[key] = getattr(self, key)
        return _encode_signed(header, None, signer)

    @classmethod
    def from_frame(cls, frame: Frame) -> Command:
        h = frame.header
        _no_tensors(frame, cls.KIND)
        _check_keys(h, cls.KIND, {"command", "issued_at"}, {"issued_by", "reason", "target", "fleet", "version", "sig"})
        command = _choice(h, "command", COMMANDS)
        version = _int(h, "version", 1, MAX_VERSION) if "version" in h else 0
        if command == "freeze" and not version:
            raise RejectedMessage(Reason.FIELD, "a freeze command needs the version to freeze on")
        target = _text(h, "target", max_len=64, optional=True)
        if target and target != "all":
            target = _device({"device": target})
        return cls(
            command=command,  # type: ignore[arg-type]
            issued_at=_float(h, "issued_at", 0.0, 1e11),
            issued_by=_text(h, "issued_by", max_len=64, optional=True),
            reason=_text(h, "reason", optional=True),
            target=target,
            fleet=_fleet(h) if "fleet" in h else "",
            version=version,
            signed_by=_signed_by(frame, {"alg", "cert"}),
        )


_OPS_NAME = re.compile(r"[a-z][a-z0-9_.]{0,31}")
MAX_OPS_ARGS = 32
MAX_OPS_ERROR = 2048


def _request_id(h: Mapping[str, Any]) -> str:
    value = _need(h, "request_id")
    if not isinstance(value, str) or not _UPDATE_ID.fullmatch(value):
        raise RejectedMessage(Reason.FIELD, "request_id must be 1-64 characters from A-Z a-z 0-9 _ . : -")
    return value


def _ops_args(value: Any) -> dict[str, Any]:
    if not isinstance(value, dict) or len(value) > MAX_OPS_ARGS:
        raise RejectedMessage(Reason.FIELD, f"args must be a map of at most {MAX_OPS_ARGS} entries")
    for name, arg in value.items():
        if not _OPS_NAME.fullmatch(name):
            raise RejectedMessage(Reason.FIELD, f"argument name {name!r} must be 1-32 characters from a-z 0-9 _ .")
        if arg is not None and type(arg) not in (bool, int, float, str):
            raise RejectedMessage(Reason.FIELD, f"argument {name!r} must be a number, string, boolean or nil")
        if isinstance(arg, str) and len(arg) > MAX_TEXT:
            raise RejectedMessage(Reason.FIELD, f"argument {name!r} is longer than {MAX_TEXT} characters")
        if isinstance(arg, float) and not math.isfinite(arg):
            raise RejectedMessage(Reason.NON_FINITE, f"argument {name!r} is {arg}")
    return dict(value)


@dataclass(frozen=True, eq=False, slots=True)
class OpsRequest:
    """An ops client's request to the aggregator, on ``ops/request/{client}``.

    ``reply_to`` is the client's name: the answer goes to ``ops/response/{reply_to}`` (with MQTT 5
    also named by the ResponseTopic property). ``deadline`` (unix time, 0 for none) lets the
    aggregator skip a request that waited in a queue after the client gave up on it. ``tensors``
    carry the weights of ``model.push``.

    A signed request (an operator certificate's key, :mod:`.operators`) also names its ``fleet``
    and ``issued_at`` inside the signed bytes; an aggregator that knows the operator CA refuses
    any other request, and one issued outside its freshness window or seen before.
    """

    KIND: ClassVar[str] = "ops_request"
    request_id: str
    op: str
    reply_to: str
    args: Mapping[str, Any] = field(default_factory=dict)
    deadline: float = 0.0
    tensors: Mapping[str, np.ndarray] = field(default_factory=dict, repr=False)
    issued_at: float = 0.0
    fleet: str = ""
    signed_by: tuple[memoryview, bytes, dict[str, Any]] | None = field(default=None, repr=False)

    def encode(self, signer: Any = None) -> bytes:
        header: dict[str, Any] = {"kind": self.KIND, "schema": SCHEMA, "request_id": self.request_id, "op": self.op,
                                  "reply_to": self.reply_to, "args": dict(self.args), "deadline": self.deadline}
        if signer is not None:  # what binds a signature; left out unsigned, for older aggregators
            header["issued_at"] = self.issued_at
            header["fleet"] = self.fleet
        return _encode_signed(header, self.tensors, signer)

    @classmethod
    def from_frame(cls, frame: Frame) -> OpsRequest:
        h = frame.header
        _check_keys(h, cls.KIND, {"request_id", "op", "reply_to"}, {"args", "deadline", "issued_at", "fleet", "sig"})
        op = _need(h, "op")
        if not isinstance(op, str) or not _OPS_NAME.fullmatch(op):
            raise RejectedMessage(Reason.FIELD, f"op must be 1-32 characters from a-z 0-9 _ ., got {op!r}")
        reply_to = _need(h, "reply_to")
        try:
            check_name(reply_to, "reply_to")
        except TopicError as exc:
            raise RejectedMessage(Reason.FIELD, str(exc)) from None
        return cls(
            request_id=_request_id(h),
            op=op,
            reply_to=reply_to,
            args=_ops_args(h.get("args", {})),
            deadline=_float(h, "deadline", 0.0, 1e11) if "deadline" in h else 0.0,
            tensors=frame.tensors,
            issued_at=_float(h, "issued_at", 0.0, 1e11) if "issued_at" in h else 0.0,
            fleet=_fleet(h) if "fleet" in h else "",
            signed_by=_signed_by(frame, {"alg", "cert"}),
        )


@dataclass(frozen=True, eq=False, slots=True)
class OpsResponse:
    """The aggregator's answer to one :class:`OpsRequest`: ``result`` when ``ok``, else ``error``.

    ``result`` is a map of plain values (the whole header stays under the frame's header limit);
    bulk bytes (a model payload) travel as ``tensors``.
    """

    KIND: ClassVar[str] = "ops_response"
    request_id: str
    ok: bool
    result: Mapping[str, Any] = field(default_factory=dict)
    error: str = ""
    tensors: Mapping[str, np.ndarray] = field(default_factory=dict, repr=False)

    def encode(self) -> bytes:
        header = {"kind": self.KIND, "schema": SCHEMA, "request_id": self.request_id, "ok": self.ok,
                  "result": dict(self.result), "error": self.error[:MAX_OPS_ERROR]}
        return encode_frame(header, self.tensors)

    @classmethod
    def from_frame(cls, frame: Frame) -> OpsResponse:
        h = frame.header
        _check_keys(h, cls.KIND, {"request_id", "ok"}, {"result", "error"})
        ok = _need(h, "ok")
        if type(ok) is not bool:
            raise RejectedMessage(Reason.FIELD, f"ok must be true or false, got {ok!r}")
        result = h.get("result", {})
        if not isinstance(result, dict):
            raise RejectedMessage(Reason.FIELD, "result must be a map")
        return cls(
            request_id=_request_id(h),
            ok=ok,
            result=result,
            error=_text(h, "error", max_len=MAX_OPS_ERROR, optional=True),
            tensors=frame.tensors,
        )


Message = ModelMessage | UpdateMessage | Receipt | DeviceStatus | AggregatorStatus | Command | OpsRequest | OpsResponse
MESSAGE_TYPES: dict[str, type] = {
    t.KIND: t
    for t in (ModelMessage, UpdateMessage, Receipt, DeviceStatus, AggregatorStatus, Command, OpsRequest, OpsResponse)
}


def decode_message(payload: bytes | bytearray | memoryview, *, max_bytes: int, expect: type | None = None) -> Any:
    """Decode an untrusted payload into a message; with ``expect``, only that message type.

    Raises :class:`RejectedMessage` (``oversize``, ``malformed``, ``schema``, ``kind``, field-level
    reasons) for anything else.
    """
    frame = decode_frame(payload, max_bytes=max_bytes)
    h = frame.header
    schema = h.get("schema")
    if type(schema) is not int or schema != SCHEMA:  # True == 1 and 1.0 == 1 in Python
        raise RejectedMessage(Reason.SCHEMA, f"schema {schema!r} is not supported (this side speaks {SCHEMA})")
    kind = h.get("kind")
    message_type = MESSAGE_TYPES.get(kind) if isinstance(kind, str) else None
    if message_type is None:
        raise RejectedMessage(Reason.KIND, f"unknown message kind {kind!r}")
    if expect is not None and message_type is not expect:
        raise RejectedMessage(Reason.KIND, f"expected a {expect.KIND} message, got {kind!r}")  # type: ignore[attr-defined]
    return message_type.from_frame(frame)
