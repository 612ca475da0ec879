"""Decode a large inbound PUBLISH with one copy of its payload instead of paho's three.

paho-mqtt 2.2's `_packet.decode_publish` peels the topic, packet id and properties off the packet
with `struct.unpack(..."{n}s")`, and each step copies the rest of the packet: for a 33 MiB request
(a 25 MiB file in base64) the receive buffer and two whole copies are alive at once. This decoder
reads the same fields through a memoryview and copies the payload once. Packets under
`LEAN_FROM` bytes still go through paho's own decoder, so the common path is paho's, unchanged.
`tests/test_publish_decoder.py` checks that both decoders agree, malformed packets included.
"""

from __future__ import annotations

import inspect
import struct
from collections.abc import Callable

from paho.mqtt import _packet
from paho.mqtt.enums import MQTTProtocolVersion
from paho.mqtt.exception import MalformedPacket, MQTTException
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties, VariableByteIntegers

Decoder = Callable[[int, bytes | bytearray, MQTTProtocolVersion], _packet.PublishPacket]

LEAN_FROM = 64 * 1024
"""Packets from this many bytes on are decoded here; smaller ones by paho."""

_PROPERTY_OVERREAD = 8
_PAHO_PARAMETERS = ("header", "packet", "protocol")
_PUBLISH_FIELDS = ("dup", "qos", "retain", "topic", "mid", "properties", "payload")
_DECODE_ERRORS = (struct.error, IndexError, KeyError, ValueError, MQTTException)
_PAHO_DECODER: Decoder = _packet.decode_publish


def decode_publish(
    header: int, packet: bytes | bytearray, protocol: MQTTProtocolVersion
) -> _packet.PublishPacket:
    """paho's `decode_publish` contract: the PUBLISH fields, or MalformedPacket."""
    if len(packet) < LEAN_FROM:
        return _PAHO_DECODER(header, packet, protocol)
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


def install() -> bool:
    """Make paho's clients decode PUBLISH packets with `decode_publish`; False if paho differs.

    paho's `_packet` module is private: when its decoder's signature or result type is not the
    one this was written against (paho-mqtt 2.2), paho keeps its own decoder.
    """
    if _packet.decode_publish is decode_publish:
        return True
    if not _compatible(_PAHO_DECODER):
        return False
    _packet.decode_publish = decode_publish
    return True


def _compatible(paho_decoder: Callable[..., object]) -> bool:
    try:
        params = tuple(inspect.signature(paho_decoder).parameters)
        fields = _packet.PublishPacket._fields
    except (AttributeError, TypeError, ValueError):
        return False
    return params == _PAHO_PARAMETERS and fields == _PUBLISH_FIELDS
