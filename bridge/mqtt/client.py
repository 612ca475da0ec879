"""The MQTT transport: paho-mqtt driven from the asyncio loop (in the spirit of aiomqtt's client).

paho's reconnect only works with its own thread loops, so this adapter makes each connection
attempt itself (MQTT 5, falling back to 3.1.1 in `auto` mode), keeps a persistent session,
subscribes on every CONNACK, publishes with an awaitable PUBACK and acknowledges requests
manually once their reply is out. When to (re)connect is the supervisor's job
(bridge/mqtt/reconnect.py); every use of paho's internals goes through bridge/compat/__init__.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import threading
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from paho.mqtt.subscribeoptions import SubscribeOptions

from bridge.backoff import Backoff
from bridge.compat import paho as compat
from bridge.config import MqttConfig, TlsConfig
from bridge.errors import StartupError
from bridge.messages import InboundMessage, PublishFailed
from bridge.mqtt.grants import SHARED_REFUSAL, BrokerGrants
from bridge.mqtt.reconnect import (
    UNSUPPORTED_PROTOCOL,
    ConnectionLost,
    ConnectionState,
    ConnectRefused,
    ReconnectLogic,
)

if TYPE_CHECKING:
    from structlog.typing import FilteringBoundLogger

# Payloads from this size on are sent through a memoryview (see _write_without_copies).
_LARGE_PAYLOAD = 1 << 20

# Bytes beyond topic and payload in a PUBLISH packet: fixed header, lengths, packet id, properties.
PUBLISH_OVERHEAD = 64

SHARED_NOT_SUPPORTED = 158
"""The SUBACK reason code `Shared Subscriptions not supported`."""

SHARED_PROBE_SECONDS = 5.0
"""How long a probe message may take through a `$share` subscription before sharing is refused."""


class SharedUnavailable(StartupError):
    """The broker cannot deliver through a shared subscription (exit 78)."""


def tls_context(tls: TlsConfig) -> ssl.SSLContext:
    """The client TLS context for `[mqtt.tls]`: the CA file (else the system's), a client cert."""
    context = compat.tls_context()
    if tls.ca_file:
        context.load_verify_locations(cafile=tls.ca_file)
    else:
        context.load_default_certs()
    if tls.cert_file:
        context.load_cert_chain(tls.cert_file, tls.key_file or None)
    return context


def new_client(
    config: MqttConfig,
    *,
    protocol: MQTTProtocolVersion,
    client_id: str,
    persistent: bool,
) -> tuple[paho.Client, ssl.SSLContext | None]:
    """A paho client for `config` (credentials, TLS) and its TLS context, shared by the daemon
    and `openai-mqtt-bridge call`; `persistent` keeps the session and acknowledges manually."""
    v5 = protocol == MQTTProtocolVersion.MQTTv5
    client = paho.Client(
        CallbackAPIVersion.VERSION2,
        client_id=client_id,
        clean_session=None if v5 or not persistent else False,
        protocol=protocol,
        manual_ack=persistent,
        reconnect_on_failure=False,
    )
    if config.username:
        client.username_pw_set(config.username, config.password.get_secret_value() or None)
    context = None
    if config.tls.active:
        context = tls_context(config.tls)
        client.tls_set_context(context)
    return client, context


class MqttTransport:
    """One broker connection with a persistent session and manual acknowledgement.

    Raises StartupError (exit 78) when the `[mqtt.tls]` files cannot be used.
    """

    def __init__(
        self,
        config: MqttConfig,
        *,
        subscription: str | None,
        receive_maximum: int,
        will: tuple[str, bytes] | None,
        will_retain: bool = True,
        on_message: Callable[[InboundMessage], None],
        on_connected: Callable[[], None],
        log: FilteringBoundLogger,
        protocol: str | None = None,
        extra_subscriptions: Sequence[tuple[str, int]] = (),
        unsubscribe: Sequence[str] = (),
        shared_probe: str | None = None,
        before_first_subscribe: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        self.config = config
        self.subscription = subscription
        """The requests' filter (QoS 1, Retain As Published); None for a status-only client."""
        self.extra_subscriptions = tuple(extra_subscriptions)
        """More (filter, QoS) pairs; their messages reach `on_message` too, routed by topic."""
        self.unsubscribe = list(unsubscribe)
        """Filters to drop from a resumed session (left there by an earlier configuration)."""
        self.shared_probe = shared_probe
        """A topic to check a `$share` subscription with on the first connect, when the CONNACK
        cannot say (MQTT 3.1.1); None: trust the broker."""
        self.before_first_subscribe = before_first_subscribe
        """Awaited once, after the first CONNACK and before the first SUBSCRIBE."""
        self.receive_maximum = max(1, min(receive_maximum, 65535))
        self.will = will
        self.will_retain = will_retain
        self._on_message_cb = on_message
        self._on_connected_cb = on_connected
        self.log = log
        self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        mode = protocol or config.protocol
        self._protocol_mode = mode
        self.protocol: MQTTProtocolVersion = (
            MQTTProtocolVersion.MQTTv311 if mode == "3.1.1" else MQTTProtocolVersion.MQTTv5
        )
        self.generation = 0
        self.connected = asyncio.Event()
        self.lost = asyncio.Event()
        self.max_packet_size = config.max_packet_size
        self._pending_pubs: dict[int, asyncio.Future[None]] = {}
        self._connack: asyncio.Future[None] | None = None
        self._session_present = False
        self._suback: asyncio.Future[None] | None = None
        self._sub_mid: int | None = None
        self._other_subacks: dict[int, asyncio.Future[list[ReasonCode]]] = {}
        """SUBACKs and UNSUBACKs awaited by packet id (beside the requests' SUBACK)."""
        self._probe: tuple[str, asyncio.Future[None]] | None = None
        self._shared_checked = False
        self._acking = False
        """Between a CONNACK and the loss of that connection (acks may go out before SUBACK)."""
        self.grants = BrokerGrants(self.protocol_label)
        """What the broker granted in its last CONNACK."""
        self._misc_task: asyncio.Task[None] | None = None
        self._reads: compat.ReadBuffer | None = None
        self._flush_pending = False
        self._ever_connected = False
        self._tls_context: ssl.SSLContext | None = None
        self.supervisor = ReconnectLogic(
            self, Backoff(config.reconnect_min, config.reconnect_max), log
        )
        try:
            self._client = self._make_client()
        except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
            raise StartupError(f"cannot use the [mqtt.tls] files: {exc}") from None

    @property
    def state(self) -> ConnectionState:
        """The connection's state, as the supervisor sees it."""
        return self.supervisor.state

    @property
    def protocol_label(self) -> str:
        """The MQTT version in use as the info topic and the log say it: `5` or `3.1.1`."""
        return "5" if self.protocol == MQTTProtocolVersion.MQTTv5 else "3.1.1"

    @property
    def _closing(self) -> bool:
        return self.supervisor.closed

    # --- paho client and its socket callbacks ---------------------------------------------------

    def _make_client(self) -> paho.Client:
        client, self._tls_context = new_client(
            self.config,
            protocol=self.protocol,
            client_id=self.config.effective_client_id,
            persistent=True,
        )
        client.connect_timeout = 10.0
        compat.lean_filter_matcher(client)
        self._reads = compat.read_buffer(client)
        client.max_queued_messages_set(10_000)
        client.max_inflight_messages_set(20)  # MQTT 5 brokers announce their own in CONNACK
        if self.will is not None:
            topic, payload = self.will
            client.will_set(topic, payload, qos=1, retain=self.will_retain)
        client.on_socket_open = self._on_socket_open
        client.on_socket_close = self._on_socket_close
        client.on_socket_register_write = self._on_socket_register_write
        client.on_socket_unregister_write = self._on_socket_unregister_write
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        client.on_publish = self._on_publish
        client.on_subscribe = self._on_subscribe
        client.on_unsubscribe = self._on_unsubscribe
        return client

    def _in_loop(self, fn: Callable[..., Any], *args: Any) -> None:
        """Run `fn` on the loop thread: paho calls socket hooks from the connect executor too."""
        # The thread, not asyncio.get_running_loop(): on Python 3.11 that costs a getpid()
        # system call, and paho calls these hooks for nearly every packet it sends.
        if threading.get_ident() == self._loop_thread:
            fn(*args)
        else:
            self._loop.call_soon_threadsafe(fn, *args)

    def _on_socket_open(self, client: paho.Client, userdata: Any, sock: Any) -> None:
        with contextlib.suppress(OSError, AttributeError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._in_loop(self._watch_socket, client, sock)

    def _watch_socket(self, client: paho.Client, sock: Any) -> None:
        if self._reads is not None:
            self._reads.reset(sock)
        self._loop.add_reader(sock, self._read, client)

    def _read(self, client: paho.Client) -> None:
        try:
            reads = self._reads
            if reads is None:
                client.loop_read()
                return
            reads.arm()
            client.loop_read()
            # paho stops after as many packets as it has messages in flight; the rest is read.
            while reads.pending and client.socket() is not None:
                client.loop_read()
        except Exception as exc:
            self.log.debug("mqtt read failed", error=repr(exc), exc_info=True)
            self._connection_lost()

    def _write(self, client: paho.Client) -> None:
        try:
            client.loop_write()
        except Exception as exc:  # noqa: BLE001  (a broken socket, however it fails, is a loss)
            self.log.debug("mqtt write failed", error=type(exc).__name__)
            self._connection_lost()

    def _on_socket_close(self, client: paho.Client, userdata: Any, sock: Any) -> None:
        self._in_loop(self._remove_fd, sock)

    def _remove_fd(self, sock: Any) -> None:
        with contextlib.suppress(ValueError, OSError):
            self._loop.remove_reader(sock)
            self._loop.remove_writer(sock)

    def _on_socket_register_write(self, client: paho.Client, userdata: Any, sock: Any) -> None:
        # On the loop thread the queued packets go out once the callbacks now ready have run
        # (everything they queue in one go); the socket is polled for writing only when it is
        # full, instead of an add_writer and a remove_writer around every packet.
        if threading.get_ident() != self._loop_thread:
            self._loop.call_soon_threadsafe(self._loop.add_writer, sock, self._write, client)
        elif not self._flush_pending:
            self._flush_pending = True
            self._loop.call_soon(self._flush, client)

    def _flush(self, client: paho.Client) -> None:
        self._flush_pending = False
        self._write(client)
        sock = client.socket()
        if sock is not None and client.want_write():
            self._loop.add_writer(sock, self._write, client)

    def _on_socket_unregister_write(self, client: paho.Client, userdata: Any, sock: Any) -> None:
        self._in_loop(self._remove_writer, sock)

    def _remove_writer(self, sock: Any) -> None:
        with contextlib.suppress(ValueError, OSError):
            self._loop.remove_writer(sock)

    # --- paho protocol callbacks (all on the loop thread) ----------------------------------------

    def _on_connect(
        self,
        client: paho.Client,
        userdata: Any,
        flags: Any,
        reason: ReasonCode,
        properties: Properties | None,
    ) -> None:
        fut = self._connack
        if reason.is_failure:
            if fut is not None and not fut.done():
                fut.set_exception(ConnectRefused(int(reason.value), str(reason)))
            return
        session_present = bool(getattr(flags, "session_present", False))
        self._session_present = session_present
        self.grants = BrokerGrants.from_connack(self.protocol_label, properties)
        self._acking = True
        if not session_present:
            # The broker forgot our unacked requests; their packet ids now mean nothing.
            self.generation += 1
        if properties is not None:
            size = getattr(properties, "MaximumPacketSize", None)
            if isinstance(size, int) and size > 0:
                self.max_packet_size = min(size, self.config.max_packet_size)
            recv = getattr(properties, "ReceiveMaximum", None)
            if isinstance(recv, int) and recv > 0:
                # The broker's Receive Maximum bounds our unacked publishes.
                compat.set_max_inflight(client, min(recv, 65535))
        if fut is not None and not fut.done():
            fut.set_result(None)

    def _on_disconnect(
        self,
        client: paho.Client,
        userdata: Any,
        flags: Any,
        reason: ReasonCode,
        properties: Properties | None,
    ) -> None:
        self._connection_lost(reason)

    def _connection_lost(self, reason: Any = None) -> None:
        was_connected = self.connected.is_set()
        self.connected.clear()
        self._acking = False
        lost = ConnectionLost(str(reason) if reason is not None else "closed")
        waiting = [self._connack, self._suback, *self._other_subacks.values()]
        if self._probe is not None:
            waiting.append(self._probe[1])
        for fut in waiting:
            if fut is not None and not fut.done():
                fut.set_exception(lost)
        if was_connected and not self._closing:
            self.log.warning("broker connection lost", reason=str(reason) if reason else None)
        self.lost.set()

    def _on_message(self, client: paho.Client, userdata: Any, message: paho.MQTTMessage) -> None:
        try:
            topic = compat.message_topic(message)
            if self._probe is not None and topic == self._probe[0]:
                if message.qos == 1:
                    client.ack(message.mid, 1)
                if not self._probe[1].done():
                    self._probe[1].set_result(None)
                return
            props = message.properties
            response_topic = getattr(props, "ResponseTopic", None) if props is not None else None
            correlation = getattr(props, "CorrelationData", None) if props is not None else None
            inbound = InboundMessage(
                topic=topic,
                payload=bytes(message.payload),
                qos=message.qos,
                retain=bool(message.retain),
                dup=bool(message.dup),
                mid=message.mid,
                generation=self.generation,
                response_topic=response_topic,
                correlation_data=bytes(correlation) if correlation is not None else None,
            )
            self._on_message_cb(inbound)
        except Exception:  # paho must never see our failure: it would drop the connection
            self.log.exception("inbound message handler failed", mid=message.mid)

    def _on_publish(
        self,
        client: paho.Client,
        userdata: Any,
        mid: int,
        reason: ReasonCode,
        properties: Properties | None,
    ) -> None:
        fut = self._pending_pubs.pop(mid, None)
        if fut is None or fut.done():
            return
        # 16 = "No matching subscribers": the broker took the message, nobody listens yet.
        if reason.is_failure and int(reason.value) != 16:
            fut.set_exception(PublishFailed(f"broker refused the publish: {reason}"))
        else:
            fut.set_result(None)

    def _on_subscribe(
        self,
        client: paho.Client,
        userdata: Any,
        mid: int,
        reasons: list[ReasonCode],
        properties: Properties | None,
    ) -> None:
        if self._settle_other(mid, reasons):
            return
        fut = self._suback
        if mid != self._sub_mid or fut is None or fut.done():
            return
        extra_reasons = reasons
        if self.subscription is not None:
            if reasons and reasons[0].is_failure:
                fut.set_exception(
                    ConnectRefused(int(reasons[0].value), f"subscribe refused: {reasons}")
                )
                return
            extra_reasons = reasons[1:]
        for (topic_filter, _), reason in zip(self.extra_subscriptions, extra_reasons, strict=False):
            if reason.is_failure:
                self.log.warning("subscription refused", filter=topic_filter, reason=str(reason))
        fut.set_result(None)

    def _on_unsubscribe(
        self, client: paho.Client, userdata: Any, mid: int, reasons: Any, properties: Any
    ) -> None:
        self._settle_other(mid, reasons)

    def _settle_other(self, mid: int, reasons: list[ReasonCode]) -> bool:
        """Hand a SUBACK or UNSUBACK to its subscribe_now or unsubscribe_now; whether it was one."""
        waiter = self._other_subacks.pop(mid, None)
        if waiter is None:
            return False
        if not waiter.done():
            waiter.set_result(list(reasons))
        return True

    # --- public API -------------------------------------------------------------------------------

    async def start(self) -> None:
        """Connect and subscribe (retrying until it works), then keep reconnecting in background."""
        await self.supervisor.start()
        self._misc_task = asyncio.create_task(self._misc_loop(), name="mqtt-misc")

    def publish(
        self,
        topic: str,
        payload: bytes,
        *,
        retain: bool = False,
        qos: int = 1,
        correlation_data: bytes | None = None,
        content_type: str | None = None,
    ) -> asyncio.Future[None]:
        """Queue a publish; the future completes when the broker acknowledged it (QoS 1).

        Correlation Data and Content Type go out as MQTT 5 properties; over 3.1.1 they are dropped.
        """
        props = None
        if (
            correlation_data is not None or content_type is not None
        ) and self.protocol == MQTTProtocolVersion.MQTTv5:
            props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
            if correlation_data is not None:
                props.CorrelationData = correlation_data
            if content_type is not None:
                props.ContentType = content_type
        fut: asyncio.Future[None] = self._loop.create_future()
        try:
            info = self._client.publish(topic, payload, qos=qos, retain=retain, properties=props)
        except (ValueError, TypeError) as exc:
            fut.set_exception(PublishFailed(str(exc)))
            return fut
        if info.rc not in (MQTTErrorCode.MQTT_ERR_SUCCESS, MQTTErrorCode.MQTT_ERR_NO_CONN):
            fut.set_exception(
                PublishFailed(f"publish not queued: {paho.error_string(info.rc)}", retry_later=True)
            )
            return fut
        if len(payload) >= _LARGE_PAYLOAD:
            compat.write_large_without_copies(self._client, info.mid)  # never raises
        if qos == 0:
            fut.set_result(None)
        else:
            self._pending_pubs[info.mid] = fut
        return fut

    async def subscribe_now(self, filters: Sequence[tuple[str, int]]) -> list[ReasonCode]:
        """SUBSCRIBE to (filter, QoS) pairs beside the configured ones; the SUBACK's reasons."""
        _rc, mid = self._client.subscribe(list(filters))
        return await self._acked(mid)

    async def unsubscribe_now(self, filters: Sequence[str]) -> list[ReasonCode]:
        """UNSUBSCRIBE `filters`; the UNSUBACK's reasons (empty over MQTT 3.1.1)."""
        _rc, mid = self._client.unsubscribe(list(filters))
        return await self._acked(mid)

    async def _acked(self, mid: int | None) -> list[ReasonCode]:
        if mid is None:
            raise ConnectionLost("not connected")
        waiter: asyncio.Future[list[ReasonCode]] = self._loop.create_future()
        self._other_subacks[mid] = waiter
        return await asyncio.wait_for(waiter, timeout=15)

    @property
    def session_present(self) -> bool:
        """Whether the last CONNACK resumed a session the broker kept for this client id."""
        return self._session_present

    def fits(self, topic: str, payload_size: int) -> bool:
        """Whether a PUBLISH of this size is within the broker's maximum packet size."""
        return len(topic.encode("utf-8")) + payload_size + PUBLISH_OVERHEAD <= self.max_packet_size

    def ack(self, message: InboundMessage) -> None:
        """Acknowledge a QoS 1 request, unless its session is gone (then its id is meaningless);
        one that came on another connection is acknowledged there."""
        if message.ack_with is not None:
            message.ack_with(message)
        elif message.qos == 1 and message.generation == self.generation and self._acking:
            self._client.ack(message.mid, 1)

    async def close(
        self,
        final: tuple[str, bytes] | None = None,
        wait: float = 5.0,
        *,
        end_session: bool = False,
    ) -> None:
        """Publish `final` (e.g. the retained offline state), disconnect and stop reconnecting;
        `end_session` asks the broker to forget the session at once (MQTT 5)."""
        connected = self.connected.is_set()
        await self.supervisor.stop()
        if final is not None and connected:
            with contextlib.suppress(PublishFailed, TimeoutError):
                await asyncio.wait_for(self.publish(final[0], final[1], retain=True), wait)
        if self._misc_task is not None:
            self._misc_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._misc_task
        with contextlib.suppress(Exception):  # closing: a dead socket may fail in any way
            props = None
            if end_session and self.protocol == MQTTProtocolVersion.MQTTv5:
                props = Properties(PacketTypes.DISCONNECT)  # type: ignore[no-untyped-call]
                props.SessionExpiryInterval = 0
            self._client.disconnect(properties=props)
            # With socket hooks paho only queues the DISCONNECT; write it now, or the broker sees
            # a dropped connection and publishes our last will on top of the `offline` above.
            self._client.loop_write()
        for fut in self._pending_pubs.values():
            if not fut.done():
                fut.cancel()
        self._pending_pubs.clear()
        self._drop_socket()
        self.connected.clear()
        self._acking = False

    # --- connection management --------------------------------------------------------------------

    def _connect_properties(self) -> Properties | None:
        if self.protocol != MQTTProtocolVersion.MQTTv5:
            return None
        props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        props.SessionExpiryInterval = self.config.session_expiry
        props.ReceiveMaximum = self.receive_maximum
        return props

    def describe(self) -> str:
        """`host:port` of the broker."""
        return f"{self.config.host}:{self.config.port}"

    async def connect_once(self) -> None:
        """One attempt: CONNECT, CONNACK, SUBSCRIBE, SUBACK; then `on_connected` is called."""
        self._connack = self._loop.create_future()
        self.lost.clear()
        client = self._client
        if not self._ever_connected:
            v5 = self.protocol == MQTTProtocolVersion.MQTTv5
            extra: dict[str, Any] = (
                {"clean_start": False, "properties": self._connect_properties()} if v5 else {}
            )

            def call() -> Any:
                return client.connect(
                    self.config.host, self.config.port, self.config.keepalive, **extra
                )
        else:
            call = client.reconnect
        rc = await self._loop.run_in_executor(None, call)
        if rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
            raise ConnectionLost(f"connect failed: {paho.error_string(rc)}")
        self._ever_connected = True
        await asyncio.wait_for(self._connack, timeout=15)
        if not self._shared_checked:
            await self._check_shared(client)
            self._shared_checked = True
            if self.before_first_subscribe is not None:
                await self.before_first_subscribe()
        # Subscribe on every connect: the session may be new, and re-subscribing is harmless.
        if self.subscription is not None or self.extra_subscriptions:
            try:
                await self._subscribe(client)
            except ConnectRefused as exc:
                if exc.code == SHARED_NOT_SUPPORTED:
                    self._refuse_shared("refused the $share subscription (reason 158)")
                raise
        if self.unsubscribe and self._session_present:
            client.unsubscribe(self.unsubscribe)  # no need to wait: only a duplicate risk
        self.connected.set()
        self._on_connected_cb()

    async def _subscribe(self, client: paho.Client) -> None:
        """SUBSCRIBE to the requests' filter (first) and the extra ones; wait for the SUBACK."""
        self._suback = self._loop.create_future()
        if self.protocol == MQTTProtocolVersion.MQTTv5:
            v5_topics: list[tuple[str, SubscribeOptions]] = []
            if self.subscription is not None:
                # Retain As Published: a live retained request keeps its flag: never executed.
                options = SubscribeOptions(qos=1, retainAsPublished=True)
                v5_topics.append((self.subscription, options))
            v5_topics += [(f, SubscribeOptions(qos=q)) for f, q in self.extra_subscriptions]
            _rc, mid = client.subscribe(v5_topics)
        else:
            requests = [(self.subscription, 1)] if self.subscription is not None else []
            _rc, mid = client.subscribe([*requests, *self.extra_subscriptions])
        self._sub_mid = mid
        await asyncio.wait_for(self._suback, timeout=15)

    async def _check_shared(self, client: paho.Client) -> None:
        """Raise SharedUnavailable when the requests' `$share` filter would receive nothing: the
        CONNACK says so (MQTT 5), or a probe through a `$share` filter of the same group does not
        come back (MQTT 3.1.1 brokers accept such a SUBSCRIBE and then deliver nothing)."""
        if self.subscription is None or not self.subscription.startswith("$share/"):
            return
        if self.grants.shared_available is False:
            self._refuse_shared("has no shared subscriptions (its CONNACK says so)")
        if self.grants.shared_available is not None or self.shared_probe is None:
            return
        group = self.subscription.split("/", 2)[1]
        probe_filter = f"$share/{group}/{self.shared_probe}"
        arrived: asyncio.Future[None] = self._loop.create_future()
        self._probe = (self.shared_probe, arrived)
        try:
            await self._probe_shared(probe_filter, arrived)
        except ConnectionLost:
            self._refuse_shared("closed the connection on a $share subscription")
        finally:
            self._probe = None
            if self._has_socket():
                client.unsubscribe(probe_filter)
        self.log.debug("shared subscriptions checked", probe=self.shared_probe)

    def _has_socket(self) -> bool:
        """Whether the client has a socket (an UNSUBSCRIBE can go out)."""
        return self._client.socket() is not None

    async def _probe_shared(self, probe_filter: str, arrived: asyncio.Future[None]) -> None:
        """SUBSCRIBE the probe filter, publish the probe, wait for it to come back."""
        assert self.shared_probe is not None
        reasons = await self.subscribe_now([(probe_filter, 1)])
        if not reasons or reasons[0].is_failure:
            self._refuse_shared(f"refused a $share subscription ({reasons})")
        await asyncio.wait_for(self.publish(self.shared_probe, b"probe"), timeout=15)
        try:
            await asyncio.wait_for(asyncio.shield(arrived), SHARED_PROBE_SECONDS)
        except TimeoutError:
            self._refuse_shared(
                f"accepted a $share subscription but delivered nothing through it within "
                f"{SHARED_PROBE_SECONDS:g} s (probe on {self.shared_probe}; "
                "[mqtt] shared_group_check = false skips this check)"
            )

    def _refuse_shared(self, why: str) -> None:
        raise SharedUnavailable(SHARED_REFUSAL.format(broker=self.describe(), why=why))

    def _switch_protocol(self) -> None:
        """In `auto` mode flip between MQTT 5 and 3.1.1 after a failure before CONNACK."""
        self.protocol = (
            MQTTProtocolVersion.MQTTv311
            if self.protocol == MQTTProtocolVersion.MQTTv5
            else MQTTProtocolVersion.MQTTv5
        )
        self._drop_socket()
        self._client = self._make_client()
        self._ever_connected = False

    def retry_with_other_protocol(self, exc: Exception) -> bool:
        """In `auto` mode, switch between MQTT 5 and 3.1.1 when `exc` says the broker wants the
        other one: an Unsupported Protocol Version CONNACK, or a close before any CONNACK."""
        if self._protocol_mode != "auto":
            return False
        refused = isinstance(exc, ConnectRefused) and exc.code == UNSUPPORTED_PROTOCOL
        closed_early = (
            isinstance(exc, ConnectionLost) and self._connack is not None and not self._connack_ok()
        )
        if refused or closed_early:
            self._switch_protocol()
            return True
        return False

    def reset(self) -> None:
        """Drop the socket of a failed or lost connection (and a failed TLS handshake's)."""
        self.connected.clear()
        self._acking = False
        self._drop_socket()
        compat.close_failed_tls_socket(self._tls_context, self._client)

    def _connack_ok(self) -> bool:
        fut = self._connack
        return fut is not None and fut.done() and not fut.cancelled() and fut.exception() is None

    def _drop_socket(self) -> None:
        sock = self._client.socket()
        if sock is not None:
            self._remove_fd(sock)
            compat.close_socket(self._client)

    async def _misc_loop(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            try:
                self._client.loop_misc()
            except Exception as exc:  # noqa: BLE001  (a broken socket, however it fails, is a loss)
                self.log.debug("mqtt keepalive check failed", error=type(exc).__name__)
                self._connection_lost()
