"""paho-mqtt internals, each guarded by a shim (the list: bridge/compat/__init__.py)."""

from __future__ import annotations

import collections
import contextlib
import inspect
import socket
import ssl
import struct
from collections.abc import Callable
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt import _packet
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.exception import MalformedPacket, MQTTException
from paho.mqtt.matcher import MQTTMatcher
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties, VariableByteIntegers
from paho.mqtt.reasoncodes import ReasonCode

from bridge.compat.shims import SHIMS, Shim, register

# --- publish_decoder ------------------------------------------------------------------------------

Decoder = Callable[[int, bytes | bytearray, MQTTProtocolVersion], _packet.PublishPacket]

LEAN_FROM = 64 * 1024
"""Packets from this many bytes on are decoded here; smaller ones by paho."""

_PROPERTY_OVERREAD = 8
_PAHO_PARAMETERS = ("header", "packet", "protocol")
_PUBLISH_FIELDS = ("dup", "qos", "retain", "topic", "mid", "properties", "payload")
_DECODE_ERRORS = (struct.error, IndexError, KeyError, ValueError, MQTTException)
PAHO_DECODER: Decoder = _packet.decode_publish


def decode_publish(
    header: int, packet: bytes | bytearray, protocol: MQTTProtocolVersion
) -> _packet.PublishPacket:
    """paho's `decode_publish` contract: the PUBLISH fields, or MalformedPacket."""
    if len(packet) < LEAN_FROM:
        return PAHO_DECODER(header, packet, protocol)
    try:
        return _decode_lean(header, packet, protocol)
    except MalformedPacket:
        raise
    except _DECODE_ERRORS as exc:
        raise MalformedPacket(str(exc)) from exc


def _decode_lean(
    header: int, packet: bytes | bytearray, protocol: MQTTProtocolVersion
) -> _packet.PublishPacket:
    qos = (header & 0x06) >> 1
    with memoryview(packet) as view:
        size = len(view)
        topic_end = 2 + int.from_bytes(view[0:2], "big")
        if topic_end > size:
            raise MalformedPacket("topic length exceeds the packet")
        topic = bytes(view[2:topic_end])
        if protocol != MQTTProtocolVersion.MQTTv5 and not topic:
            raise MalformedPacket("topic can't be empty in MQTTv3")
        pos = topic_end
        mid = 0
        if qos > 0:
            if pos + 2 > size:
                raise MalformedPacket("packet ends before its packet identifier")
            mid = int.from_bytes(view[pos : pos + 2], "big")
            pos += 2
        properties = None
        if protocol == MQTTProtocolVersion.MQTTv5:
            properties = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
            head = bytes(view[pos : pos + 4])
            length, length_size = VariableByteIntegers.decode(head)  # type: ignore[no-untyped-call]
            # paho parses properties out of the whole rest of the packet, and its last property
            # may read up to 8 bytes past their declared length (an identifier and a 4-byte
            # value) without failing; the slice keeps that leeway, so both decoders agree.
            end = pos + length_size + length + _PROPERTY_OVERREAD
            _, used = properties.unpack(bytes(view[pos:end]))  # type: ignore[no-untyped-call]
            pos += used
        payload = bytes(view[pos:])
    return _packet.PublishPacket(
        dup=bool(header & 0x08),
        qos=qos,
        retain=bool(header & 0x01),
        topic=topic,
        mid=mid,
        properties=properties,
        payload=payload,
    )


def decoder_compatible(paho_decoder: Callable[..., object]) -> bool:
    """Whether `paho_decoder` has the signature and result fields `decode_publish` mirrors."""
    try:
        params = tuple(inspect.signature(paho_decoder).parameters)
        fields = _packet.PublishPacket._fields
    except (AttributeError, TypeError, ValueError):
        return False
    return params == _PAHO_PARAMETERS and fields == _PUBLISH_FIELDS


def _check_decoder() -> bool:
    return _packet.decode_publish is decode_publish or decoder_compatible(PAHO_DECODER)


def _install_decoder(on: bool) -> None:
    chosen: Decoder = decode_publish if on else PAHO_DECODER
    _packet.decode_publish = chosen  # type: ignore[assignment]


# --- paho client internals ------------------------------------------------------------------------


def _probe_client() -> paho.Client:
    return paho.Client(CallbackAPIVersion.VERSION2)


def _check_out_packet() -> bool:
    # paho 2.x queues packets as dicts built in `_packet_queue` and writes them from `pos` on.
    code = paho.Client._packet_queue.__code__  # noqa: SLF001  (the shim's check)
    keys = next((c for c in code.co_consts if isinstance(c, tuple) and "pos" in c), ())
    queue = _probe_client()._out_packet  # noqa: SLF001  (the shim's check)
    return (
        isinstance(queue, collections.deque)
        and "_out_packet" in code.co_names
        and {"mid", "pos", "packet"} <= set(keys)
    )


def write_large_without_copies(client: paho.Client, mid: int) -> None:
    """Let paho send the queued packet `mid` through a memoryview; never raises.

    paho slices the packet's bytearray on every socket write, copying the unsent rest each
    time (a transient third copy of a 33 MiB base64 reply); a memoryview slice copies nothing.
    """
    if not SHIMS["out_packet_view"].active:
        return
    try:
        for packet in reversed(client._out_packet):  # noqa: SLF001  (checked at start-up)
            if packet["mid"] == mid and packet["pos"] == 0:
                packet["packet"] = memoryview(packet["packet"])  # type: ignore[typeddict-item]
                return
    except (AttributeError, KeyError, TypeError):
        SHIMS["out_packet_view"].active = False  # paho copies as usual from now on


def _check_max_inflight() -> bool:
    client = _probe_client()
    value = getattr(client, "_max_inflight_messages", None)
    return isinstance(value, int) and client.max_inflight_messages == value


def set_max_inflight(client: paho.Client, value: int) -> None:
    """Let paho keep up to `value` QoS>0 publishes unacknowledged (the broker's Receive Maximum).

    paho's public setter refuses changes once connected; without the shim paho keeps the limit
    set before connecting (fewer in flight: slower, never wrong).
    """
    if SHIMS["max_inflight"].active:
        client._max_inflight_messages = value  # noqa: SLF001  (checked at start-up)


def _check_raw_topic() -> bool:
    message = paho.MQTTMessage(topic=b"t/\xff")
    return getattr(message, "_topic", None) == b"t/\xff"


def message_topic(message: paho.MQTTMessage) -> str:
    """The message's topic, with bytes that are not UTF-8 replaced (paho's property raises)."""
    try:
        return message.topic
    except UnicodeDecodeError:
        if SHIMS["raw_topic"].active:
            raw = message._topic  # noqa: SLF001  (checked at start-up)
            return bytes(raw).decode("utf-8", "replace")
        return "\ufffd"  # outside every request topic: rejected and acknowledged


def _check_sock_close() -> bool:
    return callable(getattr(_probe_client(), "_sock_close", None))


def close_socket(client: paho.Client) -> None:
    """Close the client's socket at once (no DISCONNECT); never raises."""
    with contextlib.suppress(Exception):  # a dying socket may fail in any way
        if SHIMS["sock_close"].active:
            client._sock_close()  # noqa: SLF001  (checked at start-up)
            return
        sock = client.socket()
        if isinstance(sock, socket.socket | ssl.SSLSocket):
            sock.close()


class TrackingContext(ssl.SSLContext):
    """An SSLContext that remembers the last socket it wrapped, so a failed handshake's socket
    can be closed (paho leaves it to the garbage collector)."""

    last_socket: ssl.SSLSocket | None = None

    def wrap_socket(self, *args: Any, **kwargs: Any) -> ssl.SSLSocket:
        """`SSLContext.wrap_socket`, remembering the socket."""
        sock = super().wrap_socket(*args, **kwargs)
        self.last_socket = sock
        return sock


def _check_tls_tracking() -> bool:
    # paho wraps its socket with the context given to tls_set_context (its 2.x code).
    code = paho.Client._ssl_wrap_socket.__code__  # noqa: SLF001  (the shim's check)
    return {"_ssl_context", "wrap_socket"} <= set(code.co_names)


def tls_context() -> ssl.SSLContext:
    """A client TLS context; one that tracks its sockets when the shim is on."""
    if SHIMS["tls_tracking"].active:
        return TrackingContext(ssl.PROTOCOL_TLS_CLIENT)
    return ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)


def close_failed_tls_socket(context: ssl.SSLContext | None, client: paho.Client) -> None:
    """Close the TLS socket of a failed handshake, unless it is the client's live socket."""
    if not isinstance(context, TrackingContext) or context.last_socket is None:
        return
    sock, context.last_socket = context.last_socket, None
    if sock is not client.socket():
        with contextlib.suppress(OSError):
            sock.close()


class LeanMatcher(MQTTMatcher):
    """paho's topic matcher, answering at once while it holds no filter at all."""

    def iter_match(self, topic: str) -> Any:
        """paho's matches for `topic`; while empty none, without paho's recursive closure."""
        root = self._root
        if root._content is None and not root._children:  # noqa: SLF001
            return iter(())
        return super().iter_match(topic)  # type: ignore[no-untyped-call]


def _check_lean_matcher() -> bool:
    matcher = getattr(_probe_client(), "_on_message_filtered", None)
    root = getattr(matcher, "_root", None)
    code = paho.Client._handle_on_message.__code__  # noqa: SLF001  (the shim's check)
    return (
        type(matcher) is MQTTMatcher
        and {"_on_message_filtered", "iter_match"} <= set(code.co_names)
        and getattr(root, "_content", 0) is None
        and getattr(root, "_children", None) == {}
    )


def lean_filter_matcher(client: paho.Client) -> None:
    """Let `client` skip matching inbound topics against per-filter callbacks while it has none
    (with `message_callback_add` it matches as paho does); never raises."""
    if not SHIMS["lean_matcher"].active:
        return
    matcher = getattr(client, "_on_message_filtered", None)
    if type(matcher) is MQTTMatcher:
        matcher.__class__ = LeanMatcher


PAHO_PROPERTIES_INIT: Callable[..., None] = Properties.__init__
_PROPERTY_TABLES = ("types", "names", "properties")


def _lean_properties_init(self: Properties, packetType: int) -> None:
    tables = _LEAN_TABLES
    if not tables:  # first use: paho's own tables, built once
        PAHO_PROPERTIES_INIT(self, packetType)
        tables.update({name: vars(self)[name] for name in _PROPERTY_TABLES})
        return
    # Straight into the instance dict: paho's __setattr__ lets these four names through as well.
    vars(self).update(tables)
    vars(self)["packetType"] = packetType


_LEAN_TABLES: dict[str, Any] = {}
PAHO_PROPERTIES_CLEAR: Callable[..., None] = Properties.clear
_PROPERTIES_STATE = frozenset({"packetType", *_PROPERTY_TABLES})


def _lean_properties_clear(self: Properties) -> None:
    # paho's clear() tries every property name (unpack() calls it for each inbound packet); the
    # instance holds only its state and the properties set through paho's checked __setattr__.
    attributes = vars(self)
    for name in [name for name in attributes if name not in _PROPERTIES_STATE]:
        del attributes[name]


def _check_lean_properties() -> bool:
    # The tables are read, never written, by paho 2.x; a version that builds them differently
    # per packet type, or adds state, keeps its own __init__.
    if Properties.__init__ not in (PAHO_PROPERTIES_INIT, _lean_properties_init):
        return False
    if Properties.clear not in (PAHO_PROPERTIES_CLEAR, _lean_properties_clear):
        return False
    for packet_type in (*PacketTypes.indexes, PacketTypes.WILLMESSAGE):
        paho_built = Properties.__new__(Properties)
        PAHO_PROPERTIES_INIT(paho_built, packet_type)
        lean = Properties.__new__(Properties)
        _lean_properties_init(lean, packet_type)
        if vars(paho_built) != vars(lean) or set(vars(lean)) != _PROPERTIES_STATE:
            return False
    full = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
    full.ContentType, full.CorrelationData, full.MessageExpiryInterval = "a/b", b"c", 5
    full.UserProperty = ("k", "v")
    left = dict(vars(full))
    PAHO_PROPERTIES_CLEAR(full)
    paho_cleared = dict(vars(full))
    vars(full).update(left)
    _lean_properties_clear(full)
    return vars(full) == paho_cleared and set(paho_cleared) == _PROPERTIES_STATE


def _install_lean_properties(on: bool) -> None:
    Properties.__init__ = _lean_properties_init if on else PAHO_PROPERTIES_INIT  # type: ignore[method-assign]
    Properties.clear = _lean_properties_clear if on else PAHO_PROPERTIES_CLEAR  # type: ignore[method-assign]


PAHO_REASON_INIT: Callable[..., None] = ReasonCode.__init__
_REASON_NAMES: dict[int, Any] = dict(ReasonCode.names)
"""The one copy of paho's name table that lean ReasonCodes share (paho copies it for each)."""
_REASON_VALUES: dict[tuple[int, str], int] = {}
"""(packet type, name) -> code, as paho's own __init__ found it the first time."""


def _lean_reason_init(
    self: ReasonCode,
    packetType: int,
    aName: str = "Success",
    identifier: int = -1,
) -> None:
    value = _REASON_VALUES.get((packetType, aName)) if identifier == -1 else None
    if value is None:
        PAHO_REASON_INIT(self, packetType, aName, identifier)
        if identifier == -1:
            _REASON_VALUES[(packetType, aName)] = self.value
        return
    attributes = vars(self)
    attributes["names"] = _REASON_NAMES
    attributes["packetType"] = packetType
    attributes["value"] = value


def _check_lean_reason_codes() -> bool:
    if ReasonCode.__init__ not in (PAHO_REASON_INIT, _lean_reason_init):
        return False
    for code, names in ReasonCode.names.items():
        for name, packet_types in names.items():
            for packet_type in packet_types:
                paho_built = ReasonCode.__new__(ReasonCode)
                PAHO_REASON_INIT(paho_built, packet_type, name)
                for _ in range(2):  # the first builds the way paho does, the second is lean
                    lean = ReasonCode.__new__(ReasonCode)
                    _lean_reason_init(lean, packet_type, name)
                    if vars(lean) != vars(paho_built) or lean.value != code:
                        return False
    return True


def _install_lean_reason_codes(on: bool) -> None:
    ReasonCode.__init__ = _lean_reason_init if on else PAHO_REASON_INIT  # type: ignore[method-assign]


# --- read_buffer ----------------------------------------------------------------------------------

READ_SIZE = 64 * 1024
"""What one `recv` of a buffered client asks the socket for (at least)."""


class ReadBuffer:
    """paho's reads of one client's socket served from one `recv` per readiness of the socket.

    paho reads a packet with three or more `recv` calls (its command byte, each byte of its
    remaining length, the rest) and one more that fails once the socket is empty; this takes what
    the socket holds at once and hands paho the pieces. A plain socket that gave less than asked
    is empty: further reads raise BlockingIOError without a system call until `arm()` (call it
    when the event loop says the socket is readable: its polling is level-triggered). A TLS
    socket (anything but a plain socket) may hold data no poll sees: it is read until it says it
    is empty, as paho does.
    """

    __slots__ = ("_data", "_may_read", "_plain", "_pos", "_recv")

    def __init__(self, recv: Callable[[int], bytes]) -> None:
        self._recv = recv
        self._data = b""
        self._pos = 0
        self._may_read = True
        self._plain = False

    def reset(self, sock: Any) -> None:
        """Forget what was read from an earlier socket; `sock` is the client's new one."""
        self._data, self._pos, self._may_read = b"", 0, True
        self._plain = type(sock) is socket.socket

    def arm(self) -> None:
        """The socket is readable: the next read that finds the buffer empty may `recv`."""
        self._may_read = True

    @property
    def pending(self) -> bool:
        """Whether bytes read from the socket wait for paho."""
        return self._pos < len(self._data)

    def recv(self, bufsize: int) -> bytes:
        """paho's `_sock_recv(bufsize)`: at most `bufsize` bytes, b"" at the end of the stream."""
        data, pos = self._data, self._pos
        if pos >= len(data):
            if not self._may_read:
                raise BlockingIOError
            size = max(bufsize, READ_SIZE)
            chunk = self._recv(size)
            if self._plain and len(chunk) < size:
                self._may_read = False
            if len(chunk) <= bufsize:
                return chunk
            self._data, self._pos = chunk, bufsize
            return chunk[:bufsize]
        end = pos + bufsize
        if end >= len(data):
            self._data, self._pos = b"", 0
            return data[pos:] if pos else data
        self._pos = end
        return data[pos:end]


def _check_read_buffer() -> bool:
    # paho 2.x reads the socket only through `_sock_recv(bufsize)`, from `_packet_read`.
    recv = getattr(paho.Client, "_sock_recv", None)
    if not callable(recv) or tuple(inspect.signature(recv).parameters) != ("self", "bufsize"):
        return False
    readers = [
        name
        for name, member in vars(paho.Client).items()
        if inspect.isfunction(member) and "_sock_recv" in member.__code__.co_names
    ]
    return readers == ["_packet_read"]


def read_buffer(client: paho.Client) -> ReadBuffer | None:
    """Serve `client`'s socket reads from a ReadBuffer (None without the shim: paho reads)."""
    if not SHIMS["read_buffer"].active:
        return None
    buffer = ReadBuffer(client._sock_recv)  # noqa: SLF001  (checked at start-up)
    client._sock_recv = buffer.recv  # type: ignore[method-assign]  # noqa: SLF001
    return buffer


register(
    Shim("publish_decoder", "paho-mqtt", "2.2.0", _check_decoder, _install_decoder),
    Shim("out_packet_view", "paho-mqtt", "2.2.0", _check_out_packet),
    Shim("max_inflight", "paho-mqtt", "2.2.0", _check_max_inflight),
    Shim("raw_topic", "paho-mqtt", "2.2.0", _check_raw_topic),
    Shim("sock_close", "paho-mqtt", "2.2.0", _check_sock_close),
    Shim("tls_tracking", "paho-mqtt", "2.2.0", _check_tls_tracking),
    Shim("lean_matcher", "paho-mqtt", "2.2.0", _check_lean_matcher),
    Shim("read_buffer", "paho-mqtt", "2.2.0", _check_read_buffer),
    Shim("lean_properties", "paho-mqtt", "2.2.0", _check_lean_properties, _install_lean_properties),
    Shim(
        "lean_reason_codes",
        "paho-mqtt",
        "2.2.0",
        _check_lean_reason_codes,
        _install_lean_reason_codes,
    ),
)
