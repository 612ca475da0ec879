"""The lean HTTP path: plain JSON calls over pooled HTTP/1.1 connections parsed by httptools.

aiohttp's `ClientSession.request` was a third of the bridge's CPU per request (bench/README.md);
most calls need none of its machinery: a JSON body (or none) out, a JSON answer back, no form, no
stream, no redirect. Those go here: an asyncio Protocol per connection (over TLS for an https://
host, with aiohttp's TLS context: the same verification), llhttp (httptools) parsing the response,
a small keep-alive pool. Everything else (multipart forms, requests that ask for a stream, and the
rest of an exchange that answers with a redirect) goes on through `AiohttpTransport`. The request
bytes are the ones aiohttp sends (same headers, same order), the answer is decompressed as aiohttp
does (gzip, deflate), and failures are the same TransportErrors.
"""

from __future__ import annotations

import asyncio
import ssl
import time
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Protocol, TypeVar, cast

import httptools
import yarl
from multidict import CIMultiDict, CIMultiDictProxy

from bridge.config import ServiceConfig
from bridge.neterrors import connection_cause
from bridge.service.models import HttpRequest
from bridge.service.transport import HttpTransport, Response, TransportError

T = TypeVar("T")

_LEAN_METHODS = frozenset({"GET", "POST", "DELETE"})
_BODYLESS = frozenset({"GET", "HEAD", "OPTIONS", "TRACE"})
_IDEMPOTENT = frozenset({"GET", "DELETE"})
"""Sent again once on a new connection when a reused one turns out closed (as aiohttp does)."""
_REDIRECTS = frozenset({301, 302, 303, 307, 308})
_HIGH_WATER = 1 << 18
"""Unread body bytes at which the socket stops being read until the reader takes them, so a
large answer is never held whole ([limits] max_answer_bytes stops reading it)."""
_JOIN_BELOW = 1 << 16
"""Request bodies below this go out in one write with the head; larger ones are not copied."""
_KEEPALIVE_SECONDS = 15.0
"""An idle connection older than this is closed rather than reused (aiohttp's default)."""
_STREAM_MARK = b'"stream"'
"""A JSON body naming `stream` may be answered with server-sent events: aiohttp takes it."""


class _Closed(Exception):
    """The connection ended before the answer was complete."""


class _Answer:
    """One response as it arrives: the transport's `Response` and its `Body`."""

    __slots__ = (
        "_chunks",
        "_conn",
        "_done",
        "_error",
        "_inflate",
        "_paused",
        "_unread",
        "_waiter",
        "got_bytes",
        "head_done",
        "headers",
        "reason",
        "status",
    )

    def __init__(self, conn: _Connection) -> None:
        self._conn = conn
        self.status = 0
        self.reason: str | None = None
        self.headers: CIMultiDictProxy[str] = CIMultiDictProxy(CIMultiDict())
        self.head_done = False
        self.got_bytes = False
        self._chunks: list[bytes] = []
        self._unread = 0
        self._paused = False
        self._done = False
        self._error: BaseException | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._inflate: Any = None

    @property
    def content(self) -> _Answer:
        """The body (this object)."""
        return self

    async def read(self) -> bytes:
        """The rest of the body, decompressed."""
        parts: list[bytes] = []
        while True:
            if self._chunks:  # taken as it comes: a paused socket is read on
                parts.append(self._take())
            if self._done:
                break
            await self._conn.wait(self)
        body = parts[0] if len(parts) == 1 else b"".join(parts)
        return self._decoded(body, final=True)

    async def iter_any(self) -> AsyncIterator[bytes]:
        """The body in chunks as they arrive."""
        while True:
            if self._chunks:
                data = self._decoded(self._take(), final=self._done)
                if data:
                    yield data
            elif self._done:
                return
            else:
                await self._conn.wait(self)

    def _take(self) -> bytes:
        chunks, self._chunks, self._unread = self._chunks, [], 0
        if self._paused:
            self._paused = False
            self._conn.resume_reading()
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    def _decoded(self, data: bytes, *, final: bool) -> bytes:
        if self._inflate is None:
            return data
        try:
            out: bytes = self._inflate.decompress(data)
            if final:
                out += self._inflate.flush()
        except zlib.error as exc:
            raise TransportError("cut", f"cannot decompress the answer: {exc}") from None
        return out

    # --- fed by the connection -------------------------------------------------------------

    def start_body(self) -> None:
        encoding = self.headers.get("Content-Encoding", "").strip().lower()
        if encoding in ("gzip", "x-gzip"):
            self._inflate = zlib.decompressobj(16 + zlib.MAX_WBITS)
        elif encoding == "deflate":
            self._inflate = zlib.decompressobj()
        self.head_done = True
        self._wake()

    def feed(self, data: bytes) -> None:
        self._chunks.append(data)
        self._unread += len(data)
        if self._unread >= _HIGH_WATER and not self._paused:
            self._paused = True
            self._conn.pause_reading()
        self._wake()

    def finish(self) -> None:
        self._done = True
        self._wake()

    def fail(self, exc: BaseException) -> None:
        if not self._done:
            self._error = exc
            self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def check(self) -> None:
        if self._error is not None and not self._done:
            raise self._error


class _Connection(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection; one exchange at a time."""

    def __init__(self, pool: _Pool, key: _Key) -> None:
        self.pool = pool
        self.key = key
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.reused = False
        self.idle_since = 0.0
        self.answer: _Answer | None = None
        self._parser = httptools.HttpResponseParser(self)
        self._header_list: list[tuple[str, str]] = []
        self._deadline = 0.0
        self._reusable = False
        self._interim = False

    # --- asyncio.Protocol ---------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, but they are ones.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        answer = self.answer
        if answer is None:  # nothing asked: a server talking out of turn
            self.close()
            return
        answer.got_bytes = True
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            answer.fail(_Closed("the server switched protocols"))
            self.close()
        except httptools.HttpParserError as exc:
            answer.fail(_Closed(f"malformed answer: {exc}"))
            self.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        answer = self.answer
        if answer is None:
            return
        # An answer with neither Content-Length nor chunks ends when the connection does.
        if answer.head_done and self._body_until_close():
            answer.finish()
        else:
            answer.fail(
                exc if isinstance(exc, OSError) else _Closed("the server closed the connection")
            )

    # --- httptools callbacks ----------------------------------------------------------

    def on_header(self, name: bytes, value: bytes) -> None:
        # As aiohttp decodes them, so a non-ASCII value reads the same on both paths.
        self._header_list.append(
            (name.decode("utf-8", "surrogateescape"), value.decode("utf-8", "surrogateescape"))
        )

    def on_headers_complete(self) -> None:
        answer = self.answer
        assert answer is not None
        status = self._parser.get_status_code()
        if status < 200:  # an interim answer (100 Continue, 103 Early Hints): the real one follows
            self._header_list = []
            self._interim = True
            return
        answer.status = status
        answer.headers = CIMultiDictProxy(CIMultiDict(self._header_list))
        self._header_list = []
        answer.start_body()

    def on_status(self, reason: bytes) -> None:
        assert self.answer is not None
        self.answer.reason = reason.decode("utf-8", "surrogateescape")

    def on_body(self, body: bytes) -> None:
        assert self.answer is not None
        self.answer.feed(body)

    def on_message_complete(self) -> None:
        assert self.answer is not None
        if self._interim:
            self._interim = False
            return
        self._reusable = self._parser.should_keep_alive()
        self.answer.finish()

    # --- the exchange -----------------------------------------------------------------

    def _body_until_close(self) -> bool:
        answer = self.answer
        assert answer is not None
        headers = answer.headers
        return (
            "Content-Length" not in headers
            and "chunked" not in headers.get("Transfer-Encoding", "").lower()
            and answer.status not in (204, 304)
            and answer.status >= 200
        )

    def begin(self, head: bytes, body: bytes | None, deadline: float) -> _Answer:
        """Send one request's bytes; the answer arrives in the returned object."""
        assert self.transport is not None
        self.answer = answer = _Answer(self)
        self._deadline = deadline
        self._reusable = False
        if body is None:
            self.transport.write(head)
        elif len(body) < _JOIN_BELOW:  # one send
            self.transport.write(head + body)
        else:  # not copied into one buffer with the head
            self.transport.write(head)
            self.transport.write(body)
        return answer

    async def wait(self, answer: _Answer) -> None:
        """Until more of `answer` arrived; TimeoutError after the read timeout or the deadline."""
        answer.check()
        loop = self.pool.loop
        waiter: asyncio.Future[None] = loop.create_future()
        answer._waiter = waiter  # noqa: SLF001
        delay = min(self.pool.read_timeout, self._deadline - loop.time())
        timer = loop.call_later(delay, _expire, waiter)
        try:
            await waiter
        finally:
            timer.cancel()
            answer._waiter = None  # noqa: SLF001
        answer.check()

    def release(self) -> None:
        """Back to the pool when the answer was read whole and the server keeps it open."""
        answer, self.answer = self.answer, None
        if answer is not None and answer._done and self._reusable and not self.closed:  # noqa: SLF001
            self.pool.put(self)
        else:
            self.close()

    def pause_reading(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.resume_reading()

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()


def _expire(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_exception(TimeoutError())


_Key = tuple[str, int, bool]
"""Host, port and whether over TLS."""


class _Pool:
    """Keep-alive connections per host, port and scheme, at most `limit` in use at once."""

    def __init__(
        self, config: ServiceConfig, loop: asyncio.AbstractEventLoop, tls: ssl.SSLContext
    ) -> None:
        self.loop = loop
        self.tls = tls
        self.read_timeout = config.read_timeout
        self.connect_timeout = config.connect_timeout
        self.limit = asyncio.Semaphore(config.max_connections)
        self.idle: dict[_Key, list[_Connection]] = {}

    async def get(self, key: _Key) -> _Connection:
        """An idle connection to `key` still open, else a new one (the caller holds `limit`)."""
        idle = self.idle.get(key)
        now = time.monotonic()
        while idle:
            conn = idle.pop()
            if not conn.closed and now - conn.idle_since < _KEEPALIVE_SECONDS:
                conn.reused = True
                return conn
            conn.close()
        host, port, tls = key
        # The handshake is part of connecting: within connect_timeout, as with aiohttp. The name
        # checked against the certificate (and sent as SNI) is the URL's host, as aiohttp's.
        opened = (
            self.loop.create_connection(
                lambda: _Connection(self, key),
                host,
                port,
                ssl=self.tls,
                server_hostname=host.rstrip("."),
            )
            if tls
            else self.loop.create_connection(lambda: _Connection(self, key), host, port)
        )
        _, conn = await asyncio.wait_for(opened, self.connect_timeout)
        return conn

    def put(self, conn: _Connection) -> None:
        conn.idle_since = time.monotonic()
        self.idle.setdefault(conn.key, []).append(conn)

    def close(self) -> None:
        for conns in self.idle.values():
            for conn in conns:
                conn.close()
        self.idle.clear()


Redirect = tuple[int, str] | None
"""A redirect the lean path was answered: its status and Location (the fallback goes on)."""


class FullTransport(HttpTransport, Protocol):
    """The transport for everything else (aiohttp's), which also follows a redirect."""

    user_agent: str
    """The User-Agent it sends: the lean path sends the same."""

    @property
    def ssl_context(self) -> ssl.SSLContext:
        """The TLS context of its https connections: the lean path uses the same."""

    async def exchange(
        self,
        request: HttpRequest,
        read: Callable[[Response], Awaitable[T]],
        redirected: Redirect = None,
    ) -> T:
        """As HttpTransport's; `redirected` (status, Location): go on after that redirect."""


class LeanTransport:
    """`HttpTransport` for plain JSON calls over httptools, the rest through `fallback`."""

    def __init__(self, config: ServiceConfig, fallback: FullTransport) -> None:
        self.config = config
        self.fallback = fallback
        self._user_agent = fallback.user_agent
        self._pool: _Pool | None = None
        self._total = config.total_timeout

    async def start(self) -> None:
        """Open the fallback's session; the pool opens connections as they are needed."""
        await self.fallback.start()
        if self._pool is None:
            loop = asyncio.get_running_loop()
            self._pool = _Pool(self.config, loop, self.fallback.ssl_context)

    async def close(self) -> None:
        """Close every pooled connection and the fallback's session."""
        if self._pool is not None:
            self._pool.close()
            self._pool = None
        await self.fallback.close()

    def takes(self, request: HttpRequest) -> bool:
        """Whether `request` goes the lean way (an http(s):// call without form or stream)."""
        body = request.json_body
        return (
            request.form is None
            and request.method in _LEAN_METHODS
            and request.url.startswith(("http://", "https://"))
            and (body is None or _STREAM_MARK not in body)
        )

    async def exchange(self, request: HttpRequest, read: Callable[[Response], Awaitable[T]]) -> T:
        """Send `request` the lean way when it qualifies, else (and for a redirect) via aiohttp."""
        if not self.takes(request):
            return await self.fallback.exchange(request, read)
        if self._pool is None:
            await self.start()
        pool = self._pool
        assert pool is not None
        url = yarl.URL(request.url, encoded=True)
        tls = url.scheme == "https"
        host, port = url.raw_host or "", url.port or (443 if tls else 80)
        head = _request_head(request, url, self._user_agent)
        deadline = pool.loop.time() + self._total
        await pool.limit.acquire()
        conn: _Connection | None = None
        try:
            for retry in (True, False):
                conn = await pool.get((host, port, tls))
                answer = conn.begin(head, request.json_body, deadline)
                try:
                    while not answer.head_done:
                        await conn.wait(answer)
                except (_Closed, OSError):
                    if (
                        retry
                        and conn.reused
                        and not answer.got_bytes
                        and request.method in _IDEMPOTENT
                    ):
                        conn.close()
                        continue
                    raise
                break
            assert conn is not None
            location = answer.headers.get("Location")
            if answer.status in _REDIRECTS and location:
                await answer.read()  # the connection stays usable; aiohttp follows from here
                conn.release()
                conn = None
                return await self.fallback.exchange(request, read, (answer.status, location))
            result = await read(answer)
            if not answer._done:  # noqa: SLF001  (what `read` left unread: the connection goes)
                conn.close()
            return result
        except TimeoutError:
            raise TransportError("timeout", "no answer in time") from None
        except _Closed as exc:
            raise TransportError("cut" if _head_of(conn) else "unreachable", str(exc)) from None
        except OSError as exc:
            cause = connection_cause(exc, ())
            raise TransportError("cut" if _head_of(conn) else "unreachable", cause) from None
        finally:
            if conn is not None:
                conn.release()
            pool.limit.release()


def _head_of(conn: _Connection | None) -> bool:
    """Whether the head of the answer had arrived (then a failure cut the body short)."""
    return conn is not None and conn.answer is not None and conn.answer.head_done


def _request_head(request: HttpRequest, url: yarl.URL, user_agent: str) -> bytes:
    """The request head as aiohttp writes it: Host, the request's headers, its defaults, the length
    (no Content-Type of its own: the request carries it, as aiohttp is told to skip its own)."""
    target = url.raw_path_qs
    port = url.port
    host = url.raw_host or ""
    if ":" in host:
        host = f"[{host}]"
    if port is not None and not url.is_default_port():
        host = f"{host}:{port}"
    lines = [f"{request.method} {target} HTTP/1.1", f"Host: {host}"]
    names = set()
    for name, value in request.headers.items():
        lines.append(f"{name}: {value}")
        names.add(name.lower())
    body = request.json_body
    if "accept" not in names:
        lines.append("Accept: */*")
    if "accept-encoding" not in names:
        lines.append("Accept-Encoding: gzip, deflate")
    if "user-agent" not in names:
        lines.append(f"User-Agent: {user_agent}")
    if body is not None:
        lines.append(f"Content-Length: {len(body)}")
    elif request.method not in _BODYLESS:
        lines.append("Content-Length: 0")  # aiohttp's for a method that expects a body
    return ("\r\n".join(lines) + "\r\n\r\n").encode("utf-8")
