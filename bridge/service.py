"""The execute stage: sends an `HttpRequest` to the service host, retrying, and reads the answer.

The only HTTP I/O of the bridge. One pooled `aiohttp.ClientSession` per process; retries with
backoff for connection errors, timeouts, 429 and 5xx (honouring Retry-After), never for other 4xx
and never once a stream has started to be forwarded.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol

import aiohttp
import yarl

from bridge import compat
from bridge.backoff import Backoff, retry_after_seconds
from bridge.config import ServiceConfig
from bridge.errors import (
    RETRYABLE_STATUSES,
    BridgeError,
    StreamInterrupted,
    UpstreamBadResponse,
    UpstreamError,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from bridge.jsoncodec import loads
from bridge.request import HttpRequest
from bridge.sse import SseEvent, SseParser


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


# Part types when the form names none: what aiohttp gives a str and a bytes value.
_TEXT_PART_TYPE = "text/plain; charset=utf-8"
_FILE_PART_TYPE = "application/octet-stream"
_JSON_TYPES = ("application/json", "application/problem+json")
_UPSTREAM_TEXT_LIMIT = 2000


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


class ServiceClient:
    """Sends requests to the configured service host over one pooled aiohttp session."""

    def __init__(
        self, config: ServiceConfig, sleep: Callable[[float], Awaitable[None]] = asyncio.sleep
    ) -> None:
        self.config = config
        self._session: aiohttp.ClientSession | None = None
        self._sleep = sleep
        self._timeout = aiohttp.ClientTimeout(
            total=config.total_timeout,
            connect=config.connect_timeout,
            sock_read=config.read_timeout,
        )
        host = yarl.URL(config.api_base)
        self.host_label = f"{host.host}:{host.port}" if host.host else config.api_base

    async def start(self) -> None:
        """Open the pooled session (idempotent)."""
        if self._session is None:
            connector = aiohttp.TCPConnector(
                limit=self.config.max_connections, ttl_dns_cache=300, enable_cleanup_closed=False
            )
            self._session = aiohttp.ClientSession(
                connector=connector,
                timeout=self._timeout,
                auto_decompress=True,
                skip_auto_headers=("Content-Type",),
            )

    async def close(self) -> None:
        """Close the session and its connections."""
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def send(self, request: HttpRequest, sink: StreamSink | None = None) -> ServiceResult:
        """Send `request` (retrying transient failures) and return the reply data."""
        await self.start()
        backoff = Backoff(0.5, 8.0)
        deadline = time.monotonic() + self.config.total_timeout
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
                if delay > self.config.retry_max_delay or time.monotonic() + delay > deadline:
                    raise
                await self._sleep(delay)

    async def _send_once(self, request: HttpRequest, sink: StreamSink | None) -> ServiceResult:
        assert self._session is not None
        data: Any = None
        headers = request.headers
        if request.form is not None:
            form = aiohttp.FormData(quote_fields=False, default_to_multipart=True)
            for part in request.form:
                default_type = _TEXT_PART_TYPE if part.filename is None else _FILE_PART_TYPE
                part_body = compat.bytes_body(part.value, part.content_type or default_type)
                form.add_field(part.name, part_body, filename=part.filename)
            # The session skips automatic Content-Type headers (bodyless requests must not get
            # one), so the multipart type with its boundary is set here explicitly.
            data = form()
            headers = {**headers, "Content-Type": data.content_type}
        elif request.json_body is not None:
            data = compat.bytes_body(request.json_body, "application/json")
        try:
            async with self._session.request(
                request.method,
                yarl.URL(request.url, encoded=True),
                headers=headers,
                data=data,
            ) as resp:
                status = resp.status
                request_id = resp.headers.get("x-request-id")
                content_type = resp.headers.get("Content-Type", "").lower()
                if status >= 400:
                    body = await resp.read()
                    upstream = _upstream_error_object(body, content_type)
                    raise UpstreamError(
                        _error_message(status, resp.reason, upstream),
                        http_status=status,
                        upstream=upstream,
                        retry_after=retry_after_seconds(
                            {k.lower(): v for k, v in resp.headers.items()}
                        ),
                    )
                if content_type.startswith("text/event-stream"):
                    await self._read_stream(resp, sink)
                    return ServiceResult(b"", content_type, status, request_id, streamed=True)
                # content.read() rather than resp.read(): the response would keep its own reference.
                body = await resp.content.read()
                return ServiceResult(body, content_type, status, request_id)
        except BridgeError:
            raise
        except (TimeoutError, aiohttp.ServerTimeoutError):
            raise UpstreamTimeout(
                f"service host {self.host_label} did not answer in time"
            ) from None
        except aiohttp.ClientPayloadError as exc:
            if sink is not None:
                raise StreamInterrupted(
                    f"service host {self.host_label} cut the response short"
                ) from None
            raise UpstreamUnavailable(
                f"service host {self.host_label} broke the response: {type(exc).__name__}"
            ) from None
        except (aiohttp.ClientError, OSError) as exc:
            raise UpstreamUnavailable(
                f"cannot reach service host {self.host_label}: {type(exc).__name__}"
            ) from None

    async def _read_stream(self, resp: aiohttp.ClientResponse, sink: StreamSink | None) -> None:
        """Feed the events to `sink` until the stream ends or the sink stops taking them."""
        if sink is None:
            raise UpstreamBadResponse("service host streamed an answer that was not asked for")
        parser = SseParser()
        async for chunk in resp.content.iter_any():
            for event in parser.feed(chunk):
                await sink.on_event(event)
                if sink.stopped:
                    return
        # A final event without its blank line still counts (some servers end on `[DONE]`).
        for event in parser.close(flush=True):
            await sink.on_event(event)
