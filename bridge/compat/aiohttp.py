"""aiohttp internals, each guarded by a shim (the list: bridge/compat/__init__.py)."""

from __future__ import annotations

import ssl
import warnings

import aiohttp

from bridge.compat.shims import SHIMS, Shim, register


class BytesBody(aiohttp.payload.BytesPayload):
    """A request body or form part sent from memory as it is, without a copy or a warning.

    aiohttp's own BytesPayload raises a ResourceWarning for more than 1 MiB, to steer callers
    towards file objects; a bridge holds its uploads in memory by design, and a BytesIO would
    cost one more copy of the file (aiohttp's BytesIOPayload calls `getbuffer()`, which copies
    the bytes a BytesIO shares).
    """

    def __init__(self, value: bytes, content_type: str) -> None:
        aiohttp.payload.Payload.__init__(self, value, content_type=content_type)
        self._size = len(value)


def _check_bytes_body() -> bool:
    try:
        body = BytesBody(b"xyz", "a/b")
    except (TypeError, AttributeError):
        return False
    value = body._value  # noqa: SLF001  (the shim's check: the body is sent as it is)
    return body.size == 3 and body.content_type == "a/b" and value == b"xyz"


def bytes_body(value: bytes, content_type: str) -> aiohttp.payload.BytesPayload:
    """A payload for `value`, sent as it is; aiohttp's own BytesPayload when the shim is off."""
    if SHIMS["bytes_body"].active:
        return BytesBody(value, content_type)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        return aiohttp.payload.BytesPayload(value, content_type=content_type)


def _aiohttp_verified_context() -> ssl.SSLContext | None:
    context = getattr(aiohttp.connector, "_SSL_CONTEXT_VERIFIED", None)
    if not isinstance(context, ssl.SSLContext):
        return None
    verifies = context.verify_mode == ssl.CERT_REQUIRED and context.check_hostname
    return context if verifies else None


def verified_ssl_context() -> ssl.SSLContext:
    """The TLS context for an https service host, shared by both HTTP paths: aiohttp's own default
    (the system's CA store, certificates and host names checked, ALPN http/1.1) when the shim is on,
    else one made the same way."""
    if SHIMS["ssl_context"].active:
        context = _aiohttp_verified_context()
        if context is not None:
            return context
    # As aiohttp makes its default: a second one costs 0.7 MiB (the CA store loaded again).
    context = ssl.create_default_context()
    context.set_alpn_protocols(("http/1.1",))
    return context


register(
    Shim("bytes_body", "aiohttp", "3.14.5", _check_bytes_body),
    Shim("ssl_context", "aiohttp", "3.14.5", lambda: _aiohttp_verified_context() is not None),
)
