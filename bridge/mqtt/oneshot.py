"""One request over a short-lived MQTT connection, for the command line (blocking; paho's thread).

It waits for a bridge's retained `online` state, publishes the request once, and hands every
reply-topic message to `feed` until `feed` returns a result or the time is up.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from paho.mqtt.enums import MQTTProtocolVersion

from bridge.config import MqttConfig
from bridge.jsoncodec import loads
from bridge.mqtt.client import new_client
from bridge.neterrors import connection_cause

T = TypeVar("T")


class BrokerUnreachable(Exception):
    """The broker could not be reached; the message is the cause in words."""


@dataclass
class Exchange(Generic[T]):
    """How one exchange ended: a refusal, no bridge online, a result, or none in time."""

    refused: str | None = None
    """The broker refused the connection (its reason)."""
    online: bool = False
    """A bridge said `online` and the request was published."""
    result: T | None = None
    states: dict[str, str] = field(default_factory=dict)
    """The last state seen of each bridge instance on the prefix."""


def request_reply(
    config: MqttConfig,
    *,
    host: str,
    state_prefix: str,
    instance: str,
    subscriptions: Sequence[str],
    request_topic: str,
    payload: bytes,
    feed: Callable[[str, bytes], T | None],
    presence_wait: float,
    timeout: float,
) -> Exchange[T]:
    """Publish `payload` once a bridge under `state_prefix` is online; feed the replies.

    The state is watched on `<state_prefix>+/state` and on `instance`'s exact state topic: some
    brokers (RabbitMQ) send retained messages only to exact-topic subscriptions.

    Raises BrokerUnreachable when the broker cannot be reached.
    """
    outcome: Exchange[T] = Exchange()
    done = threading.Event()
    online = threading.Event()
    state_filter = f"{state_prefix}+/state"

    def on_connect(client: Any, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        if reason.is_failure:
            outcome.refused = f"broker refused the connection: {reason}"
            done.set()
            online.set()
            return
        states = [(state_filter, 1), (f"{state_prefix}{instance}/state", 1)]
        client.subscribe([(topic, 1) for topic in subscriptions] + states)

    def on_message(client: Any, userdata: Any, msg: Any) -> None:
        topic = msg.topic
        if topic.startswith(state_prefix) and topic.endswith("/state"):
            on_state(client, topic[len(state_prefix) : -len("/state")], bytes(msg.payload))
        elif outcome.result is None:
            outcome.result = feed(topic, bytes(msg.payload))
            if outcome.result is not None:
                done.set()

    def on_state(client: Any, instance: str, body: bytes) -> None:
        try:
            state = loads(body) if body else {}
        except ValueError:
            return
        if not isinstance(state, dict):
            return
        outcome.states[instance] = str(state.get("state"))
        if state.get("state") == "online" and not online.is_set():
            online.set()
            outcome.online = True
            client.publish(request_topic, payload, qos=1)

    client, _ = new_client(
        config, protocol=MQTTProtocolVersion.MQTTv311, client_id="", persistent=False
    )
    client.on_connect = on_connect
    client.on_message = on_message
    _start(client, host, config.port)
    try:
        if online.wait(min(presence_wait, timeout)) and outcome.refused is None:
            done.wait(timeout)
    finally:
        client.disconnect()
        client.loop_stop()
    return outcome


def subscribed_exchange(
    config: MqttConfig,
    *,
    host: str,
    subscriptions: Sequence[str],
    start: Callable[[Callable[[str, bytes], None]], None],
    feed: Callable[[str, bytes], T | None],
    timeout: float,
) -> T | None:
    """Subscribe, then run `start(publish)` on a thread of its own (it may block and publish at
    QoS 1, each publish waited for), handing every message to `feed` until it returns a result
    or `timeout` passes; the result or None.

    Raises BrokerUnreachable when the broker cannot be reached or refuses the connection.
    """
    result: list[T] = []
    done = threading.Event()
    ready = threading.Event()
    refused: list[str] = []

    def on_connect(client: Any, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        if reason.is_failure:
            refused.append(f"broker refused the connection: {reason}")
            ready.set()
            done.set()
            return
        client.subscribe([(topic, 1) for topic in subscriptions])

    def on_subscribe(client: Any, userdata: Any, mid: Any, reasons: Any, props: Any) -> None:
        ready.set()

    def on_message(client: Any, userdata: Any, msg: Any) -> None:
        if not done.is_set():
            got = feed(msg.topic, bytes(msg.payload))
            if got is not None:
                result.append(got)
                done.set()

    client, _ = new_client(
        config, protocol=MQTTProtocolVersion.MQTTv311, client_id="", persistent=False
    )
    client.on_connect = on_connect
    client.on_subscribe = on_subscribe
    client.on_message = on_message

    def publish(topic: str, payload: bytes) -> None:
        client.publish(topic, payload, qos=1).wait_for_publish(timeout)

    _start(client, host, config.port)
    try:
        if ready.wait(timeout) and not refused:
            threading.Thread(target=start, args=(publish,), daemon=True).start()
            done.wait(timeout)
    finally:
        client.disconnect()
        client.loop_stop()
    if refused:
        raise BrokerUnreachable(refused[0])
    return result[0] if result else None


def _start(client: Any, host: str, port: int) -> None:
    """Connect and start paho's network thread; BrokerUnreachable when the broker is not there."""
    try:
        client.connect(host, port, keepalive=30)
    except OSError as exc:
        raise BrokerUnreachable(connection_cause(exc)) from None
    client.loop_start()
