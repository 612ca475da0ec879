"""Stream sinks: forward each server-sent event to the stream topic and assemble the final reply."""

from __future__ import annotations

import asyncio
from typing import Any, Protocol

from bridge import envelope
from bridge.errors import ReplyTooLarge
from bridge.jsoncodec import dumps, loads
from bridge.logs import REDACTOR
from bridge.operations import Operation
from bridge.sse import SseEvent, assembler_for, is_done

# Events published but not yet acknowledged before we wait for the broker (bounds memory).
_MAX_UNACKED_EVENTS = 256


class StreamPublisher(Protocol):
    """The publish half of the MQTT transport (MqttTransport implements it)."""

    def publish(
        self,
        topic: str,
        payload: bytes,
        *,
        retain: bool = False,
        qos: int = 1,
        correlation_data: bytes | None = None,
    ) -> asyncio.Future[None]:
        """Queue a publish; the future completes on the broker's PUBACK."""

    def fits(self, topic: str, payload_size: int) -> bool:
        """Whether the broker accepts a packet this large."""


def _event_data(event: SseEvent) -> Any:
    try:
        return loads(event.data.encode("utf-8"))
    except ValueError:
        return event.data


class TopicStreamSink:
    """Publishes `{"transaction"?, "seq", "event", "data"}` per event, in order, then assembles."""

    def __init__(
        self,
        op: Operation,
        publisher: StreamPublisher,
        topic: str,
        transaction: Any,
        correlation_data: bytes | None,
    ) -> None:
        self.op = op
        self.publisher = publisher
        self.topic = topic
        self.correlation_data = correlation_data
        self.seq = 0
        self._pending: list[asyncio.Future[None]] = []
        self._assembler = assembler_for(op.name)
        head = b'{"seq":'
        if transaction is not envelope.MISSING:
            head = b'{"transaction":' + dumps(transaction) + b',"seq":'
        self._head = head

    async def on_event(self, event: SseEvent) -> None:
        """Publish one event (not `[DONE]`) and feed it to the assembler (raising on errors)."""
        if not is_done(event):
            payload = b"".join(
                (
                    self._head,
                    str(self.seq).encode(),
                    b',"event":',
                    dumps(event.event),
                    b',"data":',
                    dumps(_event_data(event)),
                    b"}",
                )
            )
            payload = REDACTOR.data(payload)
            if not self.publisher.fits(self.topic, len(payload)):
                # A packet over the broker's maximum would get the connection closed.
                raise ReplyTooLarge(
                    f"stream event {self.seq} ({len(payload)} bytes) exceeds the broker's "
                    "maximum packet size"
                )
            self.seq += 1
            self._pending.append(
                self.publisher.publish(self.topic, payload, correlation_data=self.correlation_data)
            )
            if len(self._pending) >= _MAX_UNACKED_EVENTS:
                await self.flushed()
        self._assembler.feed(event)

    async def flushed(self) -> None:
        """Wait until the broker acknowledged every event published so far."""
        pending, self._pending = self._pending, []
        if pending:
            await asyncio.gather(*pending)

    def finish(self) -> Any:
        """The final reply data; raises StreamInterrupted when the stream ended early."""
        return self._assembler.result()


def make_sink(
    op: Operation,
    publisher: StreamPublisher,
    topic: str,
    transaction: Any,
    correlation_data: bytes | None,
) -> TopicStreamSink:
    """The sink for a streamed call of `op`, publishing to `topic`."""
    return TopicStreamSink(op, publisher, topic, transaction, correlation_data)
