"""The console's web server (aiohttp.web): the page, its JSON API, and the guard in front of both.

The only console module that imports aiohttp. What it shows comes from a `ConsoleSource` (the
running bridge, bridge/runtime/roles.py); what devices did comes from the dispatcher's observer.
"""

from __future__ import annotations

import asyncio
import itertools
import json
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from contextlib import AbstractAsyncContextManager
from importlib import resources
from typing import TYPE_CHECKING, Any, Protocol

from aiohttp import web

from bridge.config import ConsoleConfig
from bridge.console.model import PREVIEW_BYTES, Guard, RateLimit, RequestLog, preview
from bridge.messages import PublishFailed
from bridge.pipeline.model import Observed
from bridge.redact import Redactor

if TYPE_CHECKING:
    from structlog.typing import FilteringBoundLogger

TRY_TIMEOUT = 120.0
"""Seconds the try page waits for the reply of the request it sent."""
MAX_STREAMS = 3
"""Streamed tries open at once (each holds an HTTP response and a subscription)."""
MAX_STREAM_BYTES = 1 << 20
"""Bytes of stream events one streamed try sends the page; past them events are only counted."""
REPLY_GRACE = 5.0
"""Seconds a streamed try waits, once the reply is answered, for it to come back through the
broker (behind the last events): a reply the broker did not take would otherwise hold it."""
_STATIC = ("index.html", "console.js", "console.css")


class ConsoleSource(Protocol):
    """What the console shows and does: the running bridge."""

    topic_prefix: str

    def status(self) -> Awaitable[dict[str, Any]]:
        """State, broker, service host (no credentials), versions, uptime, counters, journal."""

    def config_view(self) -> dict[str, Any]:
        """The effective config (redacted), its source file, env overrides, check findings."""

    def methods(self) -> list[dict[str, Any]]:
        """Every method: name, group, verb, path."""

    def describe(self, name: str) -> dict[str, Any] | None:
        """What goes in one method's payload (text and an example), None when unknown."""

    def publish(self, topic: str, payload: bytes) -> Awaitable[None]:
        """Publish a request through the broker, as a device would."""

    def follow(
        self, topics: Sequence[str], deliver: Callable[[str, bytes], None]
    ) -> AbstractAsyncContextManager[None]:
        """Inside, every message on `topics` goes to `deliver`, read through the broker."""


class Console:
    """The web console of one bridge: started and closed by the bridge's exit stack."""

    def __init__(
        self,
        config: ConsoleConfig,
        source: ConsoleSource,
        redactor: Redactor,
        log: FilteringBoundLogger,
    ) -> None:
        self.config = config
        self.source = source
        self.redactor = redactor
        self.log = log
        self.requests = RequestLog(config.history)
        self.guard = Guard(config.host, config.port, config.token.get_secret_value())
        self.tries = RateLimit(rate=1.0, burst=5)
        self._pending: dict[str, asyncio.Future[Observed]] = {}
        self.streaming = 0
        """Streamed tries open now (at most MAX_STREAMS)."""
        self._ids = itertools.count(1)
        self._runner: web.AppRunner | None = None
        self.url: str | None = None

    # --- the bridge's side ---------------------------------------------------------------------

    def observe(self, seen: Observed) -> None:
        """Record one answered request; hand it to the try that sent it, if any."""
        self.requests.add(
            seen.method,
            seen.suffix,
            seen.transaction,
            seen.code,
            seen.http_status,
            seen.duration_ms,
            seen.request_head,
            seen.request_size,
            seen.reply,
            seen.reply_type,
            seen.reply_size,
        )
        waiting = self._pending.pop(seen.suffix, None)
        if waiting is not None and not waiting.done():
            waiting.set_result(seen)

    def app(self) -> web.Application:
        """The console's web application (its routes behind the guard)."""
        app = web.Application(middlewares=[self._guarded], client_max_size=64 << 20)
        app.router.add_get("/", self._page)
        app.router.add_get("/static/{name}", self._static)
        app.router.add_get("/favicon.ico", self._no_icon)
        app.router.add_get("/api/status", self._status)
        app.router.add_get("/api/requests", self._requests)
        app.router.add_get("/api/requests/{seq:[0-9]+}", self._request)
        app.router.add_get("/api/config", self._config)
        app.router.add_get("/api/methods", self._methods)
        app.router.add_get("/api/describe/{name}", self._describe)
        app.router.add_post("/api/try", self._try)
        app.router.add_post("/api/try/stream", self._try_stream)
        return app

    async def start(self) -> None:
        """Listen; a port already taken is one warning, and the bridge goes on without it."""
        runner = web.AppRunner(self.app(), access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, self.config.host, self.config.port)
        try:
            await site.start()
        except OSError as exc:
            await runner.cleanup()
            self.log.warning(
                "console not started",
                address=f"{self.config.host}:{self.config.port}",
                reason=exc.strerror,
                hint="set [console] port to a free one, or enabled = false",
            )
            return
        self._runner = runner
        port = runner.addresses[0][1] if runner.addresses else self.config.port
        if self.config.port == 0:
            self.guard = Guard(self.config.host, port, self.config.token.get_secret_value())
        host = f"[{self.config.host}]" if ":" in self.config.host else self.config.host
        self.url = f"http://{host}:{port}/"
        self.log.info("console", url=self.url, token=bool(self.config.token.get_secret_value()))

    async def close(self) -> None:
        """Stop listening; pending tries end."""
        for waiting in self._pending.values():
            waiting.cancel()
        self._pending.clear()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    # --- HTTP ------------------------------------------------------------------------------------

    @web.middleware
    async def _guarded(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        changes = request.method not in ("GET", "HEAD")
        host = request.headers.get("Host")
        if request.path.startswith("/api/"):
            refusal = self.guard.refusal(
                host=host,
                origin=request.headers.get("Origin"),
                authorization=request.headers.get("Authorization"),
                changes=changes,
            )
        else:  # the page and its assets carry nothing secret: it loads, then asks for the token
            refusal = self.guard.host_refusal(host)
        if refusal is None and changes and request.headers.get(Guard.HEADER) != "1":
            refusal = 403, f"a state-changing request needs the {Guard.HEADER} header"
        if refusal is not None:
            return _json({"error": refusal[1]}, status=refusal[0])
        response = await handler(request)
        if not response.prepared:  # a stream sets them itself before its first bytes
            _harden(response)
        return response

    async def _page(self, request: web.Request) -> web.StreamResponse:
        return _asset("index.html")

    async def _no_icon(self, request: web.Request) -> web.StreamResponse:
        return web.Response(status=204)

    async def _static(self, request: web.Request) -> web.StreamResponse:
        name = request.match_info["name"]
        if name not in _STATIC:
            raise web.HTTPNotFound()
        return _asset(name)

    async def _status(self, request: web.Request) -> web.StreamResponse:
        return _json(self.redactor.any(await self.source.status()))

    async def _requests(self, request: web.Request) -> web.StreamResponse:
        try:
            since = int(request.query.get("since", "0"))
        except ValueError:
            since = 0
        rows = [r.summary(self.redactor) for r in self.requests.since(since)]
        return _json({"requests": rows})

    async def _request(self, request: web.Request) -> web.StreamResponse:
        record = self.requests.find(int(request.match_info["seq"]))
        if record is None:
            return _json({"error": "no such request (the list keeps the last ones only)"}, 404)
        return _json(record.detail(self.redactor))

    async def _config(self, request: web.Request) -> web.StreamResponse:
        return _json(self.redactor.any(self.source.config_view()))

    async def _methods(self, request: web.Request) -> web.StreamResponse:
        return _json({"methods": self.source.methods()})

    async def _describe(self, request: web.Request) -> web.StreamResponse:
        found = self.source.describe(request.match_info["name"])
        if found is None:
            return _json({"error": "unknown method"}, 404)
        return _json(found)

    async def _try(self, request: web.Request) -> web.StreamResponse:
        asked = await self._try_request(request)
        if isinstance(asked, web.Response):
            return asked
        method, payload = asked
        suffix = f"console/{next(self._ids)}"
        waiting: asyncio.Future[Observed] = asyncio.get_running_loop().create_future()
        self._pending[suffix] = waiting
        topic = f"{self.source.topic_prefix}/request/{method}/{suffix}"
        try:
            await self.source.publish(topic, json.dumps(payload).encode())
            seen = await asyncio.wait_for(waiting, TRY_TIMEOUT)
        except TimeoutError:
            return _json({"error": f"no reply within {TRY_TIMEOUT:g} s", "topic": topic}, 504)
        except (PublishFailed, ConnectionError) as exc:
            return _refused(topic, exc)
        finally:
            self._pending.pop(suffix, None)
        return _json(self._answered(topic, seen))

    async def _try_request(self, request: web.Request) -> tuple[str, dict[str, Any]] | web.Response:
        """The method and payload a try asks for, or why it is refused (rate, shape)."""
        if not self.tries.take():
            return _json({"error": "too many tries: at most 5 at once, then 1 a second"}, 429)
        try:
            body = await request.json()
        except ValueError:
            return _json({"error": "the body must be JSON"}, 400)
        if not isinstance(body, dict):
            return _json({"error": "the body must be a JSON object"}, 400)
        method, payload = body.get("method"), body.get("payload")
        if not isinstance(method, str) or not method or any(c in method for c in "/+#\x00"):
            return _json({"error": "method must be a method name"}, 400)
        if not isinstance(payload, dict):
            return _json({"error": "payload must be a JSON object"}, 400)
        return method, payload

    def _answered(self, topic: str, seen: Observed) -> dict[str, Any]:
        reply = preview(seen.reply, self.redactor, seen.reply_type)
        return {"topic": topic, "code": seen.code, "reply": reply}

    async def _try_stream(self, request: web.Request) -> web.StreamResponse:
        """A try whose stream events reach the page as the bridge publishes them.

        Server-sent events over the POST's own response (read by fetch(), so the token goes in
        a header as for every call): `published`, one `event` per stream message (read back
        through the broker on the stream topic), `truncated` once past MAX_STREAM_BYTES, then
        `reply` (or `error`). Bounded: MAX_STREAMS at once, TRY_TIMEOUT in all.
        """
        if self.streaming >= MAX_STREAMS:
            return _json({"error": f"at most {MAX_STREAMS} streamed tries at once"}, 429)
        asked = await self._try_request(request)
        if isinstance(asked, web.Response):
            return asked
        method, payload = asked
        self.streaming += 1
        try:
            return await self._stream(request, method, payload)
        finally:
            self.streaming -= 1

    async def _stream(
        self, request: web.Request, method: str, payload: dict[str, Any]
    ) -> web.StreamResponse:
        prefix, suffix = self.source.topic_prefix, f"console/{next(self._ids)}"
        topic = f"{prefix}/request/{method}/{suffix}"
        stream_topic = f"{prefix}/stream/{method}/{suffix}"
        reply_topic = f"{prefix}/response/{method}/{suffix}"
        loop = asyncio.get_running_loop()
        deadline = loop.time() + TRY_TIMEOUT
        answered: asyncio.Future[Observed] = loop.create_future()
        events: deque[bytes] = deque()
        arrived, reply_back = asyncio.Event(), asyncio.Event()
        room, dropped = MAX_STREAM_BYTES, 0

        def deliver(on: str, message: bytes) -> None:
            nonlocal room, dropped
            if on == reply_topic:
                reply_back.set()
            elif len(message) <= room:
                room -= len(message)
                events.append(message)
            else:  # and every later one: the page never shows a stream with a hole
                room, dropped = 0, dropped + 1
            arrived.set()

        async def drain() -> None:
            while events:
                await _send(response, "event", self._event(events.popleft()))

        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        _harden(response)
        self._pending[suffix] = answered
        try:
            async with self.source.follow([stream_topic, reply_topic], deliver):
                await self.source.publish(topic, json.dumps(payload).encode())
                await response.prepare(request)
                await _send(response, "published", {"topic": topic})
                said_dropped, grace_end = False, None
                while True:
                    arrived.clear()
                    await drain()
                    if dropped and not said_dropped:
                        said_dropped = True
                        await _send(response, "truncated", {"after_bytes": MAX_STREAM_BYTES})
                    now = loop.time()
                    if answered.done():
                        # The reply comes back through the broker behind the last events.
                        grace_end = grace_end or now + REPLY_GRACE
                        if reply_back.is_set() or now >= grace_end:
                            break
                    if now >= deadline:
                        await _send(
                            response, "error", {"error": f"no reply within {TRY_TIMEOUT:g} s"}
                        )
                        return response
                    waiter = asyncio.ensure_future(arrived.wait())
                    waits: list[asyncio.Future[Any]] = [waiter]
                    if not answered.done():
                        waits.append(answered)
                    try:
                        await asyncio.wait(
                            waits,
                            timeout=min(deadline, grace_end or deadline) - now,
                            return_when=asyncio.FIRST_COMPLETED,
                        )
                    finally:
                        waiter.cancel()
                await drain()
                result = self._answered(topic, answered.result())
                await _send(response, "reply", {**result, "events_dropped": dropped})
        except PublishFailed as exc:  # raised before the response is prepared
            return _refused(topic, exc)
        except (OSError, TimeoutError) as exc:  # the page went away, or no broker to read
            if not response.prepared:
                why = f"the broker cannot be read ({type(exc).__name__})"
                return _json({"error": why}, 503)
        finally:
            self._pending.pop(suffix, None)
        return response

    def _event(self, message: bytes) -> dict[str, Any]:
        """One stream message as the page shows it: redacted, a large one cut to a preview."""
        if len(message) <= PREVIEW_BYTES:
            try:  # anyone allowed to publish there may have: deep nesting is only text
                event = json.loads(message)
                if isinstance(event, dict):
                    return {"event": self.redactor.any(event)}
            except (ValueError, RecursionError):
                pass
        return {"preview": preview(message, self.redactor, None)}


def _refused(topic: str, exc: Exception) -> web.Response:
    """A try the broker did not take (an ACL, or no connection): 502 with the reason."""
    return _json(
        {
            "error": f"the broker did not take the try on {topic}: {exc} (a broker ACL must let "
            "the bridge's user write <prefix>/request/+/console/#: docs/security.md)",
            "topic": topic,
        },
        502,
    )


async def _send(response: web.StreamResponse, name: str, data: Any) -> None:
    """One server-sent event."""
    frame = f"event: {name}\ndata: {json.dumps(data, default=str)}\n\n"
    await response.write(frame.encode())


def _harden(response: web.StreamResponse) -> None:
    """The headers every answer carries: no framing, no sniffing, no caching, no referrer."""
    response.headers["Content-Security-Policy"] = "default-src 'self'; frame-ancestors 'none'"
    response.headers["X-Frame-Options"] = "DENY"
    response.headers["X-Content-Type-Options"] = "nosniff"
    response.headers["Cache-Control"] = "no-store"
    response.headers["Referrer-Policy"] = "no-referrer"


def _json(data: Any, status: int = 200) -> web.Response:
    return web.json_response(data, status=status, dumps=lambda v: json.dumps(v, default=str))


def _asset(name: str) -> web.Response:
    content = resources.files("bridge.console").joinpath("static", name).read_bytes()
    kind = {"html": "text/html", "js": "text/javascript", "css": "text/css"}[name.rsplit(".")[1]]
    return web.Response(body=content, content_type=kind, charset="utf-8")
