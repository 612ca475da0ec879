"""The HTTP transport: the bridge's only use of aiohttp (one pooled session), behind a seam.

`ServiceClient` (bridge/service.py) decides what to send again and how to read an answer; this
adapter only makes one exchange and reports failures below HTTP as `TransportError`. Tests put a
fake transport in its place (tests/test_service.py).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any, Literal, Protocol, TypeVar

import aiohttp
import yarl

from bridge import compat
from bridge.config import ServiceConfig
from bridge.neterrors import connection_cause
from bridge.request import HttpRequest

T = TypeVar("T")

# Part types when the form names none: what aiohttp gives a str and a bytes value.
_TEXT_PART_TYPE = "text/plain; charset=utf-8"
_FILE_PART_TYPE = "application/octet-stream"


class Body(Protocol):
    """A response body being received."""

    async def read(self) -> bytes:
        """The rest of the body."""

    def iter_any(self) -> AsyncIterator[bytes]:
        """The body in chunks as they arrive."""


class Response(Protocol):
    """An HTTP response whose head has arrived (aiohttp's ClientResponse is one)."""

    @property
    def status(self) -> int:
        """The status code."""

    @property
    def reason(self) -> str | None:
        """The reason phrase."""

    @property
    def headers(self) -> Mapping[str, str]:
        """The headers (case-insensitive lookups)."""

    @property
    def content(self) -> Body:
        """The body."""


class TransportError(Exception):
    """An exchange failed below HTTP: `timeout`, `cut` (the body broke off) or `unreachable`."""

    def __init__(self, kind: Literal["timeout", "cut", "unreachable"], detail: str) -> None:
        super().__init__(detail)
        self.kind = kind


class HttpTransport(Protocol):
    """Makes one HTTP exchange at a time; pooled connections live between `start` and `close`."""

    async def start(self) -> None:
        """Open the connection pool (idempotent)."""

    async def close(self) -> None:
        """Close the pool."""

    async def exchange(self, request: HttpRequest, read: Callable[[Response], Awaitable[T]]) -> T:
        """Send `request` and return what `read` makes of the response, read while it lasts;
        raise TransportError when the exchange fails below HTTP."""


class AiohttpTransport:
    """`HttpTransport` over one pooled aiohttp.ClientSession."""

    def __init__(self, config: ServiceConfig) -> None:
        self.config = config
        self._session: aiohttp.ClientSession | None = None
        self._timeout = aiohttp.ClientTimeout(
            total=config.total_timeout,
            connect=config.connect_timeout,
            sock_read=config.read_timeout,
        )

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

    async def exchange(self, request: HttpRequest, read: Callable[[Response], Awaitable[T]]) -> T:
        """Send `request`; `read` reads the response; aiohttp's failures as TransportError."""
        await self.start()
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
                request.method, yarl.URL(request.url, encoded=True), headers=headers, data=data
            ) as resp:
                return await read(resp)
        except (TimeoutError, aiohttp.ServerTimeoutError):
            raise TransportError("timeout", "no answer in time") from None
        except aiohttp.ClientPayloadError as exc:
            raise TransportError("cut", type(exc).__name__) from None
        except (aiohttp.ClientError, OSError) as exc:
            # The cause in words ("connection refused"), not aiohttp's class name.
            raise TransportError("unreachable", connection_cause(exc)) from None
