"""How to reach the broker: host, port, TLS, credentials and MQTT protocol version.

``protocol`` is ``"5"``, ``"3.1.1"`` or ``"auto"`` (try MQTT 5, fall back to 3.1.1 when the broker
refuses it: the embedded amqtt broker speaks 3.1.1 only). fedmq's protocol works over 3.1.1 and uses
MQTT 5 features only as extras.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass, field, replace
from typing import Any, Literal
from urllib.parse import parse_qs, unquote, urlsplit

import aiomqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from .config import ConfigReader
from .errors import ConfigError
from .files import check_private_key_file

Protocol = Literal["auto", "5", "3.1.1"]
PROTOCOLS: tuple[str, ...] = ("auto", "5", "3.1.1")


@dataclass(frozen=True, slots=True)
class BrokerSettings:
    """Connection settings shared by the aggregator, the agents and the ops tools."""

    host: str = "127.0.0.1"
    port: int = 1883
    protocol: Protocol = "auto"
    tls: bool = False
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    keepalive: int = 30
    connect_timeout: float = 10.0

    def __post_init__(self) -> None:
        if self.protocol not in PROTOCOLS:
            raise ConfigError(f"protocol must be one of {list(PROTOCOLS)}, got {self.protocol!r}", key="broker.protocol")
        if not 0 < self.port < 65536:
            raise ConfigError(f"port must be from 1 to 65535, got {self.port}", key="broker.port")
        if not 5 <= self.keepalive <= 65535:
            raise ConfigError(f"keepalive must be from 5 to 65535 seconds, got {self.keepalive}", key="broker.keepalive")

    @classmethod
    def from_url(cls, url: str, **overrides: Any) -> BrokerSettings:
        """Parse ``mqtt://[user[:password]@]host[:port][?protocol=5|3.1.1|auto]`` (``mqtts://`` for TLS)."""
        parts = urlsplit(url)
        if parts.scheme not in ("mqtt", "mqtts"):
            raise ConfigError(f"broker URL {url!r} must start with mqtt:// or mqtts://", key="broker.url")
        try:
            port = parts.port
        except ValueError:
            raise ConfigError(f"broker URL {url!r} has an invalid port", key="broker.url") from None
        if port == 0:
            raise ConfigError(f"broker URL {url!r} has port 0; use a port from 1 to 65535", key="broker.url")
        tls = parts.scheme == "mqtts"
        query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
        unknown = set(query) - {"protocol"}
        if unknown:
            raise ConfigError(f"broker URL has unknown parameters {sorted(unknown)}; only 'protocol' is known",
                              key="broker.url")
        fields: dict[str, Any] = {
            "host": parts.hostname or "127.0.0.1",
            "port": port if port is not None else (8883 if tls else 1883),
            "tls": tls,
            "username": unquote(parts.username) if parts.username else None,
            "password": unquote(parts.password) if parts.password else None,
        }
        if "protocol" in query:
            fields["protocol"] = query["protocol"]
        fields.update(overrides)
        return cls(**fields)

    @classmethod
    def from_config(cls, reader: ConfigReader) -> BrokerSettings:
        """Read the ``[broker]`` table: ``url`` or ``host``/``port``, plus the other fields."""
        url = reader.get("url", str, None)
        base = cls.from_url(url) if url else cls(host=reader.get("host", str, "127.0.0.1"),
                                                  port=reader.get("port", int, 1883))
        return replace(
            base,
            protocol=reader.get("protocol", str, base.protocol, check=lambda p: p in PROTOCOLS,
                                expect=f"one of {list(PROTOCOLS)}"),
            tls=reader.get("tls", bool, base.tls),
            ca_file=reader.get("ca_file", str, None),
            cert_file=reader.get("cert_file", str, None),
            key_file=reader.get("key_file", str, None),
            username=reader.get("username", str, base.username),
            password=reader.get("password", str, base.password),
            keepalive=reader.get("keepalive", int, base.keepalive),
        )

    @property
    def url(self) -> str:
        """The URL without the password (safe to log)."""
        user = f"{self.username}@" if self.username else ""
        scheme = "mqtts" if self.tls else "mqtt"
        return f"{scheme}://{user}{self.host}:{self.port}?protocol={self.protocol}"

    def client(self, *, identifier: str, will: aiomqtt.Will | None = None, persistent_session: bool = False,
               session_expiry: int = 3600, protocol: Literal["5", "3.1.1"] | None = None,
               max_queued_incoming: int | None = None) -> aiomqtt.Client:
        """An aiomqtt client (an async context manager that is the connection).

        ``protocol`` overrides ``self.protocol`` (``auto`` means the caller tries ``5`` first).
        ``persistent_session`` keeps the broker-side session (and QoS 1 messages queued for it)
        across disconnects: MQTT 5 clean start off with a session expiry, 3.1.1 clean session off.
        """
        version = protocol or ("3.1.1" if self.protocol == "3.1.1" else "5")
        kwargs: dict[str, Any] = {
            "hostname": self.host,
            "port": self.port,
            "identifier": identifier,
            "username": self.username,
            "password": self.password,
            "will": will,
            "keepalive": self.keepalive,
            "timeout": self.connect_timeout,
            "max_queued_incoming_messages": max_queued_incoming,
        }
        if version == "5":
            kwargs["protocol"] = aiomqtt.ProtocolVersion.V5
            if persistent_session:
                props = Properties(PacketTypes.CONNECT)
                props.SessionExpiryInterval = session_expiry
                kwargs["properties"] = props
                kwargs["clean_start"] = False
            else:
                kwargs["clean_start"] = True
        else:
            kwargs["protocol"] = aiomqtt.ProtocolVersion.V311
            kwargs["clean_session"] = not persistent_session
        if self.tls:
            kwargs["tls_context"] = self.ssl_context()
        return aiomqtt.Client(**kwargs)

    def ssl_context(self) -> ssl.SSLContext:
        """The TLS context of :meth:`client`: the broker is checked against ``ca_file`` (the system's
        CAs when ``None``), and ``cert_file``/``key_file`` are our identity when given.

        Read at every (re)connection, so a renewed certificate is picked up. :class:`ConfigError`
        when a file cannot be loaded, or when the private key can be read or written by other
        users (:func:`~fedmq.broker.files.check_private_key_file`; a group-readable key is logged).
        """
        if self.cert_file:
            key_path, key = self.key_file, "broker.key_file"
            if key_path is None and _holds_private_key(self.cert_file):
                key_path, key = self.cert_file, "broker.cert_file"
            if key_path is not None:
                check_private_key_file(key_path, what="the TLS client key", key=key)
        try:
            context = ssl.create_default_context(cafile=self.ca_file)
            if self.cert_file:
                context.load_cert_chain(self.cert_file, self.key_file)
        except OSError as exc:  # ssl.SSLError included
            raise ConfigError(f"cannot load the TLS files (ca_file={self.ca_file}, cert_file={self.cert_file}, "
                              f"key_file={self.key_file}): {exc}", key="broker") from None
        return context


def _holds_private_key(path: str) -> bool:
    """Whether a PEM file carries a private key too (``cert_file`` without ``key_file``)."""
    try:
        with open(path, "rb") as handle:
            return b"PRIVATE KEY-----" in handle.read(1 << 20)
    except OSError:
        return False  # load_cert_chain reports it


def is_protocol_refusal(exc: BaseException) -> bool:
    """True when a connect failed because the broker does not speak the MQTT version we asked for."""
    text = str(exc).lower()
    return "protocol" in text and ("unsupported" in text or "unacceptable" in text or "version" in text)
