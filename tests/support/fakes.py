"""In-memory stand-ins for the MQTT transport and the logger, for the pipeline's unit tests."""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import MutableMapping
from typing import Any, NoReturn, cast

import pytest
import structlog
from structlog.typing import FilteringBoundLogger

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
    """A real structlog logger (`bound`) whose lines are recorded as (level, event, fields)."""

    def __init__(self, level: int = logging.DEBUG) -> None:
        self.lines: list[tuple[str, str, dict[str, Any]]] = []
        self.bound = cast(
            FilteringBoundLogger,
            structlog.wrap_logger(
                None,
                processors=[self._record],
                wrapper_class=structlog.make_filtering_bound_logger(level),
            ),
        )

    def _record(self, logger: object, method: str, event: MutableMapping[str, Any]) -> NoReturn:
        fields = dict(event)
        self.lines.append((method, str(fields.pop("event")), fields))
        raise structlog.DropEvent


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


class RecordingLog:
    """A structlog-shaped logger that keeps (level, event, fields)."""

    def __init__(self) -> None:
        self.lines: list[tuple[str, str, dict[str, Any]]] = []

    def __getattr__(self, level: str) -> Any:
        def log(event: str, **fields: Any) -> None:
            self.lines.append((level, event, fields))

        return log

    def events(self, level: str | None = None) -> list[str]:
        return [e for lvl, e, _ in self.lines if level is None or lvl == level]


def random_binary(size: int) -> bytes:
    """Random bytes that are certainly not UTF-8 (a lone continuation byte, 0xff, 0xfe)."""
    data = b"\x80\xff\xfe\xc3" + os.urandom(size - 4)
    with pytest.raises(UnicodeDecodeError):
        data.decode("utf-8")
    return data
