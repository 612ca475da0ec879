"""The seam between the service client and an HTTP library: one exchange, and how it fails.

`ServiceClient` (bridge/service/client.py) decides what to send again and how to read an answer; a
transport (bridge/service/aiohttp_transport.py, or a test's fake) only makes one exchange.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Literal, Protocol, TypeVar

from bridge.service.models import HttpRequest

T = TypeVar("T")


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
    """An exchange failed below HTTP: `timeout`, `cut` (the body broke off), `unreachable` or
    `redirect` (a redirect to a location that cannot be followed)."""

    def __init__(
        self, kind: Literal["timeout", "cut", "unreachable", "redirect"], detail: str
    ) -> None:
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
