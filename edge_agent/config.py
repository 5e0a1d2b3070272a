"""Agent settings: one frozen object, read from TOML plus environment, checked once."""

from __future__ import annotations

import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedmq.broker.config import ConfigReader, load_toml
from fedmq.broker.errors import ConfigError
from fedmq.broker.settings import BrokerSettings
from fedmq.broker.topics import TopicError, check_device, check_name

BACKENDS = ("auto", "numpy", "onnx", "wasm")
DEFAULT_MAX_MODEL_BYTES = 64 * 1024 * 1024


def default_device_id() -> str:
    name = "".join(c if (c.isascii() and c.isalnum()) or c in "_.-" else "-" for c in socket.gethostname())[:64]
    return name if name and name[0].isascii() and name[0].isalnum() else f"device-{name}"[:64]


@dataclass(frozen=True, slots=True)
class AgentConfig:
    device_id: str
    state_dir: Path
    data: Path | None = None
    fleet: str = "default"
    broker: BrokerSettings = field(default_factory=BrokerSettings)
    backend: str = "auto"             # auto = the fastest backend whose dependencies are installed
    wasm_module: Path | None = None   # a Wasm kernel other than the shipped one (backend "wasm")
    max_model_bytes: int = DEFAULT_MAX_MODEL_BYTES
    resend_after_s: float = 30.0      # re-publish an update whose receipt has not come after this long
    seed: str | None = None           # shuffling seed for local training; default: the device id
    fleet_public_key: Path | None = None  # Ed25519 public key (PEM): when set, only signed models install
    #: the fleet CA (PEM) whose operator certificates sign commands: when set, only signed commands
    #: are obeyed (default: the broker's ca_file when the agent uses a client certificate)
    operator_ca_file: Path | None = None
    operator_crl_file: Path | None = None
    #: refuse a model more than this many versions ahead of the installed one (0 = no bound)
    max_version_jump: int = 100_000
    metrics_host: str = "127.0.0.1"   # Prometheus /metrics address
    metrics_port: int = 0             # 0 = no metrics endpoint (the default on devices)
    slowdown: float = 1.0             # >1 sleeps (slowdown-1) x the training time after each update: a simulated straggler

    def __post_init__(self) -> None:
        for key, check, value in (("device_id", check_device, self.device_id),
                                  ("fleet", lambda v: check_name(v, "fleet"), self.fleet)):
            try:
                check(value)
            except TopicError as exc:
                raise ConfigError(str(exc), key=key) from None
        if self.backend not in BACKENDS:
            raise ConfigError(f"unknown backend {self.backend!r}; available: {list(BACKENDS)}", key="backend")
        if not 1.0 <= self.slowdown <= 1000.0:
            raise ConfigError(f"must be from 1 (no slowdown) to 1000, got {self.slowdown}", key="slowdown")

    @classmethod
    def from_file(cls, path: str | Path, **overrides: Any) -> AgentConfig:
        return cls.from_mapping(load_toml(path), source=str(path), **overrides)

    @classmethod
    def from_mapping(cls, data: dict[str, Any], *, source: str = "<config>", **overrides: Any) -> AgentConfig:
        top = ConfigReader(data, source)
        try:
            fields: dict[str, Any] = dict(
                device_id=top.get("device_id", str, None) or default_device_id(),
                fleet=top.get("fleet", str, "default"),
                state_dir=Path(top.get("state_dir", str, expect="a directory for the agent's model and outbox")),
                data=Path(d) if (d := top.get("data", str, None)) else None,
                backend=top.get("backend", str, "auto"),
                wasm_module=Path(w) if (w := top.get("wasm_module", str, None)) else None,
                max_model_bytes=top.get("max_model_bytes", int, DEFAULT_MAX_MODEL_BYTES,
                                        check=lambda v: 1024 <= v <= 1 << 30, expect="1 KiB to 1 GiB"),
                resend_after_s=top.get("resend_after_s", float, 30.0, check=lambda v: v > 0, expect="positive"),
                seed=top.get("seed", str, None),
                fleet_public_key=Path(k) if (k := top.get("fleet_public_key", str, None)) else None,
                operator_ca_file=Path(k) if (k := top.get("operator_ca_file", str, None)) else None,
                operator_crl_file=Path(k) if (k := top.get("operator_crl_file", str, None)) else None,
                max_version_jump=top.get("max_version_jump", int, 100_000, check=lambda v: v >= 0,
                                         expect="0 (no bound) or a positive integer"),
                slowdown=top.get("slowdown", float, 1.0),
                metrics_host=(met := top.section("metrics")).get("host", str, "127.0.0.1"),
                metrics_port=met.get("port", int, 0, check=lambda v: 0 <= v < 65536, expect="0 (off) to 65535"),
                broker=BrokerSettings.from_config(top.section("broker")),
            )
            top.finish()
            broker = fields["broker"]
            if fields["operator_ca_file"] is None and broker.cert_file and broker.ca_file:
                # the fleet PKI: the CA of the broker's certificate issues the operators' too
                fields["operator_ca_file"] = Path(broker.ca_file)
                crl = Path(broker.ca_file).parent / "crl.pem"
                if fields["operator_crl_file"] is None and crl.exists():
                    fields["operator_crl_file"] = crl
            fields.update(overrides)
            return cls(**fields)
        except ConfigError as exc:
            if exc.source is None:
                raise ConfigError(str(exc).split(": ", 1)[-1] if exc.key else str(exc), key=exc.key, source=source) from None
            raise
