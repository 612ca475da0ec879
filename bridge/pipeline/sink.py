"""The stream sink: forward each server-sent event to the stream topic and assemble the final reply.

The sink is the deliver stage of a stream's events. It never raises into the HTTP read loop that
feeds it: an event the broker would refuse stops the sink (`stopped`), and `finish()`, called
when the answer is rendered, raises the reason.
"""

from __future__ import annotations

import asyncio
from typing import Any

from bridge.errors import BridgeError, ReplyTooLarge
from bridge.jsoncodec import loads
from bridge.messages import StreamPublisher
from bridge.pipeline.options import DEFAULT_OPTIONS, ReplyOptions
from bridge.pipeline.render import StreamFramer
from bridge.pipeline.replyformat import PLAIN_TYPE, plain_stream_payloads
from bridge.redact import Redactor, StreamScrubber
from bridge.service.sse import SseEvent, assembler_for, is_done

# Events published but not yet acknowledged before we wait for the broker (bounds memory).
_MAX_UNACKED_EVENTS = 256


def _event_data(event: SseEvent) -> Any:
    try:
        return loads(event.data.encode("utf-8"))
    except ValueError:
        return event.data


class TopicStreamSink:
    """Publishes `{"transaction"?, "seq", "event", "data"}` per event, in order, then assembles.

    In the plain format (`_bridge.format`) each message is instead the answer text the event
    adds, split to fit `max_bytes`; events that add no text publish nothing.
    """

    def __init__(
        self,
        method: str,
        publisher: StreamPublisher,
        topic: str,
        transaction: Any,
        correlation_data: bytes | None,
        redactor: Redactor,
        options: ReplyOptions = DEFAULT_OPTIONS,
    ) -> None:
        self.publisher = publisher
        self.options = options
        self.topic = topic
        self.correlation_data = correlation_data
        self.redactor = redactor
        self._scrubber = StreamScrubber(redactor)
        self.seq = 0
        self._failure: BridgeError | None = None
        self._pending: list[asyncio.Future[None]] = []
        self._assembler = assembler_for(method)
        self._framer = StreamFramer(transaction)

    @property
    def forwarded(self) -> bool:
        """Whether an event has been published (the request must then not be sent again)."""
        return self.seq > 0

    @property
    def stopped(self) -> bool:
        """Whether the sink refused an event and takes no more (`finish()` raises why)."""
        return self._failure is not None

    async def on_event(self, event: SseEvent) -> None:
        """Publish one event (not `[DONE]`) and feed it to the assembler; no-op once stopped."""
        if self._failure is not None:
            return
        if self.options.format == "plain":
            if not is_done(event):
                # Redacted before it is cut into pieces of max_bytes, not piece by piece.
                data = self._scrubber.any(_event_data(event))
                for text in plain_stream_payloads(event.event, data, self.options.max_bytes):
                    if not await self._publish(self.redactor.data(text), PLAIN_TYPE):
                        return
        elif not is_done(event):
            data = self._scrubber.any(_event_data(event))
            payload = self._framer.frame(self.seq, event.event, data)
            if not await self._publish(self.redactor.data(payload), None):
                return
        self._assembler.feed(event)

    async def _publish(self, payload: bytes, content_type: str | None) -> bool:
        """Publish one stream message; False (the sink stopped) when the broker would refuse it."""
        if not self.publisher.fits(self.topic, len(payload)):
            # A packet over the broker's maximum would get the connection closed.
            self._failure = ReplyTooLarge(
                f"stream event {self.seq} ({len(payload)} bytes) exceeds the broker's "
                "maximum packet size"
            )
            return False
        self.seq += 1
        self._pending.append(
            self.publisher.publish(
                self.topic,
                payload,
                correlation_data=self.correlation_data,
                content_type=content_type,
            )
        )
        if len(self._pending) >= _MAX_UNACKED_EVENTS:
            await self.flushed()
        return True

    async def flushed(self) -> None:
        """Wait until the broker acknowledged every event published so far."""
        pending, self._pending = self._pending, []
        if pending:
            await asyncio.gather(*pending)

    def finish(self) -> Any:
        """The final reply data, redacted (a select may transform it next); raises why the sink
        stopped, or StreamInterrupted if cut short."""
        if self._failure is not None:
            raise self._failure
        return self.redactor.any(self._assembler.result())
