"""Stream sinks: forward each server-sent event to the stream topic and assemble the final reply."""

from __future__ import annotations

import asyncio
from typing import Any, Protocol

from bridge import envelope
from bridge.errors import StreamInterrupted
from bridge.jsoncodec import dumps, loads
from bridge.operations import Operation
from bridge.sse import ChatCompletionAssembler, ResponsesAssembler, SseEvent

CHAT_STREAMS = frozenset({"createChatCompletion"})
RESPONSES_STREAMS = frozenset({"createResponse", "beta_createResponse"})
RESPONSES_TERMINAL = frozenset({"response.completed", "response.failed", "response.incomplete"})


class StreamPublisher(Protocol):
    """The publish half of the MQTT transport."""

    def publish(
        self,
        topic: str,
        payload: bytes,
        *,
        retain: bool = False,
        qos: int = 1,
        correlation_data: bytes | None = None,
    ) -> asyncio.Future[None]:
        """Queue a QoS 1 publish."""


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
        self._last: Any = None
        self._terminal = False
        self._chat = ChatCompletionAssembler() if op.name in CHAT_STREAMS else None
        self._responses = ResponsesAssembler() if op.name in RESPONSES_STREAMS else None
        head = b'{"seq":'
        if transaction is not envelope.MISSING:
            head = b'{"transaction":' + dumps(transaction) + b',"seq":'
        self._head = head

    async def on_event(self, event: SseEvent) -> None:
        """Publish one event and feed it to the assembler (raising on an error event)."""
        data = _event_data(event)
        payload = b"".join(
            (
                self._head,
                str(self.seq).encode(),
                b',"event":',
                dumps(event.event),
                b',"data":',
                dumps(data),
                b"}",
            )
        )
        self.seq += 1
        self._pending.append(
            self.publisher.publish(self.topic, payload, correlation_data=self.correlation_data)
        )
        if len(self._pending) >= 256:
            await self.flushed()
        if event.event == "error" or (isinstance(data, dict) and "error" in data and self._chat):
            upstream = data.get("error", data) if isinstance(data, dict) else data
            raise StreamInterrupted("the service host reported an error mid-stream", upstream=upstream)
        if self._chat is not None and isinstance(data, dict):
            self._chat.add(data)
        elif self._responses is not None and isinstance(data, dict):
            name = event.event or str(data.get("type", ""))
            self._responses.add(name, data)
            if name in RESPONSES_TERMINAL:
                self._terminal = True
        self._last = data

    async def flushed(self) -> None:
        """Wait until the broker acknowledged every event published so far."""
        pending, self._pending = self._pending, []
        if pending:
            await asyncio.gather(*pending)

    def finish(self, saw_done: bool) -> Any:
        """The final reply data; raise StreamInterrupted when the stream ended early."""
        if self._chat is not None:
            if not saw_done:
                raise StreamInterrupted("the stream ended before [DONE]")
            return self._chat.result()
        if self._responses is not None:
            if not self._terminal:
                raise StreamInterrupted("the stream ended before the response completed")
            return self._responses.result()
        if self.seq == 0:
            raise StreamInterrupted("the stream ended without any event")
        return self._last


def make_sink(
    op: Operation,
    publisher: StreamPublisher,
    topic: str,
    transaction: Any,
    correlation_data: bytes | None,
) -> TopicStreamSink:
    """The sink for a streamed call of `op`, publishing to `topic`."""
    return TopicStreamSink(op, publisher, topic, transaction, correlation_data)
