"""Reading topics for tools: a retained state, or the next message after an action.

A connection of its own (client id `<bridge client id>-tools`, MQTT 3.1.1, clean session, run by
paho's thread) so that tool subscriptions never mix with the request subscription and its
manual acknowledgements. Each read subscribes anew: a broker sends the retained message on
every SUBSCRIBE, also when the filter is already subscribed.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

from paho.mqtt.enums import MQTTProtocolVersion

from bridge.backoff import Backoff
from bridge.config import MqttConfig
from bridge.mqtt.client import new_client


class TopicWatcher:
    """Implements the tool runner's TopicReader over its own broker connection."""

    def __init__(self, config: MqttConfig, client_id: str) -> None:
        self._config = config
        self._client, _ = new_client(
            config, protocol=MQTTProtocolVersion.MQTTv311, client_id=client_id, persistent=False
        )
        self._client.on_connect = self._on_connect
        self._client.on_disconnect = self._on_disconnect
        self._client.on_message = self._on_message
        self._client.on_subscribe = self._on_subscribe
        self._lock = threading.Lock()
        self._waiters: dict[str, list[tuple[bool, asyncio.Future[bytes]]]] = {}
        """Topic -> (wants the retained copy, future of the message)."""
        self._followers: dict[str, list[Callable[[str, bytes], None]]] = {}
        """Topic -> what each live message on it is handed to (`following`)."""
        self._subacks: dict[int, asyncio.Future[None]] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self.connected = asyncio.Event()
        self._closing = False
        self._reconnect: asyncio.Task[None] | None = None

    async def start(self, seconds: float = 10.0) -> None:
        """Connect and wait for the CONNACK (raises TimeoutError or OSError)."""
        self._loop = asyncio.get_running_loop()
        await asyncio.to_thread(
            self._client.connect, self._config.host, self._config.port, self._config.keepalive
        )
        self._client.loop_start()
        async with asyncio.timeout(seconds):
            await self.connected.wait()

    async def close(self) -> None:
        """Disconnect and stop paho's thread."""
        self._closing = True
        if self._reconnect is not None:
            self._reconnect.cancel()
        with contextlib.suppress(Exception):
            self._client.disconnect()
        await asyncio.to_thread(self._client.loop_stop)

    async def retained(self, topic: str, seconds: float) -> bytes | None:
        """The retained message of `topic`, None when there is none within `seconds`."""
        return await self._await(topic, seconds, True, None)

    async def next_after(
        self, topic: str, seconds: float, action: Callable[[], asyncio.Future[None]]
    ) -> bytes | None:
        """Subscribe to `topic`, run `action`, return the next live message or None."""
        return await self._await(topic, seconds, False, action)

    @contextlib.asynccontextmanager
    async def following(
        self, topics: Sequence[str], deliver: Callable[[str, bytes], None], seconds: float
    ) -> AsyncIterator[None]:
        """Inside, every live message on `topics` (exact names) goes to `deliver(topic, payload)`
        on the loop, in the order received; subscribed (SUBACK) before the body runs.

        Raises TimeoutError when not connected and subscribed within `seconds`.
        """
        loop = asyncio.get_running_loop()
        with self._lock:
            for topic in topics:
                self._followers.setdefault(topic, []).append(deliver)
        try:
            async with asyncio.timeout(seconds):
                await self.connected.wait()
                suback: asyncio.Future[None] = loop.create_future()
                with self._lock:
                    _, mid = self._client.subscribe([(topic, 1) for topic in topics])
                    if mid is None:
                        raise TimeoutError("not connected")
                    self._subacks[mid] = suback
                await suback
            yield
        finally:
            with self._lock:
                gone = []
                for topic in topics:
                    delivering = self._followers.get(topic, [])
                    if deliver in delivering:
                        delivering.remove(deliver)
                    if not delivering and not self._waiters.get(topic):
                        self._followers.pop(topic, None)
                        gone.append(topic)
                if gone:
                    with contextlib.suppress(Exception):
                        self._client.unsubscribe(gone)

    async def _await(
        self,
        topic: str,
        seconds: float,
        retained: bool,
        action: Callable[[], asyncio.Future[None]] | None,
    ) -> bytes | None:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[bytes] = loop.create_future()
        entry = (retained, future)
        with self._lock:
            self._waiters.setdefault(topic, []).append(entry)
        try:
            async with asyncio.timeout(seconds):
                await self.connected.wait()
                suback: asyncio.Future[None] = loop.create_future()
                with self._lock:
                    _, mid = self._client.subscribe(topic, qos=1)
                    if mid is None:
                        return None
                    self._subacks[mid] = suback
                await suback
                if action is not None:
                    await action()
                return await future
        except TimeoutError:
            return None
        finally:
            with self._lock:
                waiting = self._waiters.get(topic, [])
                if entry in waiting:
                    waiting.remove(entry)
                if not waiting:
                    self._waiters.pop(topic, None)
                if not waiting and not self._followers.get(topic):
                    with contextlib.suppress(Exception):
                        self._client.unsubscribe(topic)

    # --- paho's thread ----------------------------------------------------------------------------

    def _call(self, fn: Callable[..., Any], *args: Any) -> None:
        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(fn, *args)

    def _on_connect(self, client: Any, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        if not reason.is_failure:
            self._call(self.connected.set)

    def _on_disconnect(
        self, client: Any, userdata: Any, flags: Any, reason: Any, props: Any
    ) -> None:
        self._call(self._lost)

    def _lost(self) -> None:
        self.connected.clear()
        if not self._closing and (self._reconnect is None or self._reconnect.done()):
            self._reconnect = asyncio.get_running_loop().create_task(self._reconnect_loop())

    async def _reconnect_loop(self) -> None:
        backoff = Backoff(self._config.reconnect_min, self._config.reconnect_max)
        while not self._closing and not self.connected.is_set():
            await asyncio.sleep(backoff.next_delay())
            with contextlib.suppress(OSError):
                await asyncio.to_thread(self._client.reconnect)

    def _on_subscribe(self, client: Any, userdata: Any, mid: int, reasons: Any, props: Any) -> None:
        with self._lock:
            future = self._subacks.pop(mid, None)
        if future is not None:
            self._call(_settle, future, None)

    def _on_message(self, client: Any, userdata: Any, message: Any) -> None:
        with self._lock:
            waiting = list(self._waiters.get(message.topic, ()))
            following = list(self._followers.get(message.topic, ()))
        for wants_retained, future in waiting:
            if wants_retained or not message.retain:
                self._call(_settle, future, bytes(message.payload))
        if not message.retain:
            for deliver in following:
                self._call(deliver, message.topic, bytes(message.payload))


def _settle(future: asyncio.Future[Any], value: Any) -> None:
    if not future.done():
        future.set_result(value)
