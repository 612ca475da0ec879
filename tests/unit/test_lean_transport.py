"""The lean HTTP path against a real socket server, over plain HTTP and over TLS (certificates
made here with trustme): aiohttp's request bytes, every body framing, keep-alive, timeouts and
broken answers, certificates refused as aiohttp refuses them, and what it leaves to aiohttp."""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import ssl
import zlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any, cast

import pytest
import trustme
import uvloop

from bridge.config import ServiceConfig
from bridge.errors import UpstreamUnavailable
from bridge.runtime.daemon import http_transport
from bridge.service.aiohttp_transport import AiohttpTransport, Hop
from bridge.service.client import ServiceClient
from bridge.service.lean_transport import LeanTransport
from bridge.service.models import FormPart, HttpRequest
from bridge.service.transport import HttpTransport, Response, TransportError

SCHEMES = ("http", "https")
CA = trustme.CA()
SERVER_CERT = CA.issue_cert("127.0.0.1", "localhost")
OTHER_NAME_CERT = CA.issue_cert("api.example.test")


def server_context(cert: trustme.LeafCert = SERVER_CERT) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    cert.configure_cert(context)
    return context


def client_context() -> ssl.SSLContext:
    """The bridge's verified context (as aiohttp makes it) trusting the test CA besides."""
    context = ssl.create_default_context()
    CA.configure_trust(context)
    context.set_alpn_protocols(("http/1.1",))
    return context


CLIENT_CONTEXT = client_context()

OK_HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"

MakePair = Callable[..., tuple[LeanTransport, AiohttpTransport]]
"""`lean_pair(url, read_timeout=2.0)`: a lean transport and an aiohttp one for `url`."""
Answerer = Callable[[int, bytes], list[bytes] | None]
"""(request number, request bytes) -> the chunks to send back (None: say nothing, keep open)."""


@dataclass
class RawServer:
    """An HTTP/1.1 server on real sockets that records each request's bytes as they arrived."""

    answer: Answerer
    scheme: str = "http"
    cert: trustme.LeafCert = SERVER_CERT
    requests: list[bytes] = field(default_factory=list)
    names: list[str | None] = field(default_factory=list)
    """The host name each TLS client sent (SNI)."""
    connections: int = 0
    port: int = 0
    close_after: bool = False
    _server: asyncio.Server | None = None

    async def __aenter__(self) -> RawServer:
        tls = None
        if self.scheme == "https":
            tls = server_context(self.cert)
            tls.sni_callback = lambda sock, name, context: self.names.append(name)
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0, ssl=tls)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()

    @property
    def url(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.port}/v1"

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":")[1])
                body = await reader.readexactly(length)
                self.requests.append(head + body)
                chunks = self.answer(len(self.requests), head + body)
                if chunks is None:
                    await reader.read()  # hold the connection until the client gives up
                    return
                for chunk in chunks:
                    writer.write(chunk)
                    await writer.drain()
                if self.close_after or any(b"Connection: close" in c for c in chunks):
                    return
        except (asyncio.IncompleteReadError, ConnectionError, ssl.SSLError):
            return
        finally:
            writer.close()


def json_answer(body: bytes = b'{"ok": true}', extra: bytes = b"") -> list[bytes]:
    return [OK_HEAD + extra + b"Content-Length: %d\r\n\r\n" % len(body) + body]


def config(url: str, read_timeout: float = 2.0) -> ServiceConfig:
    return ServiceConfig(
        api_base=url, connect_timeout=2.0, read_timeout=read_timeout, total_timeout=5.0
    )


class CountingAiohttp(AiohttpTransport):
    """aiohttp's transport, counting the exchanges it makes (as the lean path's fallback)."""

    exchanges = 0

    async def exchange(
        self, request: HttpRequest, read: Callable[[Response], Any], redirected: Hop = None
    ) -> Any:
        self.exchanges += 1
        return await super().exchange(request, read, redirected)


@contextlib.asynccontextmanager
async def pairs(trusted: ssl.SSLContext | None = CLIENT_CONTEXT) -> AsyncIterator[MakePair]:
    """Make transport pairs, trusting `trusted` (None: aiohttp's default context); all closed
    at the end."""
    made: list[HttpTransport] = []

    def make(url: str, read_timeout: float = 2.0) -> tuple[LeanTransport, AiohttpTransport]:
        fallback = CountingAiohttp(config(url, read_timeout), trusted)
        lean = LeanTransport(config(url, read_timeout), fallback)
        plain = AiohttpTransport(config(url), trusted)
        made.extend([lean, plain])
        return lean, plain

    try:
        yield make
    finally:
        for transport in made:
            await transport.close()


@pytest.fixture
async def lean_pair() -> AsyncIterator[MakePair]:
    async with pairs() as make:
        yield make


@pytest.fixture(params=SCHEMES)
def scheme(request: pytest.FixtureRequest) -> str:
    """Each test of a lean exchange over plain HTTP and over TLS."""
    return str(request.param)


def lean_exchanges(lean: LeanTransport) -> bool:
    """Whether every exchange so far went the lean way (none through aiohttp)."""
    return cast(CountingAiohttp, lean.fallback).exchanges == 0


async def body_of(response: Response) -> tuple[int, bytes]:
    return response.status, await response.content.read()


REQUESTS = [
    HttpRequest(
        "POST",
        "/chat/completions?x=a%20b",
        {"Authorization": "Bearer sk-test", "Accept": "application/json", "OpenAI-Beta": "v2"},
        json_body=b'{"model": "gpt-4o-mini", "messages": []}',
    ),
    HttpRequest("GET", "/models/gpt-4o?include[]=a", {"Authorization": "Bearer sk-test"}),
    HttpRequest("DELETE", "/files/file-1", {"api-key": "k", "Accept": "application/json"}),
    HttpRequest("POST", "/batches/b1/cancel", {"Authorization": "Bearer sk-test"}),
    HttpRequest(
        "POST",
        "/embeddings",
        {"Authorization": "Bearer sk-test", "Content-Type": "application/json", "X-Ü": "é"},
        json_body='{"input": "grüße"}'.encode(),
    ),
    HttpRequest(
        "POST",
        "/chat/completions",
        {"Authorization": "Bearer sk-test", "Content-Type": "application/json"},
        json_body=b'{"image": "' + b"A" * (1 << 20) + b'"}',
    ),
]


@pytest.mark.parametrize("request_", REQUESTS, ids=lambda r: f"{r.method} {r.url}")
async def test_the_lean_path_sends_the_bytes_aiohttp_sends(
    request_: HttpRequest, scheme: str, lean_pair: MakePair
) -> None:
    async with RawServer(lambda n, raw: json_answer(), scheme) as server:
        lean, plain = lean_pair(server.url)
        request_ = HttpRequest(
            request_.method, server.url + request_.url, request_.headers, request_.json_body
        )
        assert lean.takes(request_)
        assert await plain.exchange(request_, body_of) == (200, b'{"ok": true}')
        assert await lean.exchange(request_, body_of) == (200, b'{"ok": true}')
        assert server.requests[1] == server.requests[0]
        assert server.connections == 2 and lean_exchanges(lean)


def chat(url: str, method: str = "POST") -> HttpRequest:
    body = b'{"model": "m"}' if method == "POST" else None
    headers = {"Authorization": "Bearer sk-test", "Content-Type": "application/json"}
    return HttpRequest(method, url + "/chat/completions", headers if body else {}, body)


GZIPPED = gzip.compress(b'{"zipped": true}')
DEFLATED = zlib.compress(b'{"deflated": true}')
FRAMINGS = {
    "content-length": (json_answer(b'{"a": 1}'), b'{"a": 1}'),
    "chunked": (
        [OK_HEAD + b'Transfer-Encoding: chunked\r\n\r\n4\r\n{"a"\r\n', b"4\r\n: 2}\r\n0\r\n\r\n"],
        b'{"a": 2}',
    ),
    "until-close": ([OK_HEAD + b"Connection: close\r\n\r\n", b'{"a": 3}'], b'{"a": 3}'),
    "gzip": (json_answer(GZIPPED, b"Content-Encoding: gzip\r\n"), b'{"zipped": true}'),
    "deflate": (json_answer(DEFLATED, b"Content-Encoding: deflate\r\n"), b'{"deflated": true}'),
    "204": ([b"HTTP/1.1 204 No Content\r\n\r\n"], b""),
    "after-100": ([b"HTTP/1.1 100 Continue\r\n\r\n", *json_answer(b'{"a": 4}')], b'{"a": 4}'),
}


@pytest.mark.parametrize("framing", FRAMINGS)
async def test_every_body_framing_reads_as_aiohttp_reads_it(
    framing: str, scheme: str, lean_pair: MakePair
) -> None:
    chunks, expected = FRAMINGS[framing]
    async with RawServer(lambda n, raw: chunks, scheme) as server:
        lean, plain = lean_pair(server.url)
        status = 204 if framing == "204" else 200
        assert await plain.exchange(chat(server.url), body_of) == (status, expected)
        assert await lean.exchange(chat(server.url), body_of) == (status, expected)


async def test_a_stream_is_read_in_pieces_as_they_arrive(
    scheme: str,
    lean_pair: MakePair,
) -> None:
    head = OK_HEAD.replace(b"application/json", b"text/event-stream")
    events = [
        head + b"Transfer-Encoding: chunked\r\n\r\n",
        b"6\r\ndata 1\r\n",
        b"6\r\ndata 2\r\n0\r\n\r\n",
    ]

    async def pieces(response: Response) -> bytes:
        return b"|".join([piece async for piece in response.content.iter_any()])

    async with RawServer(lambda n, raw: events, scheme) as server:
        lean, _ = lean_pair(server.url)
        got = await lean.exchange(chat(server.url, "GET"), pieces)
        assert got.replace(b"|", b"") == b"data 1data 2"


async def test_connections_are_kept_alive_and_not_reused_after_close(
    scheme: str,
    lean_pair: MakePair,
) -> None:
    def answer(n: int, raw: bytes) -> list[bytes]:
        return json_answer(extra=b"Connection: close\r\n" if n == 3 else b"")

    async with RawServer(answer, scheme) as server:
        lean, _ = lean_pair(server.url)
        for _ in range(3):
            assert (await lean.exchange(chat(server.url), body_of))[0] == 200
        assert server.connections == 1
        assert (await lean.exchange(chat(server.url), body_of))[0] == 200
        assert server.connections == 2


async def test_a_get_on_a_reused_connection_the_server_closed_is_sent_again_once(
    scheme: str,
    lean_pair: MakePair,
) -> None:
    async with RawServer(lambda n, raw: json_answer(), scheme) as server:
        server.close_after = True  # answers keep-alive, then hangs up
        lean, _ = lean_pair(server.url)
        # The hang-up and the next request cross: a GET goes again on a new connection, as
        # aiohttp does for idempotent methods (a POST fails as `unreachable`, and the service
        # client's retry rules decide, as with aiohttp).
        for _ in range(3):
            assert (await lean.exchange(chat(server.url, "GET"), body_of))[0] == 200
        assert server.connections == 3
        assert len(server.requests) == 3


async def test_no_answer_in_time_is_a_timeout_and_the_connection_is_dropped(
    scheme: str,
    lean_pair: MakePair,
) -> None:
    async with RawServer(lambda n, raw: None if n == 1 else json_answer(), scheme) as server:
        lean, _ = lean_pair(server.url, read_timeout=0.2)
        with pytest.raises(TransportError) as caught:
            await lean.exchange(chat(server.url), body_of)
        assert caught.value.kind == "timeout"
        assert (await lean.exchange(chat(server.url), body_of))[0] == 200
        assert server.connections == 2


async def test_a_body_cut_short_is_cut_and_a_refused_connection_unreachable(
    scheme: str,
    lean_pair: MakePair,
) -> None:
    short = [OK_HEAD + b'Content-Length: 100\r\nConnection: close\r\n\r\n{"a"']
    async with RawServer(lambda n, raw: short, scheme) as server:
        lean, _ = lean_pair(server.url)
        with pytest.raises(TransportError) as caught:
            await lean.exchange(chat(server.url), body_of)
        assert caught.value.kind == "cut"
        gone = server.url
    lean, _ = lean_pair(gone)
    with pytest.raises(TransportError) as caught:
        await lean.exchange(chat(gone), body_of)
    assert (caught.value.kind, str(caught.value)) == ("unreachable", "connection refused")


async def test_a_redirect_is_followed_through_aiohttp_without_the_key_elsewhere(
    scheme: str,
    lean_pair: MakePair,
) -> None:
    async with RawServer(lambda n, raw: json_answer(b'{"moved": true}'), scheme) as target:
        # Another origin (localhost, not 127.0.0.1): the key must not follow.
        location = f"{scheme}://localhost:{target.port}/v2/chat".encode()
        moved = [
            b"HTTP/1.1 307 Temporary Redirect\r\nLocation: "
            + location
            + b"\r\nContent-Length: 0\r\n\r\n"
        ]
        async with RawServer(lambda n, raw: moved, scheme) as origin:
            lean, _ = lean_pair(origin.url)
            assert await lean.exchange(chat(origin.url), body_of) == (200, b'{"moved": true}')
        sent = target.requests[0]
        assert sent.startswith(b"POST /v2/chat HTTP/1.1\r\n") and sent.endswith(b'{"model": "m"}')
        assert b"Authorization" not in sent and b"sk-test" not in sent


async def test_a_large_body_is_read_only_as_fast_as_the_reader_takes_it(
    scheme: str,
    lean_pair: MakePair,
) -> None:
    size = 16 << 20
    chunked = [OK_HEAD + b"Transfer-Encoding: chunked\r\n\r\n"]
    chunked += [b"100000\r\n" + b"x" * (1 << 20) + b"\r\n" for _ in range(size >> 20)]
    chunked.append(b"0\r\n\r\n")
    held: list[int] = []

    async def first_mebibyte(response: Response) -> int:
        got = 0
        async for piece in response.content.iter_any():
            got += len(piece)
            held.append(response.content._unread)  # type: ignore[attr-defined]  # noqa: SLF001
            if got >= 1 << 20:
                break
        return got

    async with RawServer(lambda n, raw: chunked, scheme) as server:
        lean, _ = lean_pair(server.url)
        got = await lean.exchange(chat(server.url, "GET"), first_mebibyte)
        assert 1 << 20 <= got < 4 << 20  # the reader stopped; the rest was never buffered
        assert max(held) <= 1 << 20  # unread bytes stay near the high-water mark (256 KiB)
        assert (await lean.exchange(chat(server.url, "GET"), body_of))[1] == b"x" * size
        assert server.connections == 2  # the half-read connection was not used again


async def test_forms_streams_and_https_are_left_to_aiohttp(
    lean_pair: MakePair,
) -> None:
    lean, _ = lean_pair("http://127.0.0.1:9/v1")
    base = "http://127.0.0.1:9/v1"
    form = HttpRequest("POST", base + "/files", {}, form=(FormPart("purpose", b"batch"),))
    stream = HttpRequest("POST", base + "/chat", {}, b'{"stream": true, "model": "m"}')
    tls = HttpRequest("POST", "https://api.openai.com/v1/chat", {}, b"{}")
    assert [lean.takes(r) for r in (form, stream, tls, chat(base))] == [False, False, True, True]


async def failure(transport: HttpTransport, url: str) -> tuple[str, str, str]:
    """How an exchange with `url` fails: the transport's kind and cause, and the error code and
    message the service client makes of it (one try)."""
    with pytest.raises(TransportError) as caught:
        await transport.exchange(chat(url), body_of)
    service = ServiceClient(ServiceConfig(api_base=url, max_retries=0), transport)
    with pytest.raises(UpstreamUnavailable) as error:
        await service.send(chat(url))
    return caught.value.kind, str(caught.value), f"{error.value.code}: {error.value}"


@pytest.mark.parametrize("problem", ["untrusted", "other-name"])
async def test_a_bad_certificate_is_refused_as_aiohttp_refuses_it(problem: str) -> None:
    # aiohttp's default context (the system's CA store) does not know the test CA; the trusting
    # one does, but the certificate names another host.
    trusted, cert = (
        (None, SERVER_CERT) if problem == "untrusted" else (CLIENT_CONTEXT, OTHER_NAME_CERT)
    )
    async with (
        pairs(trusted) as make,
        RawServer(lambda n, raw: json_answer(), "https", cert) as server,
    ):
        lean, plain = make(server.url)
        lean_failure, plain_failure = (
            await failure(lean, server.url),
            await failure(plain, server.url),
        )
        assert lean_failure == plain_failure
        assert lean_exchanges(lean)
        assert lean_failure[0] == "unreachable"
        assert lean_failure[1].startswith("TLS certificate not trusted (")
        assert lean_failure[2].startswith("upstream_unavailable: cannot reach service host")
        assert server.requests == []  # nothing was sent, the key least of all


async def test_https_is_lean_with_the_url_host_checked_and_sent_as_sni(lean_pair: MakePair) -> None:
    async with RawServer(lambda n, raw: json_answer(), "https") as server:
        url = f"https://localhost:{server.port}/v1"
        lean, plain = lean_pair(url)
        assert await plain.exchange(chat(url), body_of) == (200, b'{"ok": true}')
        for _ in range(2):
            assert await lean.exchange(chat(url), body_of) == (200, b'{"ok": true}')
        assert server.names == ["localhost", "localhost"]  # one handshake each: kept alive
        assert server.requests[2] == server.requests[1] == server.requests[0]
        assert lean_exchanges(lean)


def test_every_case_above_passes_on_uvloop_too() -> None:
    """uvloop (the bridge's loop where installed) has transports of its own: the same cases."""
    cases: list[tuple[Callable[..., Any], tuple[Any, ...]]] = [
        *(
            (test_the_lean_path_sends_the_bytes_aiohttp_sends, (r, s))
            for r in REQUESTS
            for s in SCHEMES
        ),
        *(
            (test_every_body_framing_reads_as_aiohttp_reads_it, (f, s))
            for f in FRAMINGS
            for s in SCHEMES
        ),
        *(
            (case, (s,))
            for case in (
                test_a_stream_is_read_in_pieces_as_they_arrive,
                test_connections_are_kept_alive_and_not_reused_after_close,
                test_a_get_on_a_reused_connection_the_server_closed_is_sent_again_once,
                test_no_answer_in_time_is_a_timeout_and_the_connection_is_dropped,
                test_a_body_cut_short_is_cut_and_a_refused_connection_unreachable,
                test_a_redirect_is_followed_through_aiohttp_without_the_key_elsewhere,
                test_a_large_body_is_read_only_as_fast_as_the_reader_takes_it,
            )
            for s in SCHEMES
        ),
    ]

    async def run(case: Callable[..., Any], args: tuple[Any, ...]) -> None:
        async with pairs() as make:
            await case(*args, make)

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        for case, args in cases:
            runner.run(run(case, args))
        for problem in ("untrusted", "other-name"):
            runner.run(test_a_bad_certificate_is_refused_as_aiohttp_refuses_it(problem))


def test_the_switch_picks_the_path() -> None:
    on, off = config("http://127.0.0.1:9/v1"), ServiceConfig(lean_http=False)
    assert isinstance(http_transport(on), LeanTransport)
    assert isinstance(http_transport(ServiceConfig()), LeanTransport)  # https://api.openai.com
    assert type(http_transport(off)) is AiohttpTransport
