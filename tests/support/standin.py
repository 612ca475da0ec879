"""A stand-in for the OpenAI REST API: a real aiohttp server that records and scripts."""

from __future__ import annotations

import asyncio
import contextlib
import json as jsonlib
import re
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Final, NamedTuple, Self
from urllib.parse import parse_qsl

from aiohttp import web
from aiohttp.base_protocol import BaseProtocol
from aiohttp.multipart import BodyPartReader, MultipartReader
from aiohttp.streams import StreamReader
from multidict import CIMultiDict, CIMultiDictProxy

__all__ = [
    "GATE_TIMEOUT",
    "UNSET",
    "Gate",
    "Part",
    "RecordedRequest",
    "Reply",
    "Responder",
    "Script",
    "Standin",
    "summarize",
]

GATE_TIMEOUT: Final = 60.0
"""Seconds an SSE answer waits at most on a Gate the test never opens."""


class _Unset:
    """Marker for "no JSON given" (None means JSON null)."""

    def __repr__(self) -> str:
        return "UNSET"


UNSET: Final = _Unset()


class Part(NamedTuple):
    """One part of a multipart body, bytes exactly as sent."""

    name: str | None
    filename: str | None
    content_type: str | None
    data: bytes


@dataclass(frozen=True, eq=False)
class RecordedRequest:
    """One request as the stand-in received it."""

    index: int  #: 1-based arrival number; the answer carried `x-request-id: req_<index>`
    method: str
    path: str  #: raw path (percent-encoding kept), without the base and the query
    raw_path: str  #: the request target exactly as received: base, path and query
    query_string: str  #: raw query, without `?`
    query: list[tuple[str, str]]  #: decoded (key, value) pairs in order, blanks kept
    headers: CIMultiDict[str]
    body: bytes
    parts: list[Part] | None  #: multipart bodies only
    received_at: float  #: time.monotonic() when the headers arrived
    multipart_error: str | None = None  #: why a multipart body did not parse
    client_gone: threading.Event = field(default_factory=threading.Event, repr=False)
    done: threading.Event = field(default_factory=threading.Event, repr=False)

    def json(self) -> Any:
        """The body parsed as JSON, or None when it is empty or not JSON."""
        if not self.body:
            return None
        try:
            return jsonlib.loads(self.body)
        except ValueError:
            return None

    @property
    def content_type(self) -> str | None:
        """The Content-Type header (with parameters) or None."""
        return self.headers.get("Content-Type")

    def part(self, name: str) -> Part:
        """The first multipart part called `name` (KeyError if none)."""
        for part in self.parts or ():
            if part.name == name:
                return part
        raise KeyError(name)

    def form(self) -> list[tuple[str, str]]:
        """Non-file multipart fields as decoded (name, value) pairs, in order."""
        return [
            (part.name or "", part.data.decode("utf-8"))
            for part in self.parts or ()
            if part.filename is None
        ]


class Gate:
    """Holds an SSE answer before one of its events until the test opens it (from any thread):
    the test sees what the client made of the events before it, then lets the rest go."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._opened = False
        self._waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = []

    def open(self) -> None:
        """Let the held answer go on (again: nothing)."""
        with self._lock:
            self._opened = True
            waiters, self._waiters = self._waiters, []
        for loop, event in waiters:
            with contextlib.suppress(RuntimeError):  # the stand-in stopped meanwhile
                loop.call_soon_threadsafe(event.set)

    async def wait(self) -> None:
        """Return once opened."""
        event = asyncio.Event()
        with self._lock:
            if self._opened:
                return
            self._waiters.append((asyncio.get_running_loop(), event))
        await event.wait()


@dataclass(frozen=True)
class Reply:
    """A programmed answer.

    Body: `json` (any JSON value, None is `null`), else `text`, else `body` bytes.
    `delay` seconds pass before anything is sent (a simulated latency).
    `sse`: a list of (event name or None, data) sent as server-sent events, `sse_delay`
    between them, then `data: [DONE]` when `sse_done` and the script did not end with it.
    `sse_gates`: event number -> a Gate the answer waits on before sending that event
    (at most GATE_TIMEOUT seconds, cut short when the stand-in stops).
    `cut`: close the connection mid-body (an SSE stream after its events, without the
    [DONE]; any other body after half of it, the Content-Length promising all of it).
    `hang`: never answer; the handler waits until the client goes away or the
    stand-in stops.
    """

    status: int = 200
    json: Any = UNSET
    text: str | None = None
    body: bytes | None = None
    headers: Mapping[str, str] = field(default_factory=dict)
    content_type: str | None = None
    delay: float = 0.0
    sse: Sequence[tuple[str | None, str]] | None = None
    sse_delay: float = 0.0
    sse_done: bool = True
    sse_gates: Mapping[int, Gate] = field(default_factory=dict)
    cut: bool = False
    hang: bool = False

    @classmethod
    def error(
        cls,
        status: int,
        message: str = "stand-in error",
        *,
        type: str = "invalid_request_error",
        code: str | None = None,
        param: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> Reply:
        """An OpenAI-style error body with `status`."""
        error = {"message": message, "type": type, "param": param, "code": code}
        return cls(status=status, json={"error": error}, headers=dict(headers or {}))


Responder = Reply | Callable[[RecordedRequest], Reply]
PathPattern = str | re.Pattern[str]


class Script:
    """Answers for one (method, path pattern): consumed in order, the last one repeats."""

    def __init__(self, method: str, pattern: PathPattern, responses: Sequence[Responder]) -> None:
        if not responses:
            raise ValueError("script() needs at least one response")
        self.method = method.upper()
        self.pattern = pattern
        self.responses = list(responses)
        self.calls = 0  #: how many requests this script answered

    def matches(self, method: str, path: str) -> bool:
        """Whether the script answers `method path` (method "*" matches all)."""
        if self.method not in ("*", method):
            return False
        if isinstance(self.pattern, re.Pattern):
            return self.pattern.fullmatch(path) is not None
        return self.pattern == path

    def next_responder(self) -> Responder:
        """The response for the next call (call under the stand-in's lock)."""
        responder = self.responses[min(self.calls, len(self.responses) - 1)]
        self.calls += 1
        return responder

    def __repr__(self) -> str:
        return f"<Script {self.method} {self.pattern!r} calls={self.calls}>"


def _sse_frame(event: str | None, data: str) -> bytes:
    lines = [f"event: {event}"] if event is not None else []
    lines += [f"data: {line}" for line in data.split("\n")]
    return ("\n".join(lines) + "\n\n").encode("utf-8")


async def _parse_multipart(headers: CIMultiDictProxy[str], body: bytes) -> list[Part]:
    """Parse a complete multipart body with aiohttp's reader, keeping bytes exact."""
    loop = asyncio.get_running_loop()
    stream = StreamReader(BaseProtocol(loop), limit=max(2**16, len(body) + 1), loop=loop)
    stream.feed_data(body)
    stream.feed_eof()
    reader = MultipartReader(headers, stream)
    parts: list[Part] = []
    for _ in range(100_000):
        item = await reader.next()
        if item is None:
            break
        if not isinstance(item, BodyPartReader):
            raise ValueError("nested multipart bodies are not supported by the stand-in")
        data = await item.read(decode=False)
        parts.append(Part(item.name, item.filename, item.headers.get("Content-Type"), data))
    return parts


class Standin:
    """An HTTP server on 127.0.0.1 (free port) in its own thread and event loop.

    Every request is recorded; answers come from scripts, else the default reply,
    else `{"object": "standin", "method", "path", "echo"}`. Paths outside `base`
    get a 404 error body, so a wrong base URL shows up.
    """

    host = "127.0.0.1"

    def __init__(self, base: str = "/v1", tls: ssl.SSLContext | None = None) -> None:
        self.base = base.rstrip("/")
        self.tls = tls
        """Serve https with this context (None: plain http)."""
        self.port = 0
        self._cond = threading.Condition()
        self._requests: list[RecordedRequest] = []
        self._scripts: list[Script] = []
        self._default: Responder | None = None
        self._latency = 0.0
        self._counter = 0
        self._answered: dict[int, float] = {}
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping: asyncio.Event | None = None

    # ----------------------------------------------------------------- lifecycle
    @property
    def origin(self) -> str:
        """`http://127.0.0.1:<port>` (`https://` with `tls`)."""
        return f"{'https' if self.tls else 'http'}://{self.host}:{self.port}"

    @property
    def url(self) -> str:
        """The base URL clients are configured with, e.g. `http://127.0.0.1:<port>/v1`."""
        return self.origin + self.base

    def start(self, timeout: float = 10.0) -> Self:
        """Start the server thread; returns once the port is listening."""
        if self._thread is not None:
            raise RuntimeError("stand-in already started")
        self._thread = threading.Thread(target=self._run, name="standin-http", daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout):
            raise TimeoutError(f"stand-in did not start within {timeout}s")
        if self._error is not None:
            self._thread.join(timeout)
            raise RuntimeError("stand-in failed to start") from self._error
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Wake hanging and delayed handlers, close the server, join the thread."""
        thread, loop, stopping = self._thread, self._loop, self._stopping
        if thread is None:
            return
        if loop is not None and stopping is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):  # the loop finished meanwhile
                loop.call_soon_threadsafe(stopping.set)
        thread.join(timeout)
        if thread.is_alive():
            raise TimeoutError(f"stand-in thread did not stop within {timeout}s")
        self._thread = None

    def _run(self) -> None:
        try:
            asyncio.run(self._main())
        except BaseException as exc:  # noqa: BLE001  (reported to start(); the thread just ends)
            if not self._ready.is_set():
                self._error = exc
                self._ready.set()

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stopping = asyncio.Event()
        server = web.Server(self._handle, handler_cancellation=True, access_log=None)
        runner = web.ServerRunner(server, shutdown_timeout=2.0)
        await runner.setup()
        try:
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            try:
                sock.bind((self.host, 0))
                self.port = sock.getsockname()[1]
                site = web.SockSite(runner, sock, ssl_context=self.tls)
                await site.start()
            except BaseException:
                sock.close()
                raise
            self._ready.set()
            await self._stopping.wait()
        finally:
            await runner.cleanup()

    def __enter__(self) -> Self:
        if self._thread is None:
            self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # ----------------------------------------------------------------- recording
    @property
    def requests(self) -> list[RecordedRequest]:
        """A copy of the requests recorded so far, in arrival order."""
        with self._cond:
            return list(self._requests)

    @property
    def last(self) -> RecordedRequest:
        """The most recent request (IndexError if none)."""
        with self._cond:
            return self._requests[-1]

    def answered_at(self, record: RecordedRequest) -> float | None:
        """time.monotonic() when the stand-in finished writing `record`'s whole answer.

        None while it has not (still delayed, hanging, cut, or the client went away first).
        "Finished writing" means the last byte was handed to the kernel: a client killed
        after that moment had been sent the answer, paid for, whether it read it or not.
        """
        with self._cond:
            return self._answered.get(record.index)

    def wait_for_answers(self, n: int, timeout: float = 10.0) -> None:
        """Wait until the stand-in has finished writing at least `n` answers in all."""
        with self._cond:
            if not self._cond.wait_for(lambda: len(self._answered) >= n, timeout):
                raise TimeoutError(
                    f"stand-in finished {len(self._answered)} of {n} answers in {timeout}s"
                )

    def clear(self) -> None:
        """Forget the recorded requests (scripts and defaults stay)."""
        with self._cond:
            self._requests.clear()

    def reset(self) -> None:
        """Forget requests, scripts, the default reply and the latency."""
        with self._cond:
            self._requests.clear()
            self._scripts.clear()
            self._default = None
            self._latency = 0.0

    def wait_for_requests(self, n: int = 1, timeout: float = 10.0) -> list[RecordedRequest]:
        """Wait until at least `n` requests are recorded; returns all recorded so far."""
        with self._cond:
            if not self._cond.wait_for(lambda: len(self._requests) >= n, timeout):
                seen = summarize(self._requests)
                raise TimeoutError(
                    f"stand-in got {len(seen)} of {n} requests in {timeout}s: {seen}"
                )
            return list(self._requests)

    async def wait_for_requests_async(
        self,
        n: int = 1,
        timeout: float = 10.0,  # noqa: ASYNC109 - bounds the worker thread's wait
    ) -> list[RecordedRequest]:
        """`wait_for_requests` without blocking the caller's event loop."""
        return await asyncio.to_thread(self.wait_for_requests, n, timeout)

    # ------------------------------------------------------------------- scripts
    def script(self, method: str, path_pattern: PathPattern, *responses: Responder) -> Script:
        """Answer `method` (or "*") on `path_pattern` (exact path without the base, or a
        compiled regex matched in full) with `responses` in order, repeating the last.
        A response may be a callable receiving the RecordedRequest. Later scripts win."""
        script = Script(method, path_pattern, responses)
        with self._cond:
            self._scripts.append(script)
        return script

    def set_default(self, reply: Responder | None) -> None:
        """The answer for unscripted requests (None: the built-in echo)."""
        with self._cond:
            self._default = reply

    def set_latency(self, seconds: float) -> None:
        """Delay every default answer (built-in echo or set_default) by `seconds`."""
        with self._cond:
            self._latency = seconds

    # ------------------------------------------------------------------- serving
    def _split_target(self, raw_path: str) -> tuple[str, str, bool]:
        path, _, query = raw_path.partition("?")
        if not self.base:
            return path, query, True
        if path == self.base or path.startswith(self.base + "/"):
            return path[len(self.base) :], query, True
        return path, query, False

    async def _record(self, request: web.BaseRequest) -> tuple[RecordedRequest, bool]:
        received_at = time.monotonic()
        body = await request.content.read()
        path, query_string, in_base = self._split_target(request.raw_path)
        parts = None
        multipart_error = None
        if request.content_type.startswith("multipart/"):
            try:
                parts = await _parse_multipart(request.headers, body)
            except Exception as exc:  # noqa: BLE001  (recorded, so a test can assert on it)
                multipart_error = f"{type(exc).__name__}: {exc}"
        with self._cond:
            self._counter += 1
            record = RecordedRequest(
                index=self._counter,
                method=request.method,
                path=path,
                raw_path=request.raw_path,
                query_string=query_string,
                query=parse_qsl(query_string, keep_blank_values=True),
                headers=CIMultiDict(request.headers),
                body=body,
                parts=parts,
                received_at=received_at,
                multipart_error=multipart_error,
            )
            self._requests.append(record)
            self._cond.notify_all()
        return record, in_base

    def _choose(self, record: RecordedRequest, in_base: bool) -> tuple[Reply, bool]:
        """The reply for `record` and whether it is a default answer."""
        if not in_base:
            message = f"{record.raw_path} is outside the stand-in base {self.base}"
            return Reply.error(404, message, code="standin_outside_base"), True
        responder: Responder | None = None
        with self._cond:
            for script in reversed(self._scripts):
                if script.matches(record.method, record.path):
                    responder = script.next_responder()
                    break
            is_default = responder is None
            responder = responder or self._default
        if responder is None:
            echo = {
                "object": "standin",
                "method": record.method,
                "path": record.path,
                "echo": record.json(),
            }
            return Reply(json=echo), True
        return self._resolve(responder, record), is_default

    @staticmethod
    def _resolve(responder: Responder, record: RecordedRequest) -> Reply:
        return responder(record) if callable(responder) else responder

    async def _pause(self, seconds: float) -> None:
        """Sleep `seconds` (simulated latency), cut short when the stand-in stops."""
        if seconds <= 0:
            return
        assert self._stopping is not None
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), seconds)

    async def _held(self, gate: Gate) -> None:
        """Wait for `gate` to open, the stand-in to stop, or GATE_TIMEOUT."""
        assert self._stopping is not None
        waits = [asyncio.ensure_future(gate.wait()), asyncio.ensure_future(self._stopping.wait())]
        try:
            await asyncio.wait(waits, timeout=GATE_TIMEOUT, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiting in waits:
                waiting.cancel()

    async def _handle(self, request: web.BaseRequest) -> web.StreamResponse:
        record, in_base = await self._record(request)
        try:
            reply, is_default = self._choose(record, in_base)
            with self._cond:
                latency = self._latency if is_default else 0.0
            await self._pause(latency + reply.delay)
            return await self._answer(request, record, reply)
        except asyncio.CancelledError:
            record.client_gone.set()
            raise
        finally:
            record.done.set()

    async def _answer(
        self, request: web.BaseRequest, record: RecordedRequest, reply: Reply
    ) -> web.StreamResponse:
        assert self._stopping is not None
        headers = CIMultiDict({"x-request-id": f"req_{record.index}"})
        headers.update(reply.headers)
        if reply.hang:
            await self._stopping.wait()
            self._close_transport(request)
            return web.Response(status=503, headers=headers)
        if reply.sse is not None:
            return await self._answer_sse(request, reply, headers)
        body, content_type = self._body(reply)
        if content_type is not None and "Content-Type" not in headers:
            headers["Content-Type"] = content_type
        if not reply.cut:
            whole = web.Response(status=reply.status, body=body, headers=headers)
            # Written here rather than by aiohttp after the handler returns, so that the moment
            # the last byte left can be recorded.
            await whole.prepare(request)
            # `done` before the body goes out, as when aiohttp wrote it after the handler: a
            # client holding the answer may rely on the handler being finished.
            record.done.set()
            await whole.write_eof()
            self._mark_answered(record)
            return whole
        response = web.StreamResponse(status=reply.status, headers=headers)
        response.content_length = len(body)
        await response.prepare(request)
        await response.write(body[: len(body) // 2])
        self._close_transport(request)
        return response

    @staticmethod
    def _body(reply: Reply) -> tuple[bytes, str | None]:
        if reply.json is not UNSET:
            data = jsonlib.dumps(reply.json).encode("utf-8")
            return data, reply.content_type or "application/json"
        if reply.text is not None:
            return reply.text.encode("utf-8"), reply.content_type or "text/plain; charset=utf-8"
        return reply.body or b"", reply.content_type or (
            "application/octet-stream" if reply.body else None
        )

    def _mark_answered(self, record: RecordedRequest) -> None:
        with self._cond:
            self._answered[record.index] = time.monotonic()
            self._cond.notify_all()

    async def _answer_sse(
        self, request: web.BaseRequest, reply: Reply, headers: CIMultiDict[str]
    ) -> web.StreamResponse:
        assert reply.sse is not None
        headers.setdefault("Content-Type", reply.content_type or "text/event-stream")
        headers.setdefault("Cache-Control", "no-cache")
        response = web.StreamResponse(status=reply.status, headers=headers)
        response.enable_chunked_encoding()
        await response.prepare(request)
        for number, (event, data) in enumerate(reply.sse):
            if number:
                await self._pause(reply.sse_delay)
            if (gate := reply.sse_gates.get(number)) is not None:
                await self._held(gate)
            await response.write(_sse_frame(event, data))
        if reply.cut:
            self._close_transport(request)
            return response
        if reply.sse_done and (not reply.sse or reply.sse[-1][1] != "[DONE]"):
            await response.write(_sse_frame(None, "[DONE]"))
        await response.write_eof()
        return response

    @staticmethod
    def _close_transport(request: web.BaseRequest) -> None:
        """Close the connection after flushing what was written (an incomplete body)."""
        if request.transport is not None:
            request.transport.close()

    def __repr__(self) -> str:
        return f"<Standin {self.url} requests={len(self.requests)}>"


def summarize(requests: Iterable[RecordedRequest]) -> list[str]:
    """`METHOD raw_path` per request: handy in assertion messages."""
    return [f"{r.method} {r.raw_path}" for r in requests]
