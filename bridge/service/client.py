"""The execute stage: sends an `HttpRequest` to the service host, retrying, and reads the answer.

Retries with backoff for connection errors, timeouts, 429 and 5xx (honouring Retry-After), never for
other 4xx and never once a stream has started to be forwarded. The exchange itself goes through an
`HttpTransport` (bridge/service/transport.py; aiohttp's is bridge/service/aiohttp_transport.py).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol

import yarl

from bridge.backoff import Backoff, retry_after_seconds
from bridge.config import ServiceConfig
from bridge.errors import (
    RETRYABLE_STATUSES,
    AnswerTooLarge,
    BadRedirect,
    BridgeError,
    StreamInterrupted,
    UpstreamBadResponse,
    UpstreamError,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from bridge.jsoncodec import loads
from bridge.service.models import HttpRequest
from bridge.service.sse import SseEvent, SseParser
from bridge.service.transport import Body, HttpTransport, Response, TransportError


class StreamSink(Protocol):
    """Receives a stream's events in order (the deliver stage's TopicStreamSink implements it)."""

    async def on_event(self, event: SseEvent) -> None:
        """Take one event in order (including the `[DONE]` marker, which is not forwarded)."""

    @property
    def forwarded(self) -> bool:
        """Whether an event has gone out: from then on the request is never sent again."""

    @property
    def stopped(self) -> bool:
        """Whether the sink takes no more events (then the rest of the stream is not read)."""


@dataclass(slots=True)
class ServiceResult:
    """A successful (2xx) answer as read; render turns it into reply data."""

    body: bytes
    """The complete body; empty when the answer was a stream (its events went to the sink)."""
    content_type: str
    """The Content-Type header, lower-cased ("" when absent)."""
    http_status: int
    request_id: str | None
    streamed: bool = False
    attempts: int = 1
    poll_after: float | None = None
    """Seconds the `openai-poll-after-ms` header asks a poller to wait, when it was sent."""


_JSON_TYPES = ("application/json", "application/problem+json")
_UPSTREAM_TEXT_LIMIT = 2000
MAX_ANSWER_BYTES = 32 << 20
"""Default `[limits] max_answer_bytes`: the largest answer read into memory (the systemd unit
allows the whole bridge 256 MiB; an answer is held about twice while its reply is built)."""
ERROR_BODY_BYTES = 64 << 10
"""What is read of a non-2xx answer: enough for any error object, never a whole large body."""


def _upstream_error_object(body: bytes, content_type: str) -> Any:
    if content_type.startswith(_JSON_TYPES) or body[:1] in (b"{", b"["):
        try:
            parsed = loads(body)
        except ValueError:
            parsed = None
        if isinstance(parsed, dict) and "error" in parsed:
            return parsed["error"]
        if parsed is not None:
            return parsed
    text = body[:_UPSTREAM_TEXT_LIMIT].decode("utf-8", "replace").strip()
    return {"message": text} if text else None


def _error_message(status: int, reason: str | None, upstream: Any) -> str:
    detail = ""
    if isinstance(upstream, dict):
        msg = upstream.get("message")
        if isinstance(msg, str) and msg:
            detail = f": {msg}"
    return f"service host answered HTTP {status} {reason or ''}".rstrip() + detail


def _poll_after(header: str | None) -> float | None:
    """The `openai-poll-after-ms` hint in seconds (None when absent or not a number)."""
    if header is None:
        return None
    try:
        value = float(header) / 1000.0
    except ValueError:
        return None
    return value if 0 <= value < 86400 else None


class ServiceClient:
    """Sends requests to the configured service host, retrying what is worth retrying."""

    def __init__(
        self,
        config: ServiceConfig,
        transport: HttpTransport,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        clock: Callable[[], float] = time.monotonic,
        max_answer_bytes: int = MAX_ANSWER_BYTES,
    ) -> None:
        self.config = config
        self.transport = transport
        self.max_answer_bytes = max_answer_bytes
        self._sleep = sleep
        self._clock = clock
        host = yarl.URL(config.api_base)
        self.host_label = f"{host.host}:{host.port}" if host.host else config.api_base

    async def start(self) -> None:
        """Open the transport's connection pool (idempotent)."""
        await self.transport.start()

    async def close(self) -> None:
        """Close the transport's connections."""
        await self.transport.close()

    async def send(self, request: HttpRequest, sink: StreamSink | None = None) -> ServiceResult:
        """Send `request` and return the answer, retrying connection failures, timeouts, 429 and
        5xx (honouring Retry-After) within the deadline; never other 4xx, never once a stream's
        event has been forwarded."""
        backoff = Backoff(0.5, 8.0)
        deadline = self._clock() + self.config.total_timeout
        attempt = 0
        while True:
            attempt += 1
            try:
                result = await self._send_once(request, sink)
                result.attempts = attempt
                return result
            except BridgeError as exc:
                exc.attempts = attempt
                if not isinstance(exc, UpstreamUnavailable | UpstreamTimeout | UpstreamError):
                    raise
                if (sink is not None and sink.forwarded) or attempt > self.config.max_retries:
                    raise
                if isinstance(exc, UpstreamError) and exc.http_status not in RETRYABLE_STATUSES:
                    raise
                hinted = exc.retry_after if isinstance(exc, UpstreamError) else None
                delay = hinted if hinted is not None else backoff.next_delay()
                if delay > self.config.retry_max_delay or self._clock() + delay > deadline:
                    raise
                await self._sleep(delay)

    async def _send_once(self, request: HttpRequest, sink: StreamSink | None) -> ServiceResult:
        async def read(resp: Response) -> ServiceResult:
            return await self._read(resp, sink)

        try:
            return await self.transport.exchange(request, read)
        except TransportError as exc:
            if exc.kind == "timeout":
                raise UpstreamTimeout(
                    f"service host {self.host_label} did not answer in time"
                ) from None
            if exc.kind == "redirect":
                raise BadRedirect(f"service host {self.host_label} sent a {exc}") from None
            if exc.kind == "cut" and sink is not None:
                raise StreamInterrupted(
                    f"service host {self.host_label} cut the response short"
                ) from None
            if exc.kind == "cut":
                raise UpstreamUnavailable(
                    f"service host {self.host_label} broke the response: {exc}"
                ) from None
            raise UpstreamUnavailable(
                f"cannot reach service host {self.host_label}: {exc}"
            ) from None

    async def _read(self, resp: Response, sink: StreamSink | None) -> ServiceResult:
        """The answer in `resp`: an UpstreamError unless 2xx, the events to `sink` for a stream."""
        status = resp.status
        request_id = resp.headers.get("x-request-id")
        content_type = resp.headers.get("Content-Type", "").lower()
        if status >= 300:  # a 3xx here is a redirect the transport did not follow
            body = (await _read_at_most(resp.content, ERROR_BODY_BYTES))[:ERROR_BODY_BYTES]
            upstream = _upstream_error_object(body, content_type)
            raise UpstreamError(
                _error_message(status, resp.reason, upstream),
                http_status=status,
                upstream=upstream,
                retry_after=retry_after_seconds({k.lower(): v for k, v in resp.headers.items()}),
            )
        if content_type.startswith("text/event-stream"):
            await self._read_stream(resp.content, sink)
            return ServiceResult(b"", content_type, status, request_id, streamed=True)
        body = await self._read_bounded(resp)
        result = ServiceResult(body, content_type, status, request_id)
        result.poll_after = _poll_after(resp.headers.get("openai-poll-after-ms"))
        return result

    async def _read_bounded(self, resp: Response) -> bytes:
        """The whole body of `resp`, or AnswerTooLarge as soon as it is known to exceed
        `max_answer_bytes` (from Content-Length before reading, else when reading passes it)."""
        limit = self.max_answer_bytes
        declared = resp.headers.get("Content-Length", "")
        if declared.isdigit() and int(declared) > limit:
            raise self._too_large(f"{int(declared)} bytes")
        body = await _read_at_most(resp.content, limit + 1)
        if len(body) > limit:
            raise self._too_large(f"more than {limit} bytes")
        return body

    def _too_large(self, size: str) -> AnswerTooLarge:
        return AnswerTooLarge(
            f"service host {self.host_label} answered {size}, more than [limits] "
            f"max_answer_bytes = {self.max_answer_bytes}; the rest was not read (ask for less, "
            "or raise the limit within the memory the bridge may use)"
        )

    async def _read_stream(self, body: Body, sink: StreamSink | None) -> None:
        """Feed the events to `sink` until the stream ends or the sink stops taking them."""
        if sink is None:
            raise UpstreamBadResponse("service host streamed an answer that was not asked for")
        parser = SseParser()
        async for chunk in body.iter_any():
            for event in parser.feed(chunk):
                await sink.on_event(event)
                if sink.stopped:
                    return
        # A final event without its blank line still counts (some servers end on `[DONE]`).
        for event in parser.close(flush=True):
            await sink.on_event(event)


async def _read_at_most(body: Body, limit: int) -> bytes:
    """The body up to the chunk that reaches `limit` bytes (all of it when shorter); the rest
    stays unread."""
    chunks: list[bytes] = []
    size = 0
    async for chunk in body.iter_any():
        chunks.append(chunk)
        size += len(chunk)
        if size >= limit:
            break
    return b"".join(chunks)
