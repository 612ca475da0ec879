"""A blocking MQTT test client on paho-mqtt 2.2 (its own network thread)."""

from __future__ import annotations

import asyncio
import itertools
import json as jsonlib
import socket
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING, Any, Self

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

if TYPE_CHECKING:
    from .broker import MosquittoBroker

__all__ = ["MQTTv5", "MQTTv311", "Payload", "Received", "TestClient", "encode_payload"]

MQTTv5 = mqtt.MQTTv5
MQTTv311 = mqtt.MQTTv311

Payload = bytes | bytearray | str | dict[str, Any] | list[Any] | None
_ids = itertools.count(1)


def encode_payload(payload: Payload) -> bytes:
    """bytes as they are, str as UTF-8, dict/list as compact JSON, None as empty."""
    if payload is None:
        return b""
    if isinstance(payload, bytes | bytearray):
        return bytes(payload)
    if isinstance(payload, str):
        return payload.encode("utf-8")
    return jsonlib.dumps(payload, separators=(",", ":")).encode("utf-8")


@dataclass(frozen=True, eq=False)
class Received:
    """One message as the client received it."""

    topic: str
    payload: bytes
    qos: int
    retain: bool
    dup: bool
    properties: Properties | None
    received_at: float  #: time.monotonic()
    index: int  #: position in the client's message log

    def json(self) -> Any:
        """The payload parsed as JSON (ValueError if it is not JSON)."""
        return jsonlib.loads(self.payload)

    def text(self) -> str:
        """The payload decoded as UTF-8."""
        return self.payload.decode("utf-8")

    def _prop(self, name: str) -> Any:
        return getattr(self.properties, name, None) if self.properties is not None else None

    @property
    def response_topic(self) -> str | None:
        """MQTT 5 Response Topic."""
        value: str | None = self._prop("ResponseTopic")
        return value

    @property
    def correlation_data(self) -> bytes | None:
        """MQTT 5 Correlation Data."""
        value: bytes | None = self._prop("CorrelationData")
        return value

    @property
    def content_type(self) -> str | None:
        """MQTT 5 Content Type."""
        value: str | None = self._prop("ContentType")
        return value

    @property
    def user_properties(self) -> list[tuple[str, str]]:
        """MQTT 5 User Properties, in order."""
        return list(self._prop("UserProperty") or [])

    @property
    def message_expiry_interval(self) -> int | None:
        """MQTT 5 Message Expiry Interval (as Mosquitto forwards it)."""
        value: int | None = self._prop("MessageExpiryInterval")
        return value


def _failed(codes: Sequence[ReasonCode] | ReasonCode) -> list[str]:
    items = codes if isinstance(codes, Sequence) else [codes]
    return [str(code) for code in items if code.is_failure]


class TestClient:
    """paho-mqtt client for tests: blocking calls with deadlines, every message logged.

    Clean session by default; reconnects by itself (paho's loop_start thread) and then
    re-subscribes. TCP_NODELAY is set on its socket. `prefix` is the topic prefix
    `request()` uses.
    """

    __test__ = False  # not a pytest test class

    def __init__(
        self,
        host: str,
        port: int,
        *,
        protocol: int = MQTTv5,
        client_id: str | None = None,
        prefix: str = "openai",
        keepalive: int = 30,
        clean: bool = True,
        session_expiry: int | None = None,
        receive_maximum: int | None = None,
        timeout: float = 10.0,
        username: str | None = None,
        password: str | None = None,
    ) -> None:
        if protocol not in (MQTTv5, MQTTv311):
            raise ValueError(f"protocol must be MQTTv5 or MQTTv311, not {protocol!r}")
        self.host = host
        self.port = port
        self.protocol = protocol
        self.client_id = client_id or f"test-{next(_ids)}-{uuid.uuid4().hex[:8]}"
        self.prefix = prefix
        self.keepalive = keepalive
        self.clean = clean
        self.session_expiry = session_expiry
        self.receive_maximum = receive_maximum
        self.timeout = timeout
        self._cond = threading.Condition()
        self._messages: list[Received] = []
        self._subscriptions: dict[str, int] = {}
        self._acks: dict[int, Sequence[ReasonCode] | ReasonCode] = {}
        self._ignored_mids: set[int] = set()
        self._connects = 0
        self._connected = False
        self._connack: ReasonCode | None = None
        self._disconnects = 0
        self._loop_started = False
        v5 = protocol == MQTTv5
        self._client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=self.client_id,
            protocol=MQTTProtocolVersion(protocol),
            clean_session=None if v5 else clean,
        )
        if username is not None:
            self._client.username_pw_set(username, password)
        # paho annotates ints but sleeps on floats; a restarted test broker is back in ms.
        self._client.reconnect_delay_set(min_delay=0.1, max_delay=1.0)  # type: ignore[arg-type]
        self._client.on_socket_open = self._on_socket_open
        self._client.on_connect = self._on_connect
        self._client.on_disconnect = self._on_disconnect
        self._client.on_subscribe = self._on_ack
        self._client.on_unsubscribe = self._on_ack
        self._client.on_publish = self._on_publish
        self._client.on_message = self._on_message

    @classmethod
    def for_broker(cls, broker: MosquittoBroker, **kwargs: Any) -> Self:
        """A client for `broker` (not yet connected)."""
        return cls(broker.host, broker.port, **kwargs)

    @property
    def paho(self) -> mqtt.Client:
        """The underlying paho client."""
        return self._client

    @property
    def v5(self) -> bool:
        """Whether this client speaks MQTT 5."""
        return self.protocol == MQTTv5

    # ------------------------------------------------------------ paho callbacks
    @staticmethod
    def _on_socket_open(client: mqtt.Client, userdata: Any, sock: Any) -> None:
        setsockopt = getattr(sock, "setsockopt", None)
        if setsockopt is not None:
            setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def _on_connect(
        self,
        client: mqtt.Client,
        userdata: Any,
        flags: mqtt.ConnectFlags,
        reason_code: ReasonCode,
        properties: Properties | None,
    ) -> None:
        with self._cond:
            self._connack = reason_code
            if not reason_code.is_failure:
                self._connected = True
                self._connects += 1
                if self._connects > 1 and self.clean:
                    # Runs on paho's thread, so no SUBACK can be handled before the
                    # mids are recorded as ignored.
                    for topic_filter, qos in self._subscriptions.items():
                        _, mid = client.subscribe(topic_filter, qos)
                        if mid is not None:
                            self._ignored_mids.add(mid)
            self._cond.notify_all()

    def _on_disconnect(
        self,
        client: mqtt.Client,
        userdata: Any,
        flags: mqtt.DisconnectFlags,
        reason_code: ReasonCode,
        properties: Properties | None,
    ) -> None:
        with self._cond:
            self._connected = False
            self._disconnects += 1
            self._ignored_mids.clear()  # those SUBACKs will never come
            self._cond.notify_all()

    def _on_ack(
        self,
        client: mqtt.Client,
        userdata: Any,
        mid: int,
        reason_codes: list[ReasonCode],
        properties: Properties | None,
    ) -> None:
        with self._cond:
            if mid in self._ignored_mids:
                self._ignored_mids.discard(mid)
                self._cond.notify_all()
                return
            self._acks[mid] = reason_codes
            self._cond.notify_all()

    def _on_publish(
        self,
        client: mqtt.Client,
        userdata: Any,
        mid: int,
        reason_code: ReasonCode,
        properties: Properties | None,
    ) -> None:
        with self._cond:
            self._acks[mid] = reason_code
            self._cond.notify_all()

    def _on_message(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        with self._cond:
            self._messages.append(
                Received(
                    topic=message.topic,
                    payload=bytes(message.payload),
                    qos=message.qos,
                    retain=bool(message.retain),
                    dup=bool(message.dup),
                    properties=getattr(message, "properties", None),
                    received_at=time.monotonic(),
                    index=len(self._messages),
                )
            )
            self._cond.notify_all()

    def _wait_ack(self, mid: int, what: str, timeout: float) -> Sequence[ReasonCode] | ReasonCode:
        with self._cond:
            if not self._cond.wait_for(lambda: mid in self._acks, timeout):
                raise TimeoutError(f"{self.client_id}: no {what} for mid {mid} in {timeout}s")
            return self._acks.pop(mid)

    # ---------------------------------------------------------------- connection
    def connect(self, timeout: float | None = None) -> Self:
        """Connect and wait for a successful CONNACK (ConnectionError if refused)."""
        timeout = self.timeout if timeout is None else timeout
        with self._cond:
            self._connack = None
        if self.v5:
            properties = None
            if self.session_expiry is not None or self.receive_maximum is not None:
                properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
                if self.session_expiry is not None:
                    properties.SessionExpiryInterval = self.session_expiry
                if self.receive_maximum is not None:
                    properties.ReceiveMaximum = self.receive_maximum
            self._client.connect(
                self.host, self.port, self.keepalive, clean_start=self.clean, properties=properties
            )
        else:
            self._client.connect(self.host, self.port, self.keepalive)
        if not self._loop_started:
            self._client.loop_start()
            self._loop_started = True
        with self._cond:
            self._cond.wait_for(lambda: self._connack is not None, timeout)
            connack = self._connack
        if connack is None:
            self._stop_loop()
            raise TimeoutError(f"{self.client_id}: no CONNACK from {self.host}:{self.port}")
        if connack.is_failure:
            self._stop_loop()
            raise ConnectionError(f"{self.client_id}: connection refused: {connack}")
        return self

    def wait_connected(self, timeout: float | None = None, *, connects: int | None = None) -> None:
        """Wait until connected (after at least `connects` successful CONNACKs in all)
        and the subscriptions renewed after a reconnect are acknowledged."""
        timeout = self.timeout if timeout is None else timeout
        needed = connects or 1
        with self._cond:
            if not self._cond.wait_for(
                lambda: self._connected and self._connects >= needed and not self._ignored_mids,
                timeout,
            ):
                raise TimeoutError(f"{self.client_id}: not (re)connected within {timeout}s")

    def wait_disconnected(self, timeout: float | None = None) -> None:
        """Wait until paho noticed the connection is gone."""
        timeout = self.timeout if timeout is None else timeout
        with self._cond:
            if not self._cond.wait_for(lambda: not self._connected, timeout):
                raise TimeoutError(f"{self.client_id}: still connected after {timeout}s")

    @property
    def connected(self) -> bool:
        """Whether a CONNACK arrived and no disconnect since."""
        with self._cond:
            return self._connected

    @property
    def connects(self) -> int:
        """How many successful CONNACKs this client got (reconnects included)."""
        with self._cond:
            return self._connects

    def disconnect(self, timeout: float | None = None) -> None:
        """Send DISCONNECT, wait until paho saw the connection close, stop its thread."""
        timeout = self.timeout if timeout is None else timeout
        with self._cond:
            was_connected = self._connected
            before = self._disconnects
        if was_connected:
            self._client.disconnect()
            with self._cond:
                self._cond.wait_for(lambda: self._disconnects > before, timeout)
        self._stop_loop()

    def _stop_loop(self) -> None:
        if self._loop_started:
            self._client.loop_stop()
            self._loop_started = False
        # paho keeps the socket when the loop stops without a DISCONNECT round trip.
        sock = self._client.socket()
        if sock is not None:
            sock.close()

    def __enter__(self) -> Self:
        if not self._loop_started:
            self.connect()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.disconnect()

    # ------------------------------------------------------------- subscriptions
    def subscribe(self, topic_filter: str, qos: int = 1, timeout: float | None = None) -> None:
        """Subscribe and wait for the SUBACK (RuntimeError if the broker refused)."""
        timeout = self.timeout if timeout is None else timeout
        result, mid = self._client.subscribe(topic_filter, qos)
        if result != mqtt.MQTT_ERR_SUCCESS or mid is None:
            raise RuntimeError(f"subscribe {topic_filter!r} failed: {mqtt.error_string(result)}")
        codes = self._wait_ack(mid, "SUBACK", timeout)
        if failed := _failed(codes):
            raise RuntimeError(f"broker refused subscription {topic_filter!r}: {failed}")
        with self._cond:
            self._subscriptions[topic_filter] = qos

    def unsubscribe(self, topic_filter: str, timeout: float | None = None) -> None:
        """Unsubscribe and wait for the UNSUBACK."""
        timeout = self.timeout if timeout is None else timeout
        with self._cond:
            self._subscriptions.pop(topic_filter, None)
        result, mid = self._client.unsubscribe(topic_filter)
        if result != mqtt.MQTT_ERR_SUCCESS or mid is None:
            raise RuntimeError(f"unsubscribe {topic_filter!r} failed: {mqtt.error_string(result)}")
        self._wait_ack(mid, "UNSUBACK", timeout)

    def subscribed(self, topic: str) -> bool:
        """Whether one of our subscriptions covers `topic`."""
        with self._cond:
            return any(mqtt.topic_matches_sub(f, topic) for f in self._subscriptions)

    # ------------------------------------------------------------------ publish
    def publish(
        self,
        topic: str,
        payload: Payload = None,
        qos: int = 1,
        retain: bool = False,
        *,
        response_topic: str | None = None,
        correlation_data: bytes | str | None = None,
        user_properties: Sequence[tuple[str, str]] | None = None,
        content_type: str | None = None,
        message_expiry: int | None = None,
        properties: Properties | None = None,
        timeout: float | None = None,
    ) -> mqtt.MQTTMessageInfo:
        """Publish and wait until it is out (QoS 0) or acknowledged (QoS 1/2).

        dict/list payloads go as JSON. MQTT 5 properties may be given one by one or
        as a ready `properties` object.
        """
        timeout = self.timeout if timeout is None else timeout
        wanted = {
            "ResponseTopic": response_topic,
            "CorrelationData": (
                correlation_data.encode("utf-8")
                if isinstance(correlation_data, str)
                else correlation_data
            ),
            "UserProperty": list(user_properties) if user_properties else None,
            "ContentType": content_type,
            "MessageExpiryInterval": message_expiry,
        }
        given = {name: value for name, value in wanted.items() if value is not None}
        if given:
            if not self.v5:
                raise ValueError(f"MQTT 3.1.1 has no properties ({', '.join(given)})")
            properties = properties or Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
            for name, value in given.items():
                setattr(properties, name, value)
        info = self._client.publish(
            topic, encode_payload(payload), qos=qos, retain=retain, properties=properties
        )
        info.wait_for_publish(timeout)
        if not info.is_published():
            raise TimeoutError(f"{self.client_id}: publish to {topic!r} not acked in {timeout}s")
        # on_publish ran before paho marked the message published; always pop its
        # entry, since mids are shared with (un)subscribe.
        code = self._wait_ack(info.mid, "PUBACK" if qos else "publish", timeout)
        if qos > 0 and (failed := _failed(code)):
            raise RuntimeError(f"broker refused publish to {topic!r}: {failed}")
        return info

    # ----------------------------------------------------------------- messages
    def messages(self, topic_filter: str = "#", *, after: int = 0) -> list[Received]:
        """Received messages matching `topic_filter`, from log position `after` on."""
        with self._cond:
            return [
                m for m in self._messages[after:] if mqtt.topic_matches_sub(topic_filter, m.topic)
            ]

    def mark(self) -> int:
        """The current log position: pass it as `after` to see only newer messages."""
        with self._cond:
            return len(self._messages)

    def clear(self) -> None:
        """Forget received messages (log positions restart at 0)."""
        with self._cond:
            self._messages.clear()

    def wait_for(
        self,
        topic_filter: str = "#",
        n: int = 1,
        timeout: float | None = None,
        *,
        after: int = 0,
        where: Callable[[Received], bool] | None = None,
    ) -> list[Received]:
        """Wait for `n` messages matching `topic_filter` (and `where`); returns the first n."""
        timeout = self.timeout if timeout is None else timeout

        def matching() -> list[Received]:
            found = [
                m
                for m in self._messages[after:]
                if mqtt.topic_matches_sub(topic_filter, m.topic) and (where is None or where(m))
            ]
            return found

        with self._cond:
            if not self._cond.wait_for(lambda: len(matching()) >= n, timeout):
                seen = [m.topic for m in self._messages[after:]]
                raise TimeoutError(
                    f"{self.client_id}: {len(matching())} of {n} messages on {topic_filter!r} "
                    f"within {timeout}s; topics seen: {seen}"
                )
            return matching()[:n]

    def wait_for_one(
        self, topic_filter: str = "#", timeout: float | None = None, **kw: Any
    ) -> Received:
        """`wait_for(..., n=1)[0]`."""
        return self.wait_for(topic_filter, 1, timeout, **kw)[0]

    # ---------------------------------------------------------------- requests
    def topic(self, kind: str, method: str, suffix: str | None = None) -> str:
        """`<prefix>/<kind>/<method>[/<suffix>]`."""
        tail = f"/{suffix}" if suffix else ""
        return f"{self.prefix}/{kind}/{method}{tail}"

    def request_raw(
        self,
        method: str,
        payload: Payload = None,
        *,
        suffix: str | None = None,
        timeout: float | None = None,
        qos: int = 1,
        response_topic: str | None = None,
        correlation_data: bytes | str | None = None,
        **publish_kwargs: Any,
    ) -> Received:
        """Publish to `<prefix>/request/<method>[/<suffix>]`, return the reply message.

        The reply is expected on `response_topic` when given (MQTT 5), else on
        `<prefix>/response/<method>[/<suffix>]`; it is subscribed to first. With
        correlation data, only a reply carrying the same data counts.
        """
        timeout = self.timeout if timeout is None else timeout
        reply_topic = response_topic or self.topic("response", method, suffix)
        if not self.subscribed(reply_topic):
            self.subscribe(reply_topic, qos=qos, timeout=timeout)
        cdata = correlation_data.encode() if isinstance(correlation_data, str) else correlation_data
        position = self.mark()
        self.publish(
            self.topic("request", method, suffix),
            payload,
            qos=qos,
            response_topic=response_topic,
            correlation_data=cdata,
            timeout=timeout,
            **publish_kwargs,
        )
        where = None if cdata is None else (lambda m: m.correlation_data == cdata)
        return self.wait_for(reply_topic, 1, timeout, after=position, where=where)[0]

    def request(self, method: str, payload: Payload = None, **kwargs: Any) -> Any:
        """`request_raw(...)`, the reply parsed as JSON."""
        return self.request_raw(method, payload, **kwargs).json()

    # ------------------------------------------- async variants (for async tests)
    async def wait_for_async(self, *args: Any, **kwargs: Any) -> list[Received]:
        """`wait_for` in a worker thread, leaving the caller's event loop free."""
        return await asyncio.to_thread(self.wait_for, *args, **kwargs)

    async def request_async(self, method: str, payload: Payload = None, **kwargs: Any) -> Any:
        """`request` in a worker thread (use it when the bridge runs in the test's loop)."""
        return await asyncio.to_thread(self.request, method, payload, **kwargs)

    async def request_raw_async(
        self, method: str, payload: Payload = None, **kwargs: Any
    ) -> Received:
        """`request_raw` in a worker thread."""
        return await asyncio.to_thread(self.request_raw, method, payload, **kwargs)

    async def publish_async(self, *args: Any, **kwargs: Any) -> mqtt.MQTTMessageInfo:
        """`publish` in a worker thread."""
        return await asyncio.to_thread(self.publish, *args, **kwargs)

    def __repr__(self) -> str:
        version = "5" if self.v5 else "3.1.1"
        return f"<TestClient {self.client_id} MQTT {version} {self.host}:{self.port}>"


def durable_client(broker: MosquittoBroker, prefix: str) -> TestClient:
    """A connected client whose session and reply subscription survive its and the broker's
    restarts (persistent session, `<prefix>/response/#` subscribed)."""
    client = TestClient.for_broker(
        broker, prefix=prefix, clean=False, session_expiry=600, client_id=f"durable-{prefix}"
    )
    client.connect()
    client.subscribe(f"{prefix}/response/#")
    return client
