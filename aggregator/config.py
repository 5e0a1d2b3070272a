"""Aggregator settings: one frozen object, read from TOML plus environment, checked once."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedmq.broker.architecture import MLPArchitecture
from fedmq.broker.codecs import CODECS
from fedmq.broker.config import ConfigReader, load_toml
from fedmq.broker.errors import ConfigError
from fedmq.broker.messages import Task
from fedmq.broker.settings import BrokerSettings
from fedmq.broker.topics import TopicError, check_name

from .influence import InfluenceSettings
from .optimizers import ServerOptimizer
from .rollout import RolloutPolicy
from .rounds import RoundPolicy, StalenessWeight

DEFAULT_MAX_UPDATE_BYTES = 16 * 1024 * 1024


def norm_bound(value: Any) -> float | str:
    """``rounds.max_norm``: ``"auto"`` (from the fleet's history), ``"off"``, or a positive number
    (0 also means off, as in configurations written before the bound was on by default)."""
    if isinstance(value, str):
        text = value.strip().lower()
        if text in ("auto", "off"):
            return text
        try:
            value = float(text)
        except ValueError:
            raise ValueError(f"must be 'auto', 'off' or a positive number, got {value!r}") from None
    if type(value) not in (int, float) or not value >= 0 or value != value or value == float("inf"):
        raise ValueError(f"must be 'auto', 'off' or a positive number, got {value!r}")
    return "off" if value == 0 else float(value)


@dataclass(frozen=True, slots=True)
class UpdateLimits:
    """Per-device intake limits: a token bucket of ``burst`` updates refilled at ``per_second``
    (0 = no limit), and the largest retained status a device may keep on the broker."""

    per_second: float = 10.0
    burst: int = 20
    max_status_bytes: int = 64 * 1024

    def __post_init__(self) -> None:
        if not (self.per_second >= 0 and self.burst >= 1 and 1024 <= self.max_status_bytes <= 16 * 1024 * 1024):
            raise ConfigError("need updates_per_second >= 0, update_burst >= 1 and max_status_bytes from 1 KiB to 16 MiB",
                              key="limits")


@dataclass(frozen=True, slots=True)
class OpsAuth:
    """Who may send ops requests: operators whose certificates the fleet CA ``ca_file`` issued
    (minus the CRL), each request signed (:mod:`fedmq.broker.operators`). ``ca_file=None``: any
    request that reaches the aggregator's topic is taken (a broker without client certificates)."""

    ca_file: Path | None = None
    crl_file: Path | None = None


@dataclass(frozen=True, slots=True)
class AggregatorConfig:
    fleet: str
    state_dir: Path
    broker: BrokerSettings = field(default_factory=BrokerSettings)
    client_id: str = "fedmq-aggregator"
    arch: MLPArchitecture = field(default_factory=lambda: MLPArchitecture(64, (64, 32), 10))
    seed: int = 0
    backbone: Path | None = None        # a frozen ONNX feature extractor; only the MLP head is trained
    task: Task = field(default_factory=Task)
    policy: RoundPolicy = field(default_factory=RoundPolicy)
    buffer_size: int = 10               # async: publish a version every buffer_size accepted updates
    staleness: StalenessWeight = field(default_factory=StalenessWeight)
    rollout: RolloutPolicy = field(default_factory=RolloutPolicy)  # staged rollout; off by default
    server_lr: float = 1.0
    server_optimizer: str = "sgd"       # sgd (FedAvg) | fedavgm | fedadagrad | fedadam | fedyogi
    server_beta1: float = 0.9
    server_beta2: float = 0.99
    server_tau: float = 1e-3
    max_rounds: int = 0                 # stop after the registry holds 1 + max_rounds versions; 0 = run forever
    max_update_bytes: int = DEFAULT_MAX_UPDATE_BYTES
    strategy: str = "fedavg"            # fedavg | median | trimmed_mean (aggregator/robust.py)
    trim_fraction: float = 0.2          # trimmed_mean: share dropped at each end per coordinate
    max_norm: float = 0.0               # > 0: a fixed bound on each update's L2 norm (see influence)
    norm_mode: str = "clip"
    #: the norm bound and weight cap of every round (aggregator/influence.py); on by default
    influence: InfluenceSettings = field(default_factory=InfluenceSettings)
    robust_weighted: bool = False       # median / trimmed_mean: weigh updates by their capped example counts (lowers the breakdown point)
    limits: UpdateLimits = field(default_factory=UpdateLimits)
    ops_auth: OpsAuth = field(default_factory=OpsAuth)
    signing_key: Path | None = None     # Ed25519 private key (PEM): models are signed when set
    next_public_key: Path | None = None # announce this public key (PEM) in every model: key rotation
    metrics_host: str = "127.0.0.1"     # Prometheus /metrics address; port 0 = no endpoint
    metrics_port: int = 0               # (config files default to 9108)

    def __post_init__(self) -> None:
        for key, value in (("fleet", self.fleet), ("client_id", self.client_id)):
            try:
                check_name(value, key)
            except TopicError as exc:
                raise ConfigError(str(exc), key=key) from None
        if self.task.codec not in CODECS:
            raise ConfigError(f"unknown codec {self.task.codec!r}; known: {sorted(CODECS)}", key="task.codec")
        if self.strategy not in ("fedavg", "median", "trimmed_mean"):
            raise ConfigError(f"unknown strategy {self.strategy!r}; use fedavg, median or trimmed_mean", key="rounds.strategy")
        if not 0 <= self.trim_fraction < 0.5:
            raise ConfigError("must be at least 0 and below 0.5", key="rounds.trim_fraction")
        if self.max_norm < 0 or self.norm_mode not in ("clip", "reject"):
            raise ConfigError("max_norm must be >= 0 (0 = off) and norm_mode clip or reject", key="rounds.max_norm")
        try:
            self.make_optimizer()
        except ValueError as exc:
            raise ConfigError(str(exc), key="rounds.server_optimizer") from None
        if self.task.mode == "async":
            if self.buffer_size < 1:
                raise ConfigError("must be at least 1", key="async.buffer_size")
            if self.policy.min_updates > self.buffer_size:
                raise ConfigError(f"min_updates ({self.policy.min_updates}) cannot exceed async.buffer_size "
                                  f"({self.buffer_size}): a buffer is published at buffer_size updates",
                                  key="rounds.min_updates")
            if self.strategy != "fedavg":
                raise ConfigError(f"strategy {self.strategy!r} needs every update of a round at once; async mode "
                                  "streams: use fedavg, whose norm bound and weight cap are on by default",
                                  key="rounds.strategy")
        for device in self.rollout.cohort:
            try:
                check_name(device, "cohort device id")
            except TopicError as exc:
                raise ConfigError(str(exc), key="rollout.cohort") from None
        if self.max_rounds < 0:
            raise ConfigError("must be 0 (forever) or more", key="rounds.max_rounds")

    @property
    def influence_settings(self) -> InfluenceSettings:
        """The bounds in force: a ``max_norm`` given to the constructor (tests, older callers) is a fixed bound."""
        if self.max_norm > 0:
            return InfluenceSettings(max_norm=self.max_norm, auto_norm=False, norm_factor=self.influence.norm_factor,
                                     weight_factor=self.influence.weight_factor, max_examples=self.influence.max_examples)
        return self.influence

    def make_optimizer(self) -> ServerOptimizer:
        return ServerOptimizer(self.server_optimizer, lr=self.server_lr, beta1=self.server_beta1,
                               beta2=self.server_beta2, tau=self.server_tau)

    @classmethod
    def from_file(cls, path: str | Path, **overrides: Any) -> AggregatorConfig:
        return cls.from_mapping(load_toml(path), source=str(path), **overrides)

    @classmethod
    def from_mapping(cls, data: dict[str, Any], *, source: str = "<config>", **overrides: Any) -> AggregatorConfig:
        """Build from a parsed TOML document; errors name the key and ``source``."""
        top = ConfigReader(data, source)
        try:
            fleet = top.get("fleet", str, "default")
            state_dir = Path(top.get("state_dir", str, expect="a directory for the registry, e.g. /var/lib/fedmq/aggregator"))
            client_id = top.get("client_id", str, "fedmq-aggregator")
            broker = BrokerSettings.from_config(top.section("broker"))
            m = top.section("model")
            arch = MLPArchitecture(
                m.get("inputs", int, 64), tuple(m.get("hidden", list, [64, 32])), m.get("classes", int, 10)
            )
            seed = m.get("seed", int, 0)
            backbone = Path(b) if (b := m.get("backbone", str, None)) else None
            t = top.section("task")
            mode = t.get("mode", str, "sync", check=lambda v: v in ("sync", "async"), expect="sync or async")
            a = top.section("async")
            buffer_size = a.get("buffer_size", int, 10, check=lambda v: v >= 1, expect="an integer >= 1")
            max_staleness = a.get("max_staleness", int, 20, check=lambda v: 0 <= v <= 1000, expect="an integer from 0 to 1000")
            staleness = StalenessWeight(
                kind=a.get("staleness", str, "polynomial", check=lambda v: v in ("polynomial", "hinge", "constant"),
                           expect="polynomial, hinge or constant"),
                exponent=a.get("staleness_exponent", float, 0.5, check=lambda v: v >= 0, expect="a number >= 0"),
                hinge_a=a.get("staleness_hinge_a", float, 10.0, check=lambda v: v >= 0, expect="a number >= 0"),
                hinge_b=a.get("staleness_hinge_b", float, 4.0, check=lambda v: v >= 0, expect="a number >= 0"),
            )
            task = Task(
                mode=mode,
                max_staleness=max_staleness if mode == "async" else 0,
                epochs=t.get("epochs", int, 5),
                batch_size=t.get("batch_size", int, 16),
                lr=t.get("lr", float, 0.2),
                codec=t.get("codec", str, "fp32"),
                deadline_s=t.get("deadline_s", float, 60.0),
            )
            r = top.section("rounds")
            policy = RoundPolicy(
                min_updates=r.get("min_updates", int, 1),
                target_updates=r.get("target_updates", int, 10),
                deadline_s=task.deadline_s,
            )
            server_lr = r.get("server_lr", float, 1.0, check=lambda v: v > 0, expect="a positive number")
            max_rounds = r.get("max_rounds", int, 0)
            server_optimizer = r.get("server_optimizer", str, "sgd")
            server_beta1 = r.get("server_beta1", float, 0.9)
            server_beta2 = r.get("server_beta2", float, 0.99)
            server_tau = r.get("server_tau", float, 1e-3)
            strategy = r.get("strategy", str, "fedavg")
            trim_fraction = r.get("trim_fraction", float, 0.2)
            bound = r.get("max_norm", norm_bound, "auto")
            norm_mode = r.get("norm_mode", str, "clip")
            influence = InfluenceSettings(
                max_norm=bound if isinstance(bound, float) else None,
                auto_norm=bound == "auto",
                norm_factor=r.get("norm_factor", float, 2.0, check=lambda v: v >= 1, expect="a number >= 1"),
                weight_factor=r.get("weight_factor", float, 2.0, check=lambda v: v == 0 or v >= 1,
                                    expect="0 (off) or a number >= 1"),
                max_examples=r.get("max_examples", int, 0, check=lambda v: v >= 0, expect="0 (off) or a positive integer"),
            )
            robust_weighted = r.get("robust_weighted", bool, False)
            lim = top.section("limits")
            max_update_bytes = lim.get("max_update_bytes", int, DEFAULT_MAX_UPDATE_BYTES,
                                       check=lambda v: 1024 <= v <= 256 * 1024 * 1024, expect="1 KiB to 256 MiB")
            limits = UpdateLimits(
                per_second=lim.get("updates_per_second", float, 10.0, check=lambda v: v >= 0, expect="0 (no limit) or more"),
                burst=lim.get("update_burst", int, 20, check=lambda v: v >= 1, expect="an integer >= 1"),
                max_status_bytes=lim.get("max_status_bytes", int, 64 * 1024, check=lambda v: 1024 <= v <= 16 * 1024 * 1024,
                                         expect="1 KiB to 16 MiB"),
            )
            o = top.section("ops")
            ops_ca = o.get("ca_file", str, None)
            if ops_ca is None and broker.cert_file and broker.ca_file:
                ops_ca = broker.ca_file  # the fleet PKI: operators' certificates come from the same CA
            ops_crl = o.get("crl_file", str, None)
            if ops_crl is None and ops_ca is not None and (Path(ops_ca).parent / "crl.pem").exists():
                ops_crl = str(Path(ops_ca).parent / "crl.pem")
            ops_auth = OpsAuth(ca_file=Path(ops_ca) if ops_ca else None, crl_file=Path(ops_crl) if ops_crl else None)
            ro = top.section("rollout")
            rollout = RolloutPolicy(
                cohort=tuple(ro.get("cohort", list, [])),
                cohort_percent=ro.get("cohort_percent", float, 0.0, check=lambda v: 0 <= v <= 100, expect="0 to 100"),
                max_accuracy_drop=ro.get("max_accuracy_drop", float, 0.02, check=lambda v: 0 <= v <= 1,
                                         expect="an accuracy difference from 0 to 1"),
                min_reports=ro.get("min_reports", int, 0, check=lambda v: v >= 0, expect="0 (whole cohort) or more"),
                timeout_s=ro.get("timeout_s", float, 300.0, check=lambda v: v > 0, expect="positive seconds"),
            )
            met = top.section("metrics")
            metrics_host = met.get("host", str, "127.0.0.1")
            metrics_port = met.get("port", int, 9108, check=lambda v: 0 <= v < 65536, expect="0 (off) to 65535")
            sig = top.section("signing")
            signing_key = Path(k) if (k := sig.get("key_file", str, None)) else None
            next_public_key = Path(k) if (k := sig.get("next_public_key_file", str, None)) else None
            top.finish()
            fields: dict[str, Any] = dict(
                fleet=fleet, state_dir=state_dir, broker=broker, client_id=client_id, arch=arch, seed=seed, backbone=backbone,
                task=task, policy=policy, buffer_size=buffer_size, staleness=staleness, server_lr=server_lr, max_rounds=max_rounds,
                server_optimizer=server_optimizer, server_beta1=server_beta1, server_beta2=server_beta2,
                server_tau=server_tau,
                max_update_bytes=max_update_bytes, signing_key=signing_key, strategy=strategy,
                trim_fraction=trim_fraction, max_norm=0.0, norm_mode=norm_mode, next_public_key=next_public_key,
                influence=influence, robust_weighted=robust_weighted, limits=limits, ops_auth=ops_auth,
                metrics_host=metrics_host, metrics_port=metrics_port, rollout=rollout,
            )
            fields.update(overrides)
            return cls(**fields)
        except ConfigError as exc:
            if exc.source is None:
                message = str(exc).split(": ", 1)[-1] if exc.key else str(exc)
                raise ConfigError(message, key=exc.key, source=source) from None
            raise
        except ValueError as exc:
            raise ConfigError(str(exc), source=source) from None
