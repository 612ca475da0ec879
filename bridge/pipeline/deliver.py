"""The deliver stage: redact, check the size, publish, acknowledge, remember, count and log.

A request is acknowledged only after its reply was published and the broker took it (PUBACK),
so a request whose reply never went out is redelivered. A detached wait's reply has no request
left to acknowledge (it was acknowledged once its job was journaled): it is only published. A
chunked raw reply (`_bridge` `chunk_bytes`) publishes its chunks on `<reply topic>/<n>` first
and its end message last.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from bridge.jsoncodec import dumps
from bridge.messages import InboundMessage, Publisher, PublishFailed
from bridge.methods.jobs import job_kind
from bridge.pipeline import render
from bridge.pipeline.decide import Route
from bridge.pipeline.dedup import ReplyCache
from bridge.pipeline.model import MISSING, JournalLike
from bridge.pipeline.replyformat import chunk_topic
from bridge.pipeline.stats import Stats
from bridge.redact import Redactor

if TYPE_CHECKING:
    from structlog.typing import FilteringBoundLogger

_LOG_TEXT_LIMIT = 120
_LOG_MESSAGE_LIMIT = 300
_MAX_UNACKED_CHUNKS = 256
"""Chunks of a raw reply published before waiting for the broker (bounds what is queued)."""


def log_transaction(value: Any) -> Any:
    """A transaction as the request line shows it: scalars as they are, at most 120 characters."""
    if value is MISSING:
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
    log: FilteringBoundLogger
    journal: JournalLike | None = None
    """Where upstream answers are committed before their reply is published (None: nowhere)."""

    def drop(self, message: InboundMessage) -> None:
        """Acknowledge a message that gets no reply (it would fail the same way again)."""
        self.publisher.ack(message)

    async def replay(
        self,
        message: InboundMessage,
        route: Route,
        payload: bytes,
        content_type: str | None = None,
        source: str = "cache",
        transaction: Any = MISSING,
    ) -> None:
        """Answer a repeated request with the reply it got before (from the cache or journal)."""
        await self._send(message, route, payload, content_type)
        status = "journaled" if source == "journal" else "cached"
        self.log.info(
            "request",
            method=route.topic.method[:100],
            suffix=route.topic.suffix[:100],
            transaction=log_transaction(transaction),
            status=status,
            dup=message.dup,
        )

    async def deliver(
        self, message: InboundMessage, route: Route, outcome: render.Outcome, key: bytes | None
    ) -> render.Outcome:
        """Publish `outcome` (an error reply instead when too large), ack, remember it; as sent."""
        outcome, _ = await self._deliver(message, route, outcome, key)
        return outcome

    async def deliver_detached(
        self, route: Route, outcome: render.Outcome, key: bytes
    ) -> tuple[render.Outcome, bool | None]:
        """Publish a detached wait's reply as `deliver` does, without a request to acknowledge;
        the outcome as sent, and True when published, False when the broker refused it (it
        would refuse again), None when it could not go out now."""
        return await self._deliver(None, route, outcome, key)

    async def publish_journaled(
        self, route: Route, payload: bytes, content_type: str | None
    ) -> bool | None:
        """Publish a reply journaled before a crash cut its delivery short (as `_publish`)."""
        return await self._publish(route, payload, content_type)

    async def _deliver(
        self,
        message: InboundMessage | None,
        route: Route,
        outcome: render.Outcome,
        key: bytes | None,
    ) -> tuple[render.Outcome, bool | None]:
        payload = self.redactor.data(outcome.payload)
        largest = max((len(chunk) for chunk in outcome.chunks), default=0)
        last_chunk = chunk_topic(route.reply_topic, max(len(outcome.chunks) - 1, 0))
        if not self.publisher.fits(route.reply_topic, len(payload)) or (
            outcome.chunks and not self.publisher.fits(last_chunk, largest)
        ):
            outcome = render.too_large(outcome, max(len(payload), largest))
            payload = outcome.payload
        outcome.payload = payload
        chunked = bool(outcome.chunks)
        if key is not None and outcome.error is None and not chunked:
            # Committed before the reply goes out: from here on a crash is answered from disk.
            await self._journal(key, route, outcome.method, payload, outcome.content_type)
        sent: bool | None = await self._send_chunks(message, route, outcome) if chunked else True
        outcome.chunks = ()  # published: drop them
        if sent:
            sent = await self._publish(route, payload, outcome.content_type)
            if message is not None and sent is not None:
                # Refused by the broker (e.g. an ACL): redelivery would fail the same way.
                self.publisher.ack(message)
        error = outcome.error
        # A chunked reply is not remembered (the cache keeps one message per request): a
        # redelivered chunked request is answered by calling the service host again.
        if sent and key is not None and (error is None or not error.is_retryable) and not chunked:
            self.cache.put(key, route.reply_topic, payload, outcome.content_type)
        return outcome, sent

    async def _journal(
        self, key: bytes, route: Route, method: str, payload: bytes, content_type: str | None
    ) -> None:
        journal = self.journal
        if journal is None or (journal.scope == "jobs" and job_kind(method) is None):
            return
        await journal.record_answer(key, route.reply_topic, payload, content_type)

    def account(
        self,
        message: InboundMessage | None,
        route: Route,
        outcome: render.Outcome,
        elapsed_ms: float,
    ) -> None:
        """Count the answered request and write its one log line."""
        error = outcome.error
        self.stats.count(error, elapsed_ms)
        if error is None and not self.log.is_enabled_for(logging.INFO):
            return  # below the configured level: the line would be built only to be dropped
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
            "dup": (message is not None and message.dup) or None,
            "message": error.message[:_LOG_MESSAGE_LIMIT] if error else None,
        }
        # An error is worth a look: a warning, with what the reply told the device.
        log = self.log.warning if error else self.log.info
        log("request", **{k: v for k, v in fields.items() if v is not None})

    async def _send_chunks(
        self, message: InboundMessage | None, route: Route, outcome: render.Outcome
    ) -> bool | None:
        """Publish the chunks of a raw reply in order, wait for their PUBACKs; False on failure."""
        pending: list[asyncio.Future[None]] = []
        try:
            for n, chunk in enumerate(outcome.chunks):
                pending.append(
                    self.publisher.publish(
                        chunk_topic(route.reply_topic, n),
                        chunk,
                        correlation_data=route.correlation,
                        content_type=outcome.chunk_type,
                    )
                )
                if len(pending) >= _MAX_UNACKED_CHUNKS:
                    await asyncio.gather(*pending)
                    pending.clear()
            await asyncio.gather(*pending)
        except PublishFailed as exc:
            for future in pending:
                if future.done() and not future.cancelled():
                    future.exception()  # retrieved: the first failure is the one reported
            topic = chunk_topic(route.reply_topic, 0)
            self.log.error("reply not published", topic=topic[:200], error=str(exc)[:300])
            if exc.retry_later:
                return None
            if message is not None:
                self.publisher.ack(message)
            return False
        return True

    async def _send(
        self,
        message: InboundMessage,
        route: Route,
        payload: bytes,
        content_type: str | None = None,
    ) -> bool:
        """Publish the reply, wait for PUBACK, then ack the request; False when not published."""
        sent = await self._publish(route, payload, content_type)
        if sent is not None:
            # Refused by the broker (e.g. an ACL): redelivery would fail the same way.
            self.publisher.ack(message)
        return bool(sent)

    async def _publish(
        self, route: Route, payload: bytes, content_type: str | None = None
    ) -> bool | None:
        """Publish the reply and wait for PUBACK: True, False when the broker refused it, None
        when it could not go out now (a local, passing failure)."""
        topic = route.reply_topic
        try:
            await self.publisher.publish(
                topic, payload, correlation_data=route.correlation, content_type=content_type
            )
        except PublishFailed as exc:
            self.log.error("reply not published", topic=topic[:200], error=str(exc)[:300])
            return None if exc.retry_later else False
        return True
