"""bridge.compat: every shim fits the installed paho-mqtt and aiohttp, and each falls back safely.

With the newest releases the version ranges admit installed (`.ci/newest` does that), the first
test fails as soon as an upgrade changes an internal a shim relies on.
"""

from __future__ import annotations

import collections
import socket
from collections.abc import Iterator
from typing import Any

import aiohttp
import paho.mqtt.client as paho
import pytest
from paho.mqtt import _packet
from paho.mqtt.enums import CallbackAPIVersion

from bridge import compat

MIB = 1 << 20


CHECKS = {name: shim.check for name, shim in compat.SHIMS.items()}


@pytest.fixture(autouse=True)
def _shims_restored() -> Iterator[None]:
    """Every test starts and ends with the shims as start-up installs them."""
    assert compat.install() == []
    yield
    for shim in compat.SHIMS.values():
        shim.check = CHECKS[shim.name]
    assert compat.install() == []


def client() -> paho.Client:
    """A fresh, unconnected paho client."""
    return paho.Client(CallbackAPIVersion.VERSION2)


def test_every_shim_fits_the_installed_libraries() -> None:
    assert {name: shim.active for name, shim in compat.SHIMS.items()} == dict.fromkeys(
        compat.SHIMS, True
    )
    assert _packet.decode_publish is compat.decode_publish


def test_a_check_that_fails_or_raises_leaves_its_shim_off_and_says_so() -> None:
    def broken() -> bool:
        raise AttributeError("internal renamed")

    compat.SHIMS["out_packet_view"].check = broken
    compat.SHIMS["publish_decoder"].check = lambda: False
    off = compat.install()
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
    compat.uninstall()
    other = queued(c, 8, b"y" * 10)
    compat.write_large_without_copies(c, 8)
    assert isinstance(other["packet"], bytearray)


def test_out_packet_view_never_raises_when_paho_changed_its_queue() -> None:
    c = client()
    changed: collections.deque[Any] = collections.deque([("not", "a", "dict")])
    c._out_packet = changed  # noqa: SLF001  (paho changed its queue)
    compat.write_large_without_copies(c, 1)  # the reply is still published, just with copies
    assert not compat.SHIMS["out_packet_view"].active


def test_max_inflight_is_raised_past_the_guard_only_with_the_shim() -> None:
    c = client()
    compat.set_max_inflight(c, 500)
    assert c.max_inflight_messages == 500
    compat.uninstall()
    compat.set_max_inflight(c, 900)
    assert c.max_inflight_messages == 500


def test_a_topic_that_is_not_utf8_is_read_with_replacements_or_rejected() -> None:
    message = paho.MQTTMessage(topic=b"a/request/\xff")
    assert compat.message_topic(message) == "a/request/\ufffd"
    compat.uninstall()
    assert compat.message_topic(message) == "\ufffd"
    assert compat.message_topic(paho.MQTTMessage(topic=b"a/b")) == "a/b"


def test_close_socket_closes_with_and_without_the_shim() -> None:
    for installed in (True, False):
        if not installed:
            compat.uninstall()
        c = client()
        left, right = socket.socketpair()
        c._sock = left  # noqa: SLF001  (a connected socket without a broker)
        compat.close_socket(c)
        assert left.fileno() == -1
        right.close()
        compat.close_socket(client())  # no socket: nothing to do, no error


def test_tls_context_tracks_its_sockets_only_with_the_shim() -> None:
    assert isinstance(compat.tls_context(), compat.TrackingContext)
    compat.uninstall()
    context = compat.tls_context()
    assert not isinstance(context, compat.TrackingContext)
    compat.close_failed_tls_socket(context, client())  # nothing tracked: nothing to do


@pytest.mark.parametrize("installed", [True, False])
def test_bytes_body_sends_a_large_body_as_it_is_without_a_warning(installed: bool) -> None:
    if not installed:
        compat.uninstall()
    value = b"z" * (2 * MIB)  # over aiohttp's 1 MiB warning threshold (warnings are errors here)
    body = compat.bytes_body(value, "audio/wav")
    assert isinstance(body, aiohttp.payload.BytesPayload)
    assert (body.size, body.content_type) == (2 * MIB, "audio/wav")
    assert isinstance(body, compat.BytesBody) is installed
