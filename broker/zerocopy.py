"""Large PUBLISH payloads handed over without paho's copies.

paho-mqtt 2.x decodes a PUBLISH with ``struct.unpack`` and slices: the payload is copied four or
five times (the topic split, the packet id split, the properties' slices) before the application
sees it. For a 4 MB model update that is 16-20 MB of fresh memory written per message, on the
event-loop thread, under the GIL: more CPU than the aggregator's whole fold of the update.

:func:`zero_copy` registers one aiomqtt client: for its PUBLISH packets of at least
:data:`LARGE` bytes, the payload is paho's own receive buffer (a ``bytearray``) with the header cut
off the front, which CPython does without moving the bytes. paho starts a new buffer for every
packet, so nothing else holds that one. Everything else (smaller packets, every other client in
the process, paho versions without the module-level decoder this relies on) goes through paho's
own decoder unchanged. ``tests/test_zerocopy.py`` checks both decoders agree on every field.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import socket
import ssl
import struct
import threading
import weakref
from typing import Any

import aiomqtt
from paho.mqtt.client import time_func

log = logging.getLogger(__name__)

#: Payloads below this go through paho's decoder: the copies are cheap, and small messages keep
#: paho's ``bytes`` payloads.
LARGE = 64 * 1024

_H = struct.Struct("!H")
_SOCKETS = (socket.socket, ssl.SSLSocket)
_clients: weakref.WeakSet[Any] = weakref.WeakSet()
_lock = threading.Lock()
_installed = False


def _buffer_allocator() -> Any:
    """``size -> bytearray`` whose bytes are not zeroed first, where CPython's C API allows it.

    ``bytearray(size)`` writes ``size`` zeros under the GIL, to be overwritten by ``recv_into``
    at once: for a 4 MB update that is a pass over fresh memory (its page faults included) on the
    event-loop thread, while the ingest worker waits for the GIL. ``PyByteArray_FromStringAndSize``
    with no source allocates without writing (ctypes' ``pythonapi`` holds the GIL for the call, as
    the C API needs), so the pages are first touched by ``recv_into``, outside the GIL. Every
    byte is received before the buffer is handed over (a buffer cut short by a dropped
    connection is dropped with it), so nothing uninitialized can reach a payload.
    """
    try:
        function = ctypes.pythonapi.PyByteArray_FromStringAndSize
    except (AttributeError, ValueError):  # not CPython
        return bytearray
    function.restype = ctypes.py_object
    function.argtypes = (ctypes.c_char_p, ctypes.c_ssize_t)
    return lambda size: function(None, size)


#: Makes the receive buffer of a large packet (see :func:`_buffer_allocator`).
new_buffer = _buffer_allocator()


@functools.cache  # called for every large packet: look the modules up once
def _paho_parts() -> tuple[Any, Any, Any, Any, Any] | None:
    try:
        from paho.mqtt import _packet
        from paho.mqtt.enums import MQTTProtocolVersion
        from paho.mqtt.packettypes import PacketTypes
        from paho.mqtt.properties import Properties, VariableByteIntegers
    except ImportError:
        return None
    if not callable(getattr(_packet, "decode_publish", None)) or not hasattr(_packet, "PublishPacket"):
        return None
    return _packet, MQTTProtocolVersion, PacketTypes, Properties, VariableByteIntegers


def decode_publish_in_place(header: int, packet: bytearray, protocol: Any) -> Any:
    """paho's ``decode_publish``, with ``packet`` itself, header removed, as the payload."""
    parts = _paho_parts()
    assert parts is not None
    _packet, version, packet_types, properties_type, varint = parts
    if len(packet) < 2:
        raise _packet.MalformedPacket("PUBLISH shorter than its topic length")
    (topic_length,) = _H.unpack_from(packet, 0)
    position = 2 + topic_length
    if position > len(packet):
        raise _packet.MalformedPacket("PUBLISH topic longer than the packet")
    topic = bytes(packet[2:position])
    if protocol != version.MQTTv5 and topic_length == 0:
        raise _packet.MalformedPacket("topic can't be empty in MQTTv3")
    qos = (header & 0x06) >> 1
    mid = 0
    if qos > 0:
        if position + 2 > len(packet):
            raise _packet.MalformedPacket("PUBLISH packet id missing")
        (mid,) = _H.unpack_from(packet, position)
        position += 2
    properties = None
    if protocol == version.MQTTv5:
        properties = properties_type(packet_types.PUBLISH)
        length, used = varint.decode(bytes(packet[position:position + 4]))
        end = position + used + length
        if end > len(packet):
            raise _packet.MalformedPacket("PUBLISH properties longer than the packet")
        _, consumed = properties.unpack(bytes(packet[position:end]))
        position += consumed
    del packet[:position]  # CPython moves the start of a bytearray, not its bytes
    return _packet.PublishPacket(dup=(header & 0x08) != 0, qos=qos, retain=(header & 0x01) != 0,
                                 topic=topic, mid=mid, properties=properties, payload=packet)


def _install(parts: tuple[Any, ...]) -> None:
    global _installed
    _packet = parts[0]
    original = _packet.decode_publish
    in_place = _packet.convert_exception(decode_publish_in_place) if hasattr(_packet, "convert_exception") \
        else decode_publish_in_place

    def decode_publish(header: int, packet: Any, protocol: Any) -> Any:
        if len(packet) >= LARGE and isinstance(packet, bytearray):
            for client in list(_clients):
                if client._in_packet.get("packet") is packet:
                    return in_place(header, packet, protocol)
        return original(header, packet, protocol)

    decode_publish.original = original  # type: ignore[attr-defined]
    _packet.decode_publish = decode_publish
    _installed = True


class _PayloadReader:
    """Reads a large packet straight into one buffer of its final size.

    paho reads a packet's body with ``recv(bytes still missing)`` (a fresh buffer of that size for
    every chunk) and appends each chunk to a growing ``bytearray`` (which reallocates and copies as
    it grows). Installed as the client's ``_sock_recv``, this takes over the body of a packet of
    at least :data:`LARGE` bytes: ``recv_into`` fills a buffer allocated once, and when it is full,
    it becomes paho's packet buffer, and paho appends the last byte as if it had read it alone.
    """

    def __init__(self, paho: Any) -> None:
        self.paho = paho
        self.recv = paho._sock_recv
        self.buffer: bytearray | None = None
        self.filled = 0
        self.owner: Any = None  # paho's packet state the buffer belongs to (a new one per packet)

    def __call__(self, bufsize: int) -> bytes:
        paho = self.paho
        packet = paho._in_packet
        sock = paho._sock
        if (bufsize < LARGE or not packet.get("have_remaining") or packet.get("to_process") != bufsize
                or packet.get("packet") or type(sock) not in _SOCKETS):
            return self.recv(bufsize)
        if self.buffer is None or self.owner is not packet:  # (a reconnect starts a new packet state)
            self.buffer, self.filled, self.owner = new_buffer(bufsize), 0, packet
        buffer = self.buffer
        with memoryview(buffer) as view:
            while self.filled < bufsize:
                try:
                    received = sock.recv_into(view[self.filled:])
                except ssl.SSLWantReadError as exc:
                    raise BlockingIOError from exc
                except ssl.SSLWantWriteError as exc:
                    paho._call_socket_register_write()
                    raise BlockingIOError from exc
                if received == 0:  # the connection closed: paho handles it
                    self.buffer = None
                    return b""
                self.filled += received
                with paho._msgtime_mutex:
                    paho._last_bytes_received = time_func()  # the clock paho's keepalive reads
        self.buffer = self.owner = None
        last = bytes(buffer[-1:])
        del buffer[-1:]  # keeps the allocation: paho's append of the last byte does not reallocate
        packet["packet"] = buffer
        packet["to_process"] = 1
        return last


def zero_copy(client: aiomqtt.Client) -> bool:
    """Hand ``client``'s large payloads over without copies (as ``bytearray``); return whether
    this paho supports it (if not, nothing changes and the payloads are copied as before)."""
    paho = getattr(client, "_client", None)
    parts = _paho_parts()
    if paho is None or parts is None or not isinstance(getattr(paho, "_in_packet", None), dict):
        log.info("zero-copy receive unavailable with this paho-mqtt; payloads are copied as usual")
        return False
    with _lock:
        if not _installed:
            _install(parts)
        _clients.add(paho)
    paho._sock_recv = _PayloadReader(paho)
    return True
