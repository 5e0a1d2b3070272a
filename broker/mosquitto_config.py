"""Render a Mosquitto 2.x configuration and ACL file that lock a fleet down to the fedmq v1 topic tree.

Identity
    ``allow_anonymous false`` always. With ``tls`` alone, clients need a certificate from the
    fleet CA (``require_certificate true``) and the broker takes the certificate's CN as the MQTT
    username (``use_identity_as_username true``); any password is ignored. With a
    ``password_file``, clients authenticate with username and password (over TLS when ``tls`` is
    also given, then without client certificates; in clear text otherwise: loopback or VPN only).

Why the device rules use ``%u`` and not ``%c``
    The client id is whatever the client sends, but the username is fixed by the certificate's CN
    (or by the password file). A rule written with ``%c`` would let a device holding the
    certificate of ``dev-a`` connect with client id ``dev-b`` and publish ``dev-b``'s updates and
    status and read its receipts and commands. With ``%u`` the topics follow the authenticated
    identity whatever client id is sent. On top of that the listener sets
    ``use_username_as_clientid true`` (``pin_client_id``): the broker replaces the client id by the
    username, so ``%c == %u`` for every client and a device cannot take over another device's
    session (kick it off, or resume its persistent session and its queued messages): a CONNECT
    from ``dev-a``'s certificate with client id ``dev-b`` becomes client ``dev-a``. The cost: one
    identity is one
    connection. Two processes sharing a certificate (two ``fedmq ops`` shells of one operator, two
    aggregator replicas) take each other's session over, so give each its own identity.

ACL semantics (Mosquitto 2.0 ``acl_file``, checked in ``src/security_default.c``)
    * ``topic`` lines after ``user NAME`` apply to that username only; lines before any ``user``
      line apply to anonymous clients only (none here). A ``user NAME`` block with only
      ``topic deny #`` takes every right away from NAME, patterns included (measured with
      2.0.11): that is how a revoked device is shut out (``render_acl(denied_devices=...)``).
    * ``pattern`` lines apply to *every* client, whatever ``user`` block they follow, with ``%u``
      and ``%c`` substituted. So device rights are patterns, and the aggregator and operators get
      them too, for topics named after themselves (``update/aggregator``...). Each privileged
      user block therefore starts with ``topic deny`` lines for those per-identity device topics.
    * For each PUBLISH (``write``) and each delivery (``read``) Mosquitto checks the client's own
      user block first (``deny`` entries before grants; a matching ``deny`` refuses at once, a
      matching grant allows at once), then the patterns (again ``deny`` first). No match: denied.
    * SUBSCRIBE is never refused by the ACL file (the SUBACK says granted); the ``read`` check
      runs per message at delivery, so a forbidden subscription silently receives nothing. A
      denied PUBLISH is dropped (an MQTT 5 PUBACK carries "not authorized", a 3.1.1 one does not).
    * The Last Will is not checked at CONNECT (2.0.11 accepts any will topic); it is checked as a
      ``write`` by its owner's identity when the broker publishes it, and silently dropped when
      denied. A device's will on its own ``status/<me>`` therefore arrives, one on another
      device's status topic never does.
    * A ``pattern`` without ``%u``/``%c`` (the shared device reads: model, artifacts, ``cmd/all``,
      aggregator status) works but makes Mosquitto log a warning at start-up: expected.
    * When patterns exist, a client whose username or client id contains ``+`` or ``#`` is denied
      everything; fedmq names cannot contain them (:func:`fedmq.broker.topics.check_name`).
    * Privileged identities are matched by exact username, so a device certificate must never be
      issued under the aggregator's or an operator's name (:mod:`fedmq.broker.pki` refuses).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from . import topics
from .errors import ConfigError

#: Default ``max_packet_size``: the whole MQTT packet, for every client alike (Mosquitto has no
#: per-user limit, so this must fit the largest model or artifact the aggregator publishes; the
#: aggregator itself caps updates). 64 MiB.
DEFAULT_MAX_PACKET_BYTES = 64 * 1024 * 1024
#: The largest packet MQTT can frame: 5-byte fixed header + a 268,435,455-byte remaining length.
MQTT_MAX_PACKET_BYTES = 268_435_460
_MIN_PACKET_BYTES = 20  # Mosquitto 2.0.11 refuses smaller values at start-up
#: Mosquitto's own defaults, written out so that the file says what the broker enforces.
DEFAULT_MAX_INFLIGHT_MESSAGES = 20
DEFAULT_MAX_QUEUED_MESSAGES = 1000


@dataclass(frozen=True, slots=True)
class TlsFiles:
    """The broker's TLS files: the CA that signs client certificates, the server certificate and key."""

    ca_file: Path
    cert_file: Path
    key_file: Path


def _conf_path(value: str | os.PathLike[str], key: str) -> str:
    text = os.fspath(value)
    if not os.path.isabs(text):
        # Mosquitto resolves relative paths against its working directory, which a service
        # manager sets to / : an absolute path means the same thing everywhere.
        raise ConfigError(f"must be an absolute path, got {text!r}", key=key)
    if any(c.isspace() for c in text) or "#" in text:
        raise ConfigError(f"must not contain whitespace or '#' (Mosquitto's config syntax), got {text!r}", key=key)
    return text


def render_config(
    *,
    fleet: str,
    port: int,
    bind: str = "127.0.0.1",
    tls: TlsFiles | None,
    password_file: str | os.PathLike[str] | None = None,
    acl_path: str | os.PathLike[str],
    persistence_dir: str | os.PathLike[str] | None = None,
    max_packet_bytes: int | None = DEFAULT_MAX_PACKET_BYTES,
    pin_client_id: bool = True,
    tls_version: str = "tlsv1.2",
    crl_file: str | os.PathLike[str] | None = None,
    max_inflight_messages: int = DEFAULT_MAX_INFLIGHT_MESSAGES,
    max_queued_messages: int = DEFAULT_MAX_QUEUED_MESSAGES,
    max_queued_bytes: int | None = None,
) -> str:
    """Return a complete Mosquitto 2.x configuration with one listener for ``fleet``.

    * ``tls`` only: mutual TLS; the certificate CN is the username.
    * ``tls`` and ``password_file``: TLS without client certificates, username/password login.
    * ``password_file`` only: plain TCP with username/password (loopback or a VPN only).

    All paths must be absolute. ``persistence_dir`` turns persistence on (the broker's user must
    be able to write there); ``None`` writes nothing about it, which keeps the setting of the file
    that includes this one (Debian's main file: on, in ``/var/lib/mosquitto/``) or Mosquitto's
    default (off: sessions and queued QoS 1 messages are lost on a broker restart).
    ``max_packet_bytes=None`` leaves Mosquitto's default (no limit). ``pin_client_id`` sets
    ``use_username_as_clientid`` (see the module docstring).

    ``crl_file`` (client certificates only) is the fleet CA's revocation list
    (:func:`fedmq.broker.pki.crl_file`): Mosquitto refuses a revoked certificate at the TLS
    handshake. It must exist when Mosquitto starts, and every client is refused while it is
    expired or not yet valid (:func:`fedmq.broker.pki.revoke` signs it until the CA expires).

    ``max_inflight_messages``, ``max_queued_messages`` (Mosquitto's defaults, 20 and 1000) and
    ``max_queued_bytes`` (``None``: no byte limit) bound each client's outgoing QoS 1 window and
    the queue behind it, also while a persistent session is offline; past them Mosquitto drops
    that client's messages silently. The generated file states these limits, and what Mosquitto
    cannot limit, in its comments.

    Usable as the file of ``mosquitto -c`` or as a drop-in in ``/etc/mosquitto/conf.d/``. Never
    add a second listener next to it: with ``per_listener_settings false`` the ACL and the
    password file are global, and only this listener checks certificates.
    """
    try:
        topics.check_name(fleet, "fleet")
    except topics.TopicError as exc:
        raise ConfigError(str(exc), key="fleet") from exc
    if not isinstance(port, int) or isinstance(port, bool) or not 0 < port < 65536:
        raise ConfigError(f"must be from 1 to 65535, got {port!r}", key="port")
    if not bind or any(c.isspace() for c in bind):
        raise ConfigError(f"must be an address or host name, got {bind!r}", key="bind")
    if tls is None and password_file is None:
        raise ConfigError("give tls (client certificates) or password_file: anonymous access is never allowed", key="tls")
    if max_packet_bytes is not None and not _MIN_PACKET_BYTES <= max_packet_bytes <= MQTT_MAX_PACKET_BYTES:
        raise ConfigError(f"must be from {_MIN_PACKET_BYTES} to {MQTT_MAX_PACKET_BYTES} bytes, got {max_packet_bytes}",
                          key="max_packet_bytes")
    if tls_version not in ("tlsv1.2", "tlsv1.3"):
        raise ConfigError(f"must be 'tlsv1.2' or 'tlsv1.3', got {tls_version!r}", key="tls_version")
    if crl_file is not None and (tls is None or password_file is not None):
        raise ConfigError("a CRL applies to client certificates: give it with tls and without password_file",
                          key="crl_file")
    for key, value, allow_none in (("max_inflight_messages", max_inflight_messages, False),
                                   ("max_queued_messages", max_queued_messages, False),
                                   ("max_queued_bytes", max_queued_bytes, True)):
        if value is None and allow_none:
            continue
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            # 0 means "no limit" to Mosquitto: say so with None (max_queued_bytes) instead.
            raise ConfigError(f"must be a positive integer, got {value!r}", key=key)

    if tls is not None and password_file is None:
        auth = "client certificates from the fleet CA; username = certificate CN"
    elif tls is not None:
        auth = "username and password over TLS (no client certificates)"
    else:
        auth = "username and password over plain TCP (loopback or VPN only)"
    lines = [
        f"# Mosquitto configuration for fedmq fleet {fleet!r}, generated by fedmq (fedmq broker config).",
        f"# Authentication: {auth}. Topic rights: the ACL file below.",
        "per_listener_settings false",
        "allow_anonymous false",
        f"acl_file {_conf_path(acl_path, 'acl_path')}",
    ]
    if password_file is not None:
        lines.append(f"password_file {_conf_path(password_file, 'password_file')}")
    packet_limit = f"max_packet_size {max_packet_bytes} bytes" if max_packet_bytes is not None else "no max_packet_size"
    queue_bytes = f"max_queued_bytes {max_queued_bytes}" if max_queued_bytes is not None else "no byte limit"
    lines += [
        "#",
        "# What this broker enforces for fedmq (Mosquitto 2.0 has no per-topic and no per-user limits):",
        f"# - {packet_limit}: any packet of any client, on any topic. A device can therefore publish,",
        "#   and retain on its own status topic, a message of up to this size; the aggregator caps the",
        "#   updates it decodes and clears oversized retained device statuses itself.",
        f"# - per client: max_inflight_messages {max_inflight_messages} outgoing QoS 1 messages, then",
        f"#   max_queued_messages {max_queued_messages} queued ({queue_bytes}), also while a persistent session",
        "#   is offline; past that Mosquitto drops that client's messages silently (a device's outbox",
        "#   publishes an update again until its receipt arrives).",
        "# - no publish rate limit: an identity may publish and reconnect as often as it likes.",
    ]
    if crl_file is not None:
        lines += ["# - revoked certificates (crlfile, fedmq pki revoke) are refused at the TLS handshake once the",
                  "#   broker reloaded (SIGHUP) or restarted; a connection opened before stays open, with no topic",
                  "#   rights once the reloaded ACL denies its identity (see SECURITY.md)."]
    lines.append("#")
    if max_packet_bytes is not None:
        lines.append(f"max_packet_size {max_packet_bytes}")
    lines += [f"max_inflight_messages {max_inflight_messages}", f"max_queued_messages {max_queued_messages}"]
    if max_queued_bytes is not None:
        lines.append(f"max_queued_bytes {max_queued_bytes}")
    if persistence_dir is not None:
        # Mosquitto concatenates location and file name: the trailing slash is needed.
        lines += ["persistence true", f"persistence_location {_conf_path(persistence_dir, 'persistence_dir').rstrip('/')}/"]
    lines += ["", f"listener {port} {bind}"]
    if pin_client_id:
        lines.append("use_username_as_clientid true")
    if tls is not None:
        lines += [
            f"cafile {_conf_path(tls.ca_file, 'tls.ca_file')}",
            f"certfile {_conf_path(tls.cert_file, 'tls.cert_file')}",
            f"keyfile {_conf_path(tls.key_file, 'tls.key_file')}",
            f"tls_version {tls_version}",
        ]
        if password_file is None:
            lines += ["require_certificate true", "use_identity_as_username true"]
            if crl_file is not None:
                lines.append(f"crlfile {_conf_path(crl_file, 'crl_file')}")
        else:
            lines += ["require_certificate false"]
    return "\n".join(lines) + "\n"


def render_acl(fleet: str, *, aggregator: str, operators: list[str] | tuple[str, ...] = (),
               denied_devices: list[str] | tuple[str, ...] = ()) -> str:
    """Return the ACL file for ``fleet``: what the aggregator, each operator and every device may do.

    Devices are every other authenticated identity: they may publish only their own
    ``update/<me>`` and ``status/<me>``, and read the model, artifacts, the aggregator's status,
    their own receipts and commands, and ``cmd/all``.

    ``denied_devices`` (the revoked ones, :func:`fedmq.broker.pki.revoked_device_ids`) get a
    ``user NAME`` block with ``topic deny #``: no topic at all, whatever the patterns grant
    (checked with Mosquitto 2.0.11: the user block's deny wins over the ``%u`` patterns, and a
    reload with SIGHUP applies it to connections already open). That is the second layer behind
    the CRL, and the only one that reaches a revoked device still connected.
    """
    try:
        topics.check_name(fleet, "fleet")
        topics.check_name(aggregator, "aggregator name")
        for name in operators:
            topics.check_name(name, "operator name")
        for name in denied_devices:
            topics.check_device(name)
    except topics.TopicError as exc:
        raise ConfigError(str(exc), key="acl") from exc
    names = [aggregator, *operators]
    if len(set(names)) != len(names):
        raise ConfigError(f"the aggregator and operator names must be distinct, got {names}", key="acl")
    if privileged := sorted(set(names) & set(denied_devices)):
        raise ConfigError(f"{privileged} are the aggregator or operators, not devices: they cannot be denied "
                          "as revoked devices", key="acl")
    if "all" in names:
        raise ConfigError("'all' cannot be an identity: it is the broadcast command topic", key="acl")

    # Concrete topics come from the topic module; wildcard filters are the concrete topic with its
    # last level replaced, so this file never spells the tree out on its own.
    def last_level(topic: str, level: str) -> str:
        return topic.rsplit("/", 1)[0] + "/" + level

    placeholder = "x"
    model = topics.model_topic(fleet)
    canary = topics.canary_topic(fleet)
    aggregator_status = topics.aggregator_status_topic(fleet)
    updates = topics.updates_filter(fleet)
    statuses = topics.statuses_filter(fleet)
    receipts = last_level(topics.receipt_topic(fleet, placeholder), "+")
    commands = last_level(topics.command_topic(fleet, placeholder), "+")
    artifacts = last_level(topics.artifact_topic(fleet, "0" * 64), "+")
    ops_requests = topics.ops_requests_filter(fleet)
    ops_responses = last_level(topics.ops_response_topic(fleet, placeholder), "+")

    def device_topic_denials(name: str) -> list[str]:
        # Patterns give every identity the device rights on topics named after itself; a
        # privileged identity is no device, so those topics are closed to it.
        per_device = (topics.update_topic, topics.status_topic, topics.receipt_topic, topics.command_topic,
                      topics.freeze_topic)
        return [f"topic deny {topic_of(fleet, name)}" for topic_of in per_device]

    lines = [
        f"# Mosquitto ACL for fedmq fleet {fleet!r}, generated by fedmq (fedmq broker config).",
        "# `user` blocks: one identity each (the MQTT username, i.e. the certificate CN).",
        "# `pattern` lines: every identity, %u = its username. Denials are checked before grants.",
        "",
        f"user {aggregator}",
        *device_topic_denials(aggregator),
        f"topic read {updates}",
        f"topic read {ops_requests}",
        f"topic read {statuses}",
        # to delete what a device parked on the broker: an oversized retained status, a retained
        # update (the broker has no per-topic size limit and cannot forbid the retain flag)
        f"topic write {statuses}",
        f"topic write {updates}",
        f"topic write {model}",
        f"topic write {canary}",
        f"topic write {artifacts}",
        f"topic write {receipts}",
        f"topic write {aggregator_status}",
        f"topic write {ops_responses}",
    ]
    for name in operators:
        lines += [
            "",
            f"user {name}",
            *device_topic_denials(name),
            f"topic write {commands}",
            f"topic write {commands}/freeze",
            f"topic write {topics.ops_request_topic(fleet, name)}",
            f"topic read {topics.ops_response_topic(fleet, name)}",
            f"topic read {statuses}",
            f"topic read {aggregator_status}",
            f"topic read {model}",
        ]
    for name in sorted(set(denied_devices)):
        lines += ["", "# revoked (fedmq pki revoke): nothing, even while a connection opened before is still up",
                  f"user {name}", "topic deny #"]
    lines += [
        "",
        "# devices: every other authenticated identity",
        f"pattern write {last_level(topics.update_topic(fleet, placeholder), '%u')}",
        f"pattern write {last_level(topics.status_topic(fleet, placeholder), '%u')}",
        f"pattern read {last_level(topics.receipt_topic(fleet, placeholder), '%u')}",
        f"pattern read {last_level(topics.command_topic(fleet, placeholder), '%u')}",
        f"pattern read {last_level(topics.command_topic(fleet, placeholder), '%u')}/freeze",
        f"pattern read {topics.broadcast_command_topic(fleet)}",
        f"pattern read {topics.broadcast_freeze_topic(fleet)}",
        f"pattern read {model}",
        f"pattern read {canary}",
        f"pattern read {artifacts}",
        f"pattern read {aggregator_status}",
    ]
    return "\n".join(lines) + "\n"
