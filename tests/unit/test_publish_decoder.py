"""The PUBLISH decoder in bridge.compat decodes what paho's own does, malformed packets included."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from paho.mqtt import _packet
from paho.mqtt.enums import MQTTProtocolVersion
from paho.mqtt.exception import MalformedPacket
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from bridge.compat import paho as compat
from bridge.compat import shims

PAHO = compat.PAHO_DECODER
PROTOCOLS = [MQTTProtocolVersion.MQTTv311, MQTTProtocolVersion.MQTTv5]


def mqtt_text(min_size: int = 0, max_size: int = 20) -> st.SearchStrategy[str]:
    """Strings MQTT allows in properties (no NUL, no U+FEFF, no surrogates)."""
    chars = st.characters(exclude_characters="\x00\ufeff", exclude_categories=["Cs"])
    return st.text(chars, min_size=min_size, max_size=max_size)


def outcome(decoder: Any, header: int, packet: bytes, protocol: MQTTProtocolVersion) -> Any:
    """A comparable summary of what `decoder` makes of the packet: its fields, or that it failed."""
    try:
        result = decoder(header, bytearray(packet), protocol)
    except MalformedPacket:
        return "malformed"
    props = vars(result.properties) if result.properties is not None else None
    return (result.dup, result.qos, result.retain, result.topic, result.mid, props, result.payload)


def lean_outcome(header: int, packet: bytes, protocol: MQTTProtocolVersion) -> Any:
    saved = compat.LEAN_FROM
    compat.LEAN_FROM = 0  # every packet through the memoryview path
    try:
        return outcome(compat.decode_publish, header, packet, protocol)
    finally:
        compat.LEAN_FROM = saved


def publish_properties(draw: st.DrawFn) -> Properties:
    props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
    if draw(st.booleans()):
        props.ResponseTopic = draw(mqtt_text(1, 30))
    if draw(st.booleans()):
        props.CorrelationData = draw(st.binary(max_size=40))
    if draw(st.booleans()):
        props.ContentType = draw(mqtt_text())
    if draw(st.booleans()):
        props.MessageExpiryInterval = draw(st.integers(0, 2**32 - 1))
    if draw(st.booleans()):
        props.PayloadFormatIndicator = draw(st.integers(0, 1))
    for key, value in draw(st.lists(st.tuples(mqtt_text(max_size=8), mqtt_text(max_size=8)))):
        props.UserProperty = (key, value)
    return props


@st.composite
def publish_packets(draw: st.DrawFn) -> tuple[int, bytes, MQTTProtocolVersion]:
    """A well-formed PUBLISH (everything after the fixed header) and its first header byte."""
    protocol = draw(st.sampled_from(PROTOCOLS))
    qos = draw(st.integers(0, 2))
    header = 0x30 | (qos << 1) | (0x08 if draw(st.booleans()) else 0) | int(draw(st.booleans()))
    topic = draw(st.text(min_size=1, max_size=40)).encode()
    packet = len(topic).to_bytes(2, "big") + topic
    if qos:
        packet += draw(st.integers(1, 65535)).to_bytes(2, "big")
    if protocol == MQTTProtocolVersion.MQTTv5:
        packet += bytes(publish_properties(draw).pack())  # type: ignore[no-untyped-call]
    packet += draw(st.binary(max_size=300))
    return header, packet, protocol


@settings(max_examples=300)
@given(publish_packets())
def test_well_formed_packets_decode_the_same(case: tuple[int, bytes, MQTTProtocolVersion]) -> None:
    header, packet, protocol = case
    expected = outcome(PAHO, header, packet, protocol)
    assert expected != "malformed"
    assert lean_outcome(header, packet, protocol) == expected


@settings(max_examples=500)
@given(
    st.integers(0, 255),
    st.sampled_from(PROTOCOLS),
    st.binary(max_size=60),
    publish_packets(),
    st.data(),
)
def test_damaged_packets_decode_or_fail_the_same(
    header: int,
    protocol: MQTTProtocolVersion,
    noise: bytes,
    case: tuple[int, bytes, MQTTProtocolVersion],
    data: st.DataObject,
) -> None:
    assert lean_outcome(header, noise, protocol) == outcome(PAHO, header, noise, protocol)
    _, packet, _ = case  # a real packet, truncated, read with another protocol or header
    damaged = packet[: data.draw(st.integers(0, len(packet)), label="cut")]
    assert lean_outcome(header, damaged, protocol) == outcome(PAHO, header, damaged, protocol)


def test_large_packets_take_the_lean_path_with_one_payload_copy() -> None:
    payload = bytes(range(256)) * (compat.LEAN_FROM // 256 + 1)
    packet = bytearray(b"\x00\x03a/b\x00\x07" + b"\x00" + payload)
    result = compat.decode_publish(0x32, packet, MQTTProtocolVersion.MQTTv5)
    assert (result.topic, result.mid, result.payload) == (b"a/b", 7, payload)
    assert type(result.payload) is bytes
    packet[-1] ^= 0xFF  # the payload is a copy: paho may reuse or free its buffer
    assert result.payload == payload


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_install_replaces_pahos_decoder(protocol: MQTTProtocolVersion) -> None:
    assert shims.install() == []
    assert shims.install() == []  # idempotent; small packets still go to paho's decoder
    assert _packet.decode_publish is compat.decode_publish
    result = _packet.decode_publish(
        0x30, b"\x00\x01t" + (b"\x00" if protocol == 5 else b"") + b"x", protocol
    )
    assert (result.topic, result.payload) == (b"t", b"x")


def test_a_different_paho_decoder_is_left_alone() -> None:
    def other(header: int, data: bytes, protocol: int, strict: bool) -> None:
        """A paho release whose decoder takes other arguments."""

    assert compat.decoder_compatible(PAHO)
    assert not compat.decoder_compatible(other)
