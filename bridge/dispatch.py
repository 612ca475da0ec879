"""The request pipeline: one inbound MQTT message -> at most one API call -> exactly one reply.

`Dispatcher.submit` is called for every message on the request subscription. It runs each request
as its own task (bounded by `[limits] max_concurrency`), publishes the reply, waits for the broker's
PUBACK and only then acknowledges the request, so an unanswered request is redelivered.
"""

from __future__ import annotations

import asyncio
import contextlib
import fnmatch
import functools
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from bridge import envelope
from bridge.config import BridgeConfig
from bridge.dedup import ReplyCache, request_key
from bridge.errors import (
    BadJson,
    BridgeError,
    InternalError,
    MethodNotAllowed,
    NotAnObject,
    PayloadTooLarge,
    ReplyTooLarge,
    UnknownMethod,
)
from bridge.jsoncodec import dumps, loads, loads_text
from bridge.logs import REDACTOR
from bridge.mqtt import InboundMessage, PublishFailed
from bridge.operations import MethodTable, Operation
from bridge.request import RequestBuilder
from bridge.service import ServiceClient, ServiceResult
from bridge.streaming import StreamPublisher, make_sink
from bridge.topics import Topics

LARGE_PAYLOAD = 1 << 20
"""Requests from this many bytes on are parsed as text with the bytes dropped first."""


class Publisher(StreamPublisher, Protocol):
    """What the dispatcher needs from the MQTT transport: publishing, plus acknowledging."""

    def ack(self, message: InboundMessage) -> None:
        """Acknowledge a request message."""


@dataclass(slots=True)
class Stats:
    """Counters for the stats topic and Home Assistant sensors."""

    requests_total: int = 0
    errors_total: int = 0
    in_flight: int = 0
    last_latency_ms: float | None = None
    last_error: dict[str, Any] | None = None
    by_code: dict[str, int] = field(default_factory=dict)


def _log_transaction(value: Any) -> Any:
    if value is envelope.MISSING:
        return None
    if isinstance(value, str | int | float | bool) or value is None:
        return value if not isinstance(value, str) or len(value) <= 120 else value[:120] + "..."
    text = dumps(value).decode("utf-8", "replace")
    return text if len(text) <= 120 else text[:120] + "..."


class AccessRules:
    """Allow/deny glob patterns over operationIds (case-insensitive)."""

    def __init__(self, allow: list[str], deny: list[str]) -> None:
        self.allow = [p.lower() for p in allow]
        self.deny = [p.lower() for p in deny]
        self._verdicts: dict[str, bool] = {}  # per operation name: at most a few hundred

    def allows(self, name: str) -> bool:
        """Whether devices may call the operation `name`."""
        verdict = self._verdicts.get(name)
        if verdict is None:
            key = name.lower()
            verdict = not any(fnmatch.fnmatchcase(key, p) for p in self.deny) and any(
                fnmatch.fnmatchcase(key, p) for p in self.allow
            )
            self._verdicts[name] = verdict
        return verdict


class Dispatcher:
    """Turns request messages into API calls and replies; owns the per-request tasks."""

    def __init__(
        self,
        *,
        config: BridgeConfig,
        table: MethodTable,
        service: ServiceClient,
        publisher: Publisher,
        topics: Topics,
        log: Any,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config
        self.table = table
        self.builder = RequestBuilder(config.service)
        self.service = service
        self.publisher = publisher
        self.topics = topics
        self.log = log
        self.access = AccessRules(config.access.allow_methods, config.access.deny_methods)
        self.cache = ReplyCache(config.limits.dedup_entries, config.limits.dedup_seconds)
        self.stats = Stats()
        self._clock = clock
        self._sem = asyncio.Semaphore(config.limits.max_concurrency)
        self._tasks: set[asyncio.Task[None]] = set()
        self._in_flight: dict[tuple[int, int], asyncio.Task[None]] = {}
        self.accepting = True
        self.idle = asyncio.Event()
        self.idle.set()

    # --- intake -----------------------------------------------------------------------------------

    def submit(self, message: InboundMessage) -> None:
        """Start handling one inbound message (called from the MQTT callback; never raises)."""
        if not self.accepting:
            return  # left unacked: the broker redelivers it to the next start
        if message.retain:
            self.log.warning(
                "retained request ignored",
                topic=message.topic,
                hint="requests are never executed from retained messages; publish without retain",
            )
            self.publisher.ack(message)
            return
        key = (message.generation, message.mid)
        if message.qos > 0 and key in self._in_flight:
            # The broker redelivered a request we are still working on; the running task acks it.
            return
        task = asyncio.create_task(self._handle(message))
        self._tasks.add(task)
        if message.qos > 0:
            self._in_flight[key] = task
        self.idle.clear()
        task.add_done_callback(functools.partial(self._done, key=key))

    def _done(self, task: asyncio.Task[None], *, key: tuple[int, int]) -> None:
        self._tasks.discard(task)
        if self._in_flight.get(key) is task:
            del self._in_flight[key]
        if not self._tasks:
            self.idle.set()

    async def drain(self, grace: float) -> bool:
        """Stop accepting and wait up to `grace` s for in-flight requests; True when all done."""
        self.accepting = False
        if not self._tasks:
            return True
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.idle.wait(), grace)
        return not self._tasks

    @property
    def in_flight(self) -> int:
        """Requests accepted and not yet answered (including those queued behind the limit)."""
        return len(self._tasks)

    async def cancel_all(self) -> None:
        """Cancel unfinished requests (left unacked, so the broker redelivers them)."""
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task

    # --- one request ------------------------------------------------------------------------------

    async def _handle(self, message: InboundMessage) -> None:
        async with self._sem:
            if not self.accepting:
                return  # queued behind the limit when shutdown began: left for redelivery
            self.stats.in_flight += 1
            try:
                await self._handle_one(message)
            except asyncio.CancelledError:
                raise
            except Exception:
                self.log.exception("request handling failed", topic=message.topic)
            finally:
                self.stats.in_flight -= 1

    async def _handle_one(self, message: InboundMessage) -> None:
        started = self._clock()
        parsed = self.topics.parse(message.topic)
        if parsed is None:
            self.log.warning("message outside the request topics rejected", topic=message.topic)
            self.publisher.ack(message)
            return
        reply_topic = parsed.reply
        correlation = message.correlation_data
        if message.response_topic is not None:
            if _valid_publish_topic(message.response_topic):
                reply_topic = message.response_topic
            else:
                self.log.warning(
                    "request rejected: unusable response topic",
                    topic=message.topic,
                    response_topic=message.response_topic[:200],
                )
                self.publisher.ack(message)
                return

        # Redelivered (DUP) or repeated-with-the-same-transaction requests are answered from the
        # cache of recent replies instead of calling the API twice.
        key = request_key(message.topic, message.payload) if self.cache.entries > 0 else None
        cached = self.cache.get(key) if key is not None else None
        if cached is not None and message.dup:
            await self._answer_cached(message, parsed.method, reply_topic, cached[1], correlation)
            return

        op: Operation | None = None
        transaction: Any = envelope.MISSING
        result: ServiceResult | None = None
        attempts = 0
        try:
            params = self._decode(message)
            transaction = params.pop("transaction", envelope.MISSING)
            if cached is not None and transaction is not envelope.MISSING:
                await self._answer_cached(
                    message, parsed.method, reply_topic, cached[1], correlation
                )
                return
            op = self.table.find(parsed.method)
            if op is None:
                raise UnknownMethod(
                    f"unknown method {parsed.method[:100]!r}; see `openai-mqtt-bridge methods`"
                    if parsed.method
                    else "the topic names no method: publish to <prefix>/request/<method>"
                )
            if not self.access.allows(op.name):
                raise MethodNotAllowed(f"method {op.name} is not allowed on this bridge")
            request = self.builder.build(op, params)
            del params
            sink = (
                make_sink(op, self.publisher, parsed.stream, transaction, correlation)
                if request.stream
                else None
            )
            result = await self.service.send(op, request, sink)
            del request
            attempts = result.attempts
            payload = envelope.ok_raw(op.name, transaction, result.data_json)
            result.data_json = b""  # the envelope holds the only copy we still need
            if sink is not None:
                await sink.flushed()
        except BridgeError as exc:
            payload = envelope.error(op.name if op else parsed.method, transaction, exc)
            error: BridgeError | None = exc
            attempts = exc.attempts
        except Exception as exc:
            self.log.exception("unexpected failure", topic=message.topic)
            error = InternalError(f"internal error: {type(exc).__name__}")
            payload = envelope.error(op.name if op else parsed.method, transaction, error)
        else:
            error = None

        payload = REDACTOR.data(payload)
        if not self.publisher.fits(reply_topic, len(payload)):
            error = ReplyTooLarge(
                f"the reply ({len(payload)} bytes) exceeds the broker's maximum packet size"
            )
            payload = envelope.error(op.name if op else parsed.method, transaction, error)

        sent = await self._send(message, reply_topic, payload, correlation)
        if sent and key is not None and (error is None or not error.is_retryable):
            self.cache.put(key, reply_topic, payload)

        elapsed_ms = round((self._clock() - started) * 1000, 2)
        self._account(error, elapsed_ms)
        fields: dict[str, Any] = {
            "method": op.name if op else parsed.method[:100],
            "suffix": parsed.suffix[:100],
            "transaction": _log_transaction(transaction),
            "status": "error" if error else "ok",
            "code": error.code if error else None,
            "http_status": error.http_status if error else (result.http_status if result else None),
            "request_id": result.request_id if result else None,
            "attempts": attempts or None,
            "duration_ms": elapsed_ms,
            "dup": message.dup or None,
        }
        self.log.info("request", **{k: v for k, v in fields.items() if v is not None})

    async def _answer_cached(
        self,
        message: InboundMessage,
        method: str,
        topic: str,
        payload: bytes,
        correlation: bytes | None,
    ) -> None:
        await self._send(message, topic, payload, correlation)
        self.log.info("request", method=method[:100], status="cached", dup=message.dup)

    def _decode(self, message: InboundMessage) -> dict[str, Any]:
        """The request's parameters; takes the payload off `message`, so only the parse keeps it."""
        payload, message.payload = message.payload, b""
        limit = self.config.limits.max_request_bytes
        if len(payload) > limit:
            raise PayloadTooLarge(f"payload of {len(payload)} bytes exceeds the limit of {limit}")
        if not payload or payload.isspace():  # no strip(): that copies a large payload
            raise BadJson("empty payload: publish one JSON object")
        try:
            if len(payload) < LARGE_PAYLOAD:
                params = loads(payload)
            else:
                # Bytes to text, drop the bytes, then parse: two payloads' worth alive at the
                # peak instead of the three that parsing the bytes directly would hold.
                text = str(payload, "utf-8")
                del payload
                params = loads_text(text)
        except ValueError as exc:
            raise BadJson(f"payload is not valid UTF-8 JSON: {str(exc)[:200]}") from None
        if not isinstance(params, dict):
            raise NotAnObject(f"payload must be a JSON object, got {type(params).__name__}")
        return params

    async def _send(
        self,
        message: InboundMessage,
        topic: str,
        payload: bytes,
        correlation: bytes | None,
    ) -> bool:
        """Publish the reply, wait for PUBACK, then ack the request; False when not published."""
        try:
            await self.publisher.publish(topic, payload, correlation_data=correlation)
        except PublishFailed as exc:
            self.log.error("reply not published", topic=topic[:200], error=str(exc)[:300])
            if not exc.retry_later:
                # The broker refused this reply (e.g. an ACL): redelivery would fail the same way.
                self.publisher.ack(message)
            return False
        self.publisher.ack(message)
        return True

    def _account(self, error: BridgeError | None, elapsed_ms: float) -> None:
        stats = self.stats
        stats.requests_total += 1
        stats.last_latency_ms = elapsed_ms
        if error is not None:
            stats.errors_total += 1
            stats.by_code[error.code] = stats.by_code.get(error.code, 0) + 1
            stats.last_error = error.to_dict()


def _valid_publish_topic(topic: str) -> bool:
    return bool(topic) and not any(c in topic for c in "+#\0") and len(topic) <= 65535
