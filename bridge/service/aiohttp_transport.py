"""The aiohttp HTTP transport: the bridge's only use of aiohttp (one pooled session).

`ServiceClient` (bridge/service/client.py) decides what to send again and how to read an answer;
this adapter only makes one exchange and reports failures below HTTP as `TransportError`. Tests put
a fake transport in its place (tests/unit/test_service.py).
"""

from __future__ import annotations

import ssl
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import aiohttp
import yarl

from bridge.compat import aiohttp as compat
from bridge.config import ServiceConfig
from bridge.neterrors import connection_cause
from bridge.service.models import HttpRequest
from bridge.service.transport import Response, TransportError

T = TypeVar("T")

# Part types when the form names none: what aiohttp gives a str and a bytes value.
_TEXT_PART_TYPE = "text/plain; charset=utf-8"
_FILE_PART_TYPE = "application/octet-stream"

Hop = tuple[int, str] | None
"""A redirect answered to a request sent elsewhere: its status and Location."""

MAX_REDIRECTS = 10
"""Redirects followed for one request (aiohttp's own default); the last one is the answer."""
_REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})


class AiohttpTransport:
    """`HttpTransport` over one pooled aiohttp.ClientSession."""

    user_agent = aiohttp.http.SERVER_SOFTWARE
    """What aiohttp sends as User-Agent ("Python/3.11 aiohttp/3.14.5")."""

    def __init__(self, config: ServiceConfig, ssl_context: ssl.SSLContext | None = None) -> None:
        self.config = config
        self._ssl_context = ssl_context
        self._credentials = frozenset(
            {"authorization", "proxy-authorization", config.api_key_name.lower()}
            | {name.lower() for name in config.extra_headers}
        )
        """Header names never sent to another origin than the service host's: the key's, and
        every extra header (it may carry a credential)."""
        self._session: aiohttp.ClientSession | None = None
        self._timeout = aiohttp.ClientTimeout(
            total=config.total_timeout,
            connect=config.connect_timeout,
            sock_read=config.read_timeout,
        )

    @property
    def ssl_context(self) -> ssl.SSLContext:
        """The TLS context of https connections (given, else aiohttp's verified default)."""
        if self._ssl_context is None:
            self._ssl_context = compat.verified_ssl_context()
        return self._ssl_context

    async def start(self) -> None:
        """Open the pooled session (idempotent)."""
        if self._session is None:
            connector = aiohttp.TCPConnector(
                limit=self.config.max_connections,
                ttl_dns_cache=300,
                enable_cleanup_closed=False,
                ssl=self.ssl_context,
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

    async def exchange(
        self, request: HttpRequest, read: Callable[[Response], Awaitable[T]], redirected: Hop = None
    ) -> T:
        """Send `request`, following redirects; `read` reads the final response; aiohttp's
        failures as TransportError. `redirected`: another transport sent it and was answered
        with this redirect (status, Location); go on from there as if it had been sent here."""
        await self.start()
        assert self._session is not None
        method, url = request.method, yarl.URL(request.url, encoded=True)
        headers, with_body = dict(request.headers), True
        origin = url.origin()
        hops = 0
        try:
            while True:
                if redirected is not None:
                    status, target = redirected
                    redirected = None
                    hops += 1
                    url = _redirect_target(url, target)
                    if status == 303 or (status in (301, 302) and method == "POST"):
                        method, with_body = "GET", False  # what browsers, httpx and aiohttp do
                        headers = {k: v for k, v in headers.items() if k.lower() != "content-type"}
                    if url.origin() != origin:
                        # The key belongs to the service host alone; httpx drops Authorization
                        # the same way, and aiohttp would forward a custom key header (`api-key`).
                        headers = {
                            k: v for k, v in headers.items() if k.lower() not in self._credentials
                        }
                sent_headers, data = _body(request, headers) if with_body else (headers, None)
                async with self._session.request(
                    method, url, headers=sent_headers, data=data, allow_redirects=False
                ) as resp:
                    location = resp.headers.get("Location")
                    last = hops == MAX_REDIRECTS
                    if resp.status not in _REDIRECT_STATUSES or not location or last:
                        return await read(resp)
                    redirected = (resp.status, location)
        except (TimeoutError, aiohttp.ServerTimeoutError):
            raise TransportError("timeout", "no answer in time") from None
        except aiohttp.ClientPayloadError as exc:
            raise TransportError("cut", type(exc).__name__) from None
        except (aiohttp.ClientError, OSError) as exc:
            # The cause in words ("connection refused"), not aiohttp's class name.
            raise TransportError("unreachable", aiohttp_cause(exc)) from None


def _redirect_target(url: yarl.URL, location: str) -> yarl.URL:
    """Where a redirect from `url` to `location` leads; TransportError("redirect") when that is
    no http(s) URL with a host (garbage, another scheme, a bad port): the service host's answer,
    not a fault of the bridge."""
    shown = location[:100]
    try:
        target = url.join(yarl.URL(location))
        port = target.port  # yarl checks the port's range only when asked
    except (ValueError, TypeError):
        raise TransportError("redirect", f"redirect to an invalid URL {shown!r}") from None
    if target.scheme not in ("http", "https") or not target.host or port is None:
        raise TransportError("redirect", f"redirect to {shown!r}, not an http(s) URL") from None
    return target


def aiohttp_cause(exc: BaseException) -> str:
    """A short cause for a failed aiohttp request (bridge/neterrors.py for OS and TLS errors)."""
    wrappers = (aiohttp.ClientError,)
    if isinstance(exc, aiohttp.ClientConnectorCertificateError):
        cause = connection_cause(exc, wrappers)
        return cause if cause.startswith("TLS certificate") else "TLS certificate not trusted"
    if isinstance(exc, aiohttp.ClientSSLError):
        return "TLS handshake failed"
    if isinstance(exc, aiohttp.ServerDisconnectedError):
        return "the server closed the connection"
    if isinstance(exc, aiohttp.InvalidURL):
        return "invalid URL"
    return connection_cause(exc, wrappers)


def _body(request: HttpRequest, headers: dict[str, str]) -> tuple[dict[str, str], Any]:
    """The headers and aiohttp body for one send of `request` (a form is built anew each time)."""
    if request.form is not None:
        form = aiohttp.FormData(quote_fields=False, default_to_multipart=True)
        for part in request.form:
            default_type = _TEXT_PART_TYPE if part.filename is None else _FILE_PART_TYPE
            part_body = compat.bytes_body(part.value, part.content_type or default_type)
            form.add_field(part.name, part_body, filename=part.filename)
        # The session skips automatic Content-Type headers (bodyless requests must not get
        # one), so the multipart type with its boundary is set here explicitly.
        data = form()
        return {**headers, "Content-Type": data.content_type}, data
    if request.json_body is not None:
        return headers, compat.bytes_body(request.json_body, "application/json")
    return headers, None
