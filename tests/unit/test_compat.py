"""bridge.compat: every shim fits the installed paho-mqtt and aiohttp, and each falls back safely.

With the newest releases the version ranges admit installed (`.ci/newest` does that), the first
test fails as soon as an upgrade changes an internal a shim relies on.
"""

from __future__ import annotations

import collections
import gc
import select
import socket
import ssl
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import paho.mqtt.client as paho
import pytest
from paho.mqtt import _packet
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.exception import MQTTException
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from bridge.compat import aiohttp as compat_aiohttp
from bridge.compat import paho as compat
from bridge.compat import shims

MIB = 1 << 20


CHECKS = {name: shim.check for name, shim in shims.SHIMS.items()}


@pytest.fixture(autouse=True)
def _shims_restored() -> Iterator[None]:
    """Every test starts and ends with the shims as start-up installs them."""
    assert shims.install() == []
    yield
    for shim in shims.SHIMS.values():
        shim.check = CHECKS[shim.name]
    assert shims.install() == []


def client() -> paho.Client:
    """A fresh, unconnected paho client."""
    return paho.Client(CallbackAPIVersion.VERSION2)


def test_every_shim_fits_the_installed_libraries() -> None:
    assert {name: shim.active for name, shim in shims.SHIMS.items()} == dict.fromkeys(
        shims.SHIMS, True
    )
    assert _packet.decode_publish is compat.decode_publish


def test_a_check_that_fails_or_raises_leaves_its_shim_off_and_says_so() -> None:
    def broken() -> bool:
        raise AttributeError("internal renamed")

    shims.SHIMS["out_packet_view"].check = broken
    shims.SHIMS["publish_decoder"].check = lambda: False
    off = shims.install()
    assert [item.split(" ")[0] for item in off] == ["publish_decoder", "out_packet_view"]
    assert all("paho-mqtt 2." in item for item in off)
    assert _packet.decode_publish is compat.PAHO_DECODER  # paho's own decoder again


def queued(c: paho.Client, mid: int, packet: bytes) -> dict[str, Any]:
    """Queue `packet` the way paho 2.2's `_packet_queue` does; the queued entry."""
    entry: dict[str, Any] = {"command": 0x32, "mid": mid, "qos": 1, "pos": 0}
    entry.update(to_process=len(packet), packet=bytearray(packet), info=None)
    c._out_packet.append(entry)  # type: ignore[arg-type]  # noqa: SLF001  (the shim's subject)
    return entry


def test_out_packet_view_swaps_in_a_memoryview_and_falls_back_to_a_copy() -> None:
    c = client()
    entry = queued(c, 7, b"x" * 10)
    compat.write_large_without_copies(c, 7)
    assert isinstance(entry["packet"], memoryview)
    shims.uninstall()
    other = queued(c, 8, b"y" * 10)
    compat.write_large_without_copies(c, 8)
    assert isinstance(other["packet"], bytearray)


def test_out_packet_view_never_raises_when_paho_changed_its_queue() -> None:
    c = client()
    changed: collections.deque[Any] = collections.deque([("not", "a", "dict")])
    c._out_packet = changed  # noqa: SLF001  (paho changed its queue)
    compat.write_large_without_copies(c, 1)  # the reply is still published, just with copies
    assert not shims.SHIMS["out_packet_view"].active


def test_max_inflight_is_raised_past_the_guard_only_with_the_shim() -> None:
    c = client()
    compat.set_max_inflight(c, 500)
    assert c.max_inflight_messages == 500
    shims.uninstall()
    compat.set_max_inflight(c, 900)
    assert c.max_inflight_messages == 500


def test_a_topic_that_is_not_utf8_is_read_with_replacements_or_rejected() -> None:
    message = paho.MQTTMessage(topic=b"a/request/\xff")
    assert compat.message_topic(message) == "a/request/\ufffd"
    shims.uninstall()
    assert compat.message_topic(message) == "\ufffd"
    assert compat.message_topic(paho.MQTTMessage(topic=b"a/b")) == "a/b"


def test_close_socket_closes_with_and_without_the_shim() -> None:
    for installed in (True, False):
        if not installed:
            shims.uninstall()
        c = client()
        left, right = socket.socketpair()
        c._sock = left  # noqa: SLF001  (a connected socket without a broker)
        compat.close_socket(c)
        assert left.fileno() == -1
        right.close()
        compat.close_socket(client())  # no socket: nothing to do, no error


def test_tls_context_tracks_its_sockets_only_with_the_shim() -> None:
    assert isinstance(compat.tls_context(), compat.TrackingContext)
    shims.uninstall()
    context = compat.tls_context()
    assert not isinstance(context, compat.TrackingContext)
    compat.close_failed_tls_socket(context, client())  # nothing tracked: nothing to do


@pytest.mark.parametrize("installed", [True, False])
def test_bytes_body_sends_a_large_body_as_it_is_without_a_warning(installed: bool) -> None:
    if not installed:
        shims.uninstall()
    value = b"z" * (2 * MIB)  # over aiohttp's 1 MiB warning threshold (warnings are errors here)
    body = compat_aiohttp.bytes_body(value, "audio/wav")
    assert isinstance(body, aiohttp.payload.BytesPayload)
    assert (body.size, body.content_type) == (2 * MIB, "audio/wav")
    assert isinstance(body, compat_aiohttp.BytesBody) is installed


@pytest.mark.parametrize("installed", [True, False])
def test_ssl_context_is_aiohttps_own_verified_one_or_one_made_alike(installed: bool) -> None:
    if not installed:
        shims.uninstall()
    context = compat_aiohttp.verified_ssl_context()
    own = aiohttp.connector._SSL_CONTEXT_VERIFIED  # noqa: SLF001  (the shim's subject)
    assert (context is own) is installed
    assert (context.verify_mode, context.check_hostname) == (ssl.CERT_REQUIRED, True)
    assert context.get_ca_certs() == own.get_ca_certs()


def deliver_publish(c: paho.Client, topic: str) -> list[str]:
    """Hand `c` an inbound PUBLISH the way its reader does; which callbacks got it."""
    got: list[str] = []
    c.on_message = lambda _c, _u, m: got.append(f"any {m.topic}")
    c._handle_on_message(paho.MQTTMessage(topic=topic.encode()))  # noqa: SLF001  (paho's reader)
    return got


@pytest.mark.parametrize("installed", [True, False])
def test_lean_matcher_delivers_every_message_and_leaves_no_garbage_cycle(installed: bool) -> None:
    if not installed:
        shims.uninstall()
    c = client()
    compat.lean_filter_matcher(c)
    while gc.collect():  # an earlier test's finalizers can leave garbage for a second pass
        pass
    gc.disable()
    try:
        before = gc.get_count()[0]
        assert deliver_publish(c, "a/request/x") == ["any a/request/x"]
        cycles = gc.collect()
    finally:
        gc.enable()
    # paho's own matcher builds a self-referencing closure per message; the lean one none.
    assert (cycles == 0) is installed, (before, cycles)
    c.message_callback_add("a/+/x", lambda _c, _u, m: None)
    assert deliver_publish(c, "a/request/x") == []  # a filtered callback took it, as in paho
    assert deliver_publish(c, "b/request/x") == ["any b/request/x"]


def properties(packet_type: int) -> Any:
    """paho's Properties for `packet_type` (untyped in paho)."""
    return Properties(packet_type)  # type: ignore[no-untyped-call]


@pytest.mark.parametrize("installed", [True, False])
def test_lean_properties_pack_and_unpack_as_paho_does(installed: bool) -> None:
    if not installed:
        shims.uninstall()
    assert (Properties.__init__ is compat.PAHO_PROPERTIES_INIT) is not installed
    assert (Properties.clear is compat.PAHO_PROPERTIES_CLEAR) is not installed
    props = properties(PacketTypes.PUBLISH)
    props.CorrelationData = b"\x01\x02"
    props.ContentType = "text/plain"
    packed = props.pack()
    parsed = properties(PacketTypes.PUBLISH)
    parsed.ResponseTopic = "left/over"
    parsed.unpack(packed)  # clears what was there first
    assert not hasattr(parsed, "ResponseTopic")
    assert (parsed.CorrelationData, parsed.ContentType) == (b"\x01\x02", "text/plain")
    assert not hasattr(properties(PacketTypes.PUBLISH), "ContentType")  # nothing shared but tables
    with pytest.raises(MQTTException):
        properties(PacketTypes.PUBACK).ContentType = "text/plain"  # still checked per packet type
    with pytest.raises(MQTTException):
        props.NoSuchProperty = 1


@pytest.mark.parametrize("installed", [True, False])
def test_lean_reason_codes_equal_pahos_own(installed: bool) -> None:
    if not installed:
        shims.uninstall()
    assert (ReasonCode.__init__ is compat.PAHO_REASON_INIT) is not installed
    for _ in range(2):  # the second is built from what the first found
        puback = ReasonCode(PacketTypes.PUBACK)
        assert (puback.value, str(puback), puback.is_failure) == (0, "Success", False)
        assert ReasonCode(PacketTypes.DISCONNECT).getName() == "Normal disconnection"
        refused = ReasonCode(PacketTypes.PUBACK, "Not authorized")
        assert (refused.value, refused.is_failure) == (135, True)
        assert ReasonCode(PacketTypes.PUBACK, identifier=16).getName() == "No matching subscribers"
    with pytest.raises(KeyError):
        ReasonCode(PacketTypes.PUBACK, "No such reason")


def publish_packet(topic: bytes, payload: bytes) -> bytes:
    """An MQTT 3.1.1 QoS 0 PUBLISH (remaining length under 128)."""
    body = len(topic).to_bytes(2, "big") + topic + payload
    return bytes([0x30, len(body)]) + body


@pytest.mark.parametrize("installed", [True, False])
def test_read_buffer_hands_paho_every_packet_of_one_recv(installed: bool) -> None:
    if not installed:
        shims.uninstall()
    c = client()
    got: list[tuple[str, bytes | bytearray]] = []
    c.on_message = lambda _c, _u, m: got.append((m.topic, m.payload))
    left, right = socket.socketpair()
    left.setblocking(False)
    c._sock = left  # noqa: SLF001  (a connected socket without a broker)
    calls: list[int] = []
    paho_recv = c._sock_recv  # noqa: SLF001

    def counting(size: int) -> bytes:
        calls.append(size)
        return paho_recv(size)

    c._sock_recv = counting  # type: ignore[method-assign,assignment]  # noqa: SLF001
    reads = compat.read_buffer(c)
    assert (reads is not None) is installed
    packets = [publish_packet(f"t/{n}".encode(), b"x" * n) for n in range(3)]
    right.sendall(b"".join(packets))

    def readable() -> None:
        if reads is None:  # paho reads one packet at a time while the socket has more
            while select.select([left], [], [], 0)[0]:
                c.loop_read()
            return
        reads.arm()
        c.loop_read()
        while reads.pending:
            c.loop_read()

    if reads is not None:
        reads.reset(left)
    readable()
    assert got == [("t/0", b""), ("t/1", b"x"), ("t/2", b"xx")]
    if installed:  # one recv for three packets; the socket is empty: no more until it is readable
        assert calls == [compat.READ_SIZE]
        c.loop_read()
        assert calls == [compat.READ_SIZE]
    else:  # paho: the command byte, the length byte, the rest, for each
        assert len(calls) == 9
    right.sendall(packets[1][:3])  # a packet in two parts
    readable()
    right.sendall(packets[1][3:])
    readable()
    assert got[-1] == ("t/1", b"x")
    left.close()
    right.close()


def test_read_buffer_reads_tls_until_empty_and_passes_large_reads_through() -> None:
    served = [b"ab", b"x" * 70_000, b""]

    def recv(size: int) -> bytes:
        if not served:
            raise BlockingIOError
        return served.pop(0)[:size]

    reads = compat.ReadBuffer(recv)
    reads.reset(object())  # not a plain socket (TLS): a short read is no proof it is empty
    assert (reads.recv(1), reads.recv(5)) == (b"a", b"b")
    assert len(reads.recv(100_000)) == 70_000  # larger than a buffer: as the socket gives it
    assert not reads.pending
    assert reads.recv(1) == b""  # the end of the stream
    with pytest.raises(BlockingIOError):
        reads.recv(1)
    served[:] = [b"left over"]
    reads.recv(4)
    assert reads.pending
    reads.reset(object())  # a new connection: nothing of the old one
    assert not reads.pending


# A bridge command line with rich installed (the test venv has it, as the trial broker's does):
# structlog falls back as if it were not, and the console format still writes its lines;
# frozenlist is its pure-Python self (no libstdc++ in the process).
_NO_RICH = """
import importlib.util, io, sys
assert importlib.util.find_spec("rich") is not None, "rich is not installed: nothing to show"
import bridge.cli.main
import aiohttp, frozenlist, structlog
from bridge.runtime import logs
assert structlog.dev.rich is None and sys.modules["rich"] is None
assert frozenlist.NO_EXTENSIONS and "frozenlist._frozenlist" not in sys.modules
out = io.StringIO()
logs.configure("info", "console", [], stream=out)
structlog.get_logger().error("request", method="listModels")
assert "request" in out.getvalue() and "listModels" in out.getvalue(), out.getvalue()
print("ok")
"""


def test_a_command_line_process_loads_neither_rich_nor_libstdcxx() -> None:
    done = subprocess.run(
        [sys.executable, "-c", _NO_RICH],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=Path(__file__).resolve().parents[2],
        check=False,
    )
    assert done.stdout == "ok\n", done.stderr
