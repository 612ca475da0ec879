"""The deliver stage: redact, check the size, publish, acknowledge, remember, count and log.

A request is acknowledged only after its reply was published and the broker took it (PUBACK),
so a request whose reply never went out is redelivered.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from bridge import render
from bridge.decide import Route
from bridge.dedup import ReplyCache
from bridge.errors import ReplyTooLarge
from bridge.jsoncodec import dumps
from bridge.mqtt import InboundMessage, PublishFailed
from bridge.redact import Redactor
from bridge.stats import Stats
from bridge.streaming import StreamPublisher

_LOG_TEXT_LIMIT = 120


class Publisher(StreamPublisher, Protocol):
    """What delivery needs from the MQTT transport: publishing, plus acknowledging."""

    def ack(self, message: InboundMessage) -> None:
        """Acknowledge a request message."""


def log_transaction(value: Any) -> Any:
    """A transaction as the request line shows it: scalars as they are, at most 120 characters."""
    if value is render.MISSING:
        return None
    if isinstance(value, str | int | float | bool) or value is None:
        if not isinstance(value, str) or len(value) <= _LOG_TEXT_LIMIT:
            return value
        return value[:_LOG_TEXT_LIMIT] + "..."
    text = dumps(value).decode("utf-8", "replace")
    return text if len(text) <= _LOG_TEXT_LIMIT else text[:_LOG_TEXT_LIMIT] + "..."


@dataclass(slots=True)
class Deliverer:
    """Publishes replies and acknowledges their requests; keeps the reply cache and the stats."""

    publisher: Publisher
    cache: ReplyCache
    stats: Stats
    redactor: Redactor
    log: Any

    def drop(self, message: InboundMessage) -> None:
        """Acknowledge a message that gets no reply (it would fail the same way again)."""
        self.publisher.ack(message)

    async def replay(self, message: InboundMessage, route: Route, payload: bytes) -> None:
        """Answer a repeated request with the reply it got before."""
        await self._send(message, route, payload)
        self.log.info("request", method=route.topic.method[:100], status="cached", dup=message.dup)

    async def deliver(
        self, message: InboundMessage, route: Route, outcome: render.Outcome, key: int | None
    ) -> render.Outcome:
        """Publish `outcome` (an error reply instead when too large), ack, remember it; as sent."""
        payload = self.redactor.data(outcome.payload)
        if not self.publisher.fits(route.reply_topic, len(payload)):
            too_large = ReplyTooLarge(
                f"the reply ({len(payload)} bytes) exceeds the broker's maximum packet size"
            )
            replaced = render.failure(outcome.method, outcome.transaction, too_large)
            replaced.request_id, replaced.attempts = outcome.request_id, outcome.attempts
            outcome, payload = replaced, replaced.payload
        outcome.payload = payload
        sent = await self._send(message, route, payload)
        error = outcome.error
        if sent and key is not None and (error is None or not error.is_retryable):
            self.cache.put(key, route.reply_topic, payload)
        return outcome

    def account(
        self, message: InboundMessage, route: Route, outcome: render.Outcome, elapsed_ms: float
    ) -> None:
        """Count the answered request and write its one log line."""
        error = outcome.error
        self.stats.count(error, elapsed_ms)
        fields: dict[str, Any] = {
            "method": outcome.method[:100],
            "suffix": route.topic.suffix[:100],
            "transaction": log_transaction(outcome.transaction),
            "status": "error" if error else "ok",
            "code": error.code if error else None,
            "http_status": outcome.http_status,
            "request_id": outcome.request_id,
            "attempts": outcome.attempts or None,
            "duration_ms": elapsed_ms,
            "dup": message.dup or None,
        }
        self.log.info("request", **{k: v for k, v in fields.items() if v is not None})

    async def _send(self, message: InboundMessage, route: Route, payload: bytes) -> bool:
        """Publish the reply, wait for PUBACK, then ack the request; False when not published."""
        topic = route.reply_topic
        try:
            await self.publisher.publish(topic, payload, correlation_data=route.correlation)
        except PublishFailed as exc:
            self.log.error("reply not published", topic=topic[:200], error=str(exc)[:300])
            if not exc.retry_later:
                # The broker refused this reply (e.g. an ACL): redelivery would fail the same way.
                self.publisher.ack(message)
            return False
        self.publisher.ack(message)
        return True
