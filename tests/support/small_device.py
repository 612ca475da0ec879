"""MQTT 3.1.1 clients that behave like the small-device libraries of docs/small-devices.md.

`PubSubClientLike` does what Arduino's PubSubClient does with its one packet buffer
(`MQTT_MAX_PACKET_SIZE`, 256 bytes): it refuses to publish a topic and payload over the buffer
less 7 bytes, publishes at QoS 0 only, and drops every incoming packet longer than the buffer
(without a PUBACK, as PubSubClient's `readPacket` ignores it). `umqtt_simple_module` is
umqtt.simple's `MQTTClient` API on CPython sockets, for running the MicroPython example as written
(umqtt.simple itself needs MicroPython's socket stream methods).
"""

from __future__ import annotations

import binascii
import contextlib
import json
import re
import socket
import struct
import sys
import threading
import types
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "PubSubClientLike",
    "TasmotaRule",
    "micropython_json",
    "packet_size",
    "tasmota_fire",
    "tasmota_rules",
    "umqtt_simple_module",
]

_CONNECT, _CONNACK, _PUBLISH, _PUBACK, _SUBSCRIBE, _SUBACK, _DISCONNECT = (
    0x10,
    0x20,
    0x30,
    0x40,
    0x82,
    0x90,
    0xE0,
)


def _remaining_length(n: int) -> bytes:
    out = bytearray()
    while True:
        digit, n = n % 128, n // 128
        out.append(digit | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _string(text: bytes) -> bytes:
    return struct.pack("!H", len(text)) + text


def _packet(first: int, body: bytes) -> bytes:
    return bytes([first]) + _remaining_length(len(body)) + body


def packet_size(topic: str, payload_size: int, qos: int) -> int:
    """The bytes an MQTT 3.1.1 PUBLISH of this topic and payload takes on the wire."""
    remaining = 2 + len(topic.encode()) + (2 if qos else 0) + payload_size
    return 1 + len(_remaining_length(remaining)) + remaining


class _Connection:
    """One MQTT 3.1.1 connection: send packets, read whole packets (blocking)."""

    def __init__(self, host: str, port: int, client_id: str, timeout: float) -> None:
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        body = _string(b"MQTT") + bytes([4, 0x02]) + struct.pack("!H", 60)
        self.send(_packet(_CONNECT, body + _string(client_id.encode())))
        first, data, _ = self.read()
        if first != _CONNACK or data[1] != 0:
            raise ConnectionError(f"broker refused {client_id}: {data!r}")

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _exactly(self, n: int) -> bytes:
        chunks = bytearray()
        while len(chunks) < n:
            got = self.sock.recv(n - len(chunks))
            if not got:
                raise ConnectionError("broker closed the connection")
            chunks += got
        return bytes(chunks)

    def read(self) -> tuple[int, bytes, int]:
        """(first byte, rest of the packet, whole packet size)."""
        first = self._exactly(1)[0]
        length, multiplier, size = 0, 1, 1
        while True:
            digit = self._exactly(1)[0]
            size += 1
            length += (digit & 0x7F) * multiplier
            multiplier *= 128
            if not digit & 0x80:
                break
        return first, self._exactly(length), size + length

    def subscribe(self, topic: str, qos: int, mid: int) -> None:
        body = struct.pack("!H", mid) + _string(topic.encode()) + bytes([qos])
        self.send(_packet(_SUBSCRIBE, body))

    def publish(self, topic: str, payload: bytes, qos: int, mid: int) -> None:
        body = _string(topic.encode()) + (struct.pack("!H", mid) if qos else b"") + payload
        self.send(_packet(_PUBLISH | (qos << 1), body))

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.send(_packet(_DISCONNECT, b""))
        self.sock.close()


def _parse_publish(first: int, data: bytes) -> tuple[str, bytes, int, int]:
    """(topic, payload, qos, packet id) of a PUBLISH packet's rest."""
    (topic_length,) = struct.unpack("!H", data[:2])
    topic = data[2 : 2 + topic_length].decode()
    qos = (first >> 1) & 3
    at = 2 + topic_length
    mid = 0
    if qos:
        (mid,) = struct.unpack("!H", data[at : at + 2])
        at += 2
    return topic, data[at:], qos, mid


class PubSubClientLike:
    """An MQTT 3.1.1 client with PubSubClient's 256-byte buffer rules (see the module doc)."""

    def __init__(
        self,
        host: str,
        port: int,
        client_id: str,
        buffer_size: int = 256,
        timeout: float = 10.0,
    ) -> None:
        self.buffer_size = buffer_size
        self.timeout = timeout
        self.received: list[tuple[str, bytes]] = []
        self.dropped: list[tuple[str, int]] = []
        """(topic, packet size) of every PUBLISH dropped for not fitting the buffer."""
        self._cond = threading.Condition()
        self._suback = 0
        self._mid = 0
        self._conn = _Connection(host, port, client_id, timeout)
        self._conn.sock.settimeout(None)
        self._reader = threading.Thread(target=self._read_loop, name="pubsubclient", daemon=True)
        self._reader.start()

    def _read_loop(self) -> None:
        while True:
            try:
                first, data, size = self._conn.read()
            except OSError:
                return
            kind = first & 0xF0
            with self._cond:
                if kind == _PUBLISH:
                    topic, payload, qos, mid = _parse_publish(first, data)
                    if size > self.buffer_size:
                        self.dropped.append((topic, size))  # PubSubClient: no callback, no PUBACK
                    else:
                        self.received.append((topic, payload))
                        if qos == 1:
                            self._conn.send(_packet(_PUBACK, struct.pack("!H", mid)))
                elif kind == _SUBACK:
                    self._suback += 1
                self._cond.notify_all()

    def subscribe(self, topic: str, qos: int = 0) -> bool:
        """Subscribe at QoS 0 or 1 and wait for the SUBACK; False where PubSubClient refuses."""
        if qos > 1 or 9 + len(topic.encode()) > self.buffer_size:
            return False
        with self._cond:
            before = self._suback
            self._mid += 1
            self._conn.subscribe(topic, qos, self._mid)
            if not self._cond.wait_for(lambda: self._suback > before, self.timeout):
                raise TimeoutError(f"no SUBACK for {topic!r}")
        return True

    def publish(self, topic: str, payload: bytes) -> bool:
        """Publish at QoS 0, as PubSubClient does; False when it does not fit the buffer."""
        if 5 + 2 + len(topic.encode()) + len(payload) > self.buffer_size:
            return False
        self._conn.publish(topic, payload, 0, 0)
        return True

    def wait_for(
        self, predicate: Callable[[list[tuple[str, bytes]]], bool], timeout: float | None = None
    ) -> list[tuple[str, bytes]]:
        """Wait until `predicate(received)` holds; returns the messages received so far."""
        with self._cond:
            if not self._cond.wait_for(lambda: predicate(self.received), timeout or self.timeout):
                raise TimeoutError(f"received {self.received!r}, dropped {self.dropped!r}")
            return list(self.received)

    def wait_dropped(self, n: int = 1, timeout: float | None = None) -> list[tuple[str, int]]:
        """Wait until `n` packets were dropped for their size; returns (topic, size) of each."""
        with self._cond:
            if not self._cond.wait_for(lambda: len(self.dropped) >= n, timeout or self.timeout):
                raise TimeoutError(f"dropped {self.dropped!r}, received {self.received!r}")
            return list(self.dropped)

    def close(self) -> None:
        """Disconnect and stop the reader."""
        self._conn.close()
        self._reader.join(self.timeout)


def umqtt_simple_module(servers: dict[str, tuple[str, int]]) -> types.ModuleType:
    """A `umqtt.simple` module whose MQTTClient reaches `servers[name]` for a broker `name`."""

    class MQTTException(Exception):
        """umqtt.simple's error type."""

    class MQTTClient:
        """umqtt.simple.MQTTClient: blocking, one message per `wait_msg()`, callback(topic, msg)."""

        def __init__(self, client_id: str, server: str, port: int = 0, **_: Any) -> None:
            self.client_id = client_id
            self.address = servers[server]
            self.cb: Callable[[bytes, bytes], None] | None = None
            self.pid = 0
            self._conn: _Connection | None = None

        def set_callback(self, f: Callable[[bytes, bytes], None]) -> None:
            self.cb = f

        def connect(self, clean_session: bool = True) -> int:
            host, port = self.address
            self._conn = _Connection(host, port, self.client_id, 10.0)
            return 0

        def _next_pid(self) -> int:
            self.pid = self.pid % 65535 + 1
            return self.pid

        def subscribe(self, topic: str | bytes, qos: int = 0) -> None:
            assert self._conn is not None and self.cb is not None, "set_callback() first"
            name = topic.decode() if isinstance(topic, bytes) else topic
            self._conn.subscribe(name, qos, self._next_pid())
            while self.wait_msg() != _SUBACK:
                pass

        def publish(
            self, topic: str | bytes, msg: str | bytes, retain: bool = False, qos: int = 0
        ) -> None:
            assert self._conn is not None
            # As umqtt.simple does: the remaining length counts `len(topic) + len(msg)`, which is
            # characters for a str, while the socket writes a str's UTF-8 bytes. A str with
            # non-ASCII characters therefore makes a corrupt packet, exactly as on the device.
            remaining = 2 + len(topic) + len(msg) + (2 if qos else 0)
            pid = self._next_pid()
            wire = [t.encode() if isinstance(t, str) else t for t in (topic, msg)]
            self._conn.send(
                bytes([_PUBLISH | (qos << 1) | retain])
                + _remaining_length(remaining)
                + struct.pack("!H", len(topic))
                + wire[0]
                + (struct.pack("!H", pid) if qos else b"")
                + wire[1]
            )
            while qos == 1 and self.wait_msg() != _PUBACK:
                pass

        def wait_msg(self) -> int:
            assert self._conn is not None
            first, data, _ = self._conn.read()
            kind = first & 0xF0
            if kind == _PUBLISH:
                topic, payload, qos, mid = _parse_publish(first, data)
                if self.cb is not None:
                    self.cb(topic.encode(), payload)
                if qos == 1:
                    self._conn.send(_packet(_PUBACK, struct.pack("!H", mid)))
            return kind

        def disconnect(self) -> None:
            assert self._conn is not None
            self._conn.close()

    module = types.ModuleType("umqtt.simple")
    module.MQTTClient = MQTTClient  # type: ignore[attr-defined]
    module.MQTTException = MQTTException  # type: ignore[attr-defined]
    return module


def micropython_json() -> types.ModuleType:
    """MicroPython's `json`: `dumps` writes non-ASCII characters as they are (CPython's escapes
    them as \\uXXXX by default, which would hide umqtt.simple's sizing by characters)."""
    module = types.ModuleType("json")
    module.dumps = lambda obj: json.dumps(obj, ensure_ascii=False)  # type: ignore[attr-defined]
    module.loads = json.loads  # type: ignore[attr-defined]
    return module


REAL_UMQTT = Path(__file__).resolve().parents[2] / ".cache" / "umqtt" / "umqtt" / "simple.py"
"""umqtt.simple's own code, fetched by test.sh (tests/support/fetch_umqtt.py)."""


class _StreamSocket:
    """A CPython socket with MicroPython's stream methods, as umqtt.simple uses them: `write`
    sends a str as its UTF-8 bytes (as MicroPython does), `read(n)` blocks for n bytes."""

    def __init__(self) -> None:
        self._sock = socket.socket()
        self._sock.settimeout(30)

    def connect(self, address: tuple[str, int]) -> None:
        self._sock.connect(address)

    def write(self, data: bytes | bytearray | str, length: int | None = None) -> int:
        raw = data.encode() if isinstance(data, str) else bytes(data)
        raw = raw if length is None else raw[:length]
        self._sock.sendall(raw)
        return len(raw)

    def read(self, size: int) -> bytes:
        chunks = b""
        while len(chunks) < size:
            chunk = self._sock.recv(size - len(chunks))
            if not chunk:
                break
            chunks += chunk
        return chunks

    def setblocking(self, flag: bool) -> None:
        self._sock.setblocking(flag)
        if flag:
            self._sock.settimeout(30)

    def close(self) -> None:
        self._sock.close()


def real_umqtt_simple(servers: dict[str, tuple[str, int]]) -> dict[str, types.ModuleType]:
    """The modules to put in sys.modules so that umqtt.simple's own code runs on CPython:
    `umqtt`, `umqtt.simple` and the MicroPython modules it imports (usocket reaching
    `servers[name]` for a broker `name`)."""
    if not REAL_UMQTT.is_file():
        raise FileNotFoundError(f"{REAL_UMQTT} is missing: ./test.sh fetches it")
    usocket = types.ModuleType("usocket")
    usocket.socket = _StreamSocket  # type: ignore[attr-defined]

    def getaddrinfo(host: str, port: int) -> list[tuple[Any, ...]]:
        return [(socket.AF_INET, socket.SOCK_STREAM, 0, "", servers[host])]

    usocket.getaddrinfo = getaddrinfo  # type: ignore[attr-defined]
    ubinascii = types.ModuleType("ubinascii")
    ubinascii.hexlify = binascii.hexlify  # type: ignore[attr-defined]
    modules = {"usocket": usocket, "ustruct": struct, "ubinascii": ubinascii}
    simple = types.ModuleType("umqtt.simple")
    simple.__file__ = str(REAL_UMQTT)
    previous = {name: sys.modules.get(name) for name in modules}
    sys.modules.update(modules)
    try:
        exec(compile(REAL_UMQTT.read_text(), str(REAL_UMQTT), "exec"), simple.__dict__)
    finally:
        for name, module in previous.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module
    package = types.ModuleType("umqtt")
    package.simple = simple  # type: ignore[attr-defined]
    return {"umqtt": package, "umqtt.simple": simple}


@dataclass
class TasmotaRule:
    """One `ON <trigger> DO <command> ENDON` of a Tasmota rule set."""

    trigger: str
    command: str


def tasmota_rules(console: str) -> list[TasmotaRule]:
    """The `ON <trigger> DO <command> ENDON` rules of the console lines."""
    text = " ".join(line.strip() for line in console.splitlines())
    return [
        TasmotaRule(trigger, command.strip())
        for trigger, command in re.findall(r"ON (\S+) DO (.*?) ENDON", text)
    ]


def tasmota_fire(rules: list[TasmotaRule], trigger: str, value: str) -> list[str]:
    """The commands the rules run when `trigger` happens with `value` (`=`, `$<`, or none)."""
    commands = []
    for rule in rules:
        name, op, expected = re.fullmatch(r"(.+?)(?:(\$<|=)(.*))?", rule.trigger).groups()  # type: ignore[union-attr]
        if name.lower() != trigger.lower():
            continue
        if (
            op is None
            or (op == "=" and value == expected)
            or (op == "$<" and value.startswith(expected))
        ):
            commands.append(rule.command.replace("%value%", value))
    return commands
