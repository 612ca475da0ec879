"""In-memory stand-ins for the MQTT transport and the logger, for the pipeline's unit tests."""

from __future__ import annotations

import asyncio
from typing import Any

from bridge.messages import InboundMessage, PublishFailed


class FakePublisher:
    """Records publishes and acks; every publish succeeds at once unless `fail` is set."""

    def __init__(self, max_size: int = 1 << 20) -> None:
        self.max_size = max_size
        self.published: list[tuple[str, bytes, bytes | None]] = []
        self.acked: list[int] = []
        self.fail: PublishFailed | None = None

    def publish(self, topic: str, payload: bytes, **options: Any) -> asyncio.Future[None]:
        """Record the publish; the future is already done (PUBACK at once, or `fail`)."""
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if self.fail is not None:
            future.set_exception(self.fail)
        else:
            self.published.append((topic, payload, options.get("correlation_data")))
            future.set_result(None)
        return future

    def fits(self, topic: str, payload_size: int) -> bool:
        """Whether `payload_size` is within `max_size`."""
        return payload_size <= self.max_size

    def ack(self, message: InboundMessage) -> None:
        """Record the acknowledged message id."""
        self.acked.append(message.mid)


class FakeLog:
    """Records (level, event, fields) for each call, like a structlog bound logger."""

    def __init__(self) -> None:
        self.lines: list[tuple[str, str, dict[str, Any]]] = []

    def _record(self, level: str, event: str, **fields: Any) -> None:
        self.lines.append((level, event, fields))

    def debug(self, event: str, **fields: Any) -> None:
        """Record a debug line."""
        self._record("debug", event, **fields)

    def info(self, event: str, **fields: Any) -> None:
        """Record an info line."""
        self._record("info", event, **fields)

    def warning(self, event: str, **fields: Any) -> None:
        """Record a warning line."""
        self._record("warning", event, **fields)

    def error(self, event: str, **fields: Any) -> None:
        """Record an error line."""
        self._record("error", event, **fields)

    def exception(self, event: str, **fields: Any) -> None:
        """Record an exception line."""
        self._record("exception", event, **fields)


def message(
    topic: str,
    payload: bytes,
    *,
    mid: int = 1,
    dup: bool = False,
    response_topic: str | None = None,
    correlation_data: bytes | None = None,
) -> InboundMessage:
    """A QoS 1 request message as the transport hands it over."""
    return InboundMessage(
        topic=topic,
        payload=payload,
        qos=1,
        retain=False,
        dup=dup,
        mid=mid,
        generation=1,
        response_topic=response_topic,
        correlation_data=correlation_data,
    )
