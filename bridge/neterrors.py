"""Connection errors in words: what went wrong reaching a host, instead of a library class name.

Pure: no I/O, no client library. `connection_cause` turns an OS or TLS error into a short cause
such as `connection refused`, `name not resolved` or `TLS certificate not trusted`.
"""

from __future__ import annotations

import errno
import socket
import ssl

_ERRNO_CAUSES = {
    errno.ECONNREFUSED: "connection refused",
    errno.ECONNRESET: "connection reset",
    errno.ECONNABORTED: "connection aborted",
    errno.EPIPE: "connection closed while sending",
    errno.ETIMEDOUT: "connection timed out",
    errno.EHOSTUNREACH: "host unreachable",
    errno.EHOSTDOWN: "host down",
    errno.ENETUNREACH: "network unreachable",
    errno.ENETDOWN: "network down",
    errno.EADDRNOTAVAIL: "address not available",
}

_DNS_ERRNOS = {
    socket.EAI_NONAME: "name not resolved",
    socket.EAI_AGAIN: "name not resolved (temporary DNS failure)",
}


def _os_error(exc: BaseException, wrappers: tuple[type[BaseException], ...]) -> OSError | None:
    """The OSError under `exc`: a wrapper's `os_error`, the exception itself, or its cause."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        inner = getattr(current, "os_error", None)
        if isinstance(inner, OSError):
            return inner
        if isinstance(current, OSError) and not isinstance(current, wrappers):
            return current
        current = current.__cause__ or current.__context__
    return None


def _tls_cause(exc: BaseException) -> str | None:
    cert = getattr(exc, "certificate_error", None)
    if isinstance(cert, ssl.SSLCertVerificationError):
        detail = getattr(cert, "verify_message", "") or ""
        return (
            f"TLS certificate not trusted ({detail})" if detail else ("TLS certificate not trusted")
        )
    if isinstance(exc, ssl.SSLCertVerificationError):
        detail = exc.verify_message or ""
        return (
            f"TLS certificate not trusted ({detail})" if detail else ("TLS certificate not trusted")
        )
    if isinstance(exc, ssl.SSLError):
        return "TLS handshake failed"
    return None


def connection_cause(exc: BaseException, wrappers: tuple[type[BaseException], ...] = ()) -> str:
    """A short cause for a failed connection, e.g. `connection refused` or `name not resolved`.

    `wrappers` are a client library's OSError subclasses that only wrap the real error.
    """
    tls = _tls_cause(exc)
    if tls is not None:
        return tls
    os_error = _os_error(exc, wrappers)
    if os_error is not None:
        tls = _tls_cause(os_error)
        if tls is not None:
            return tls
        if isinstance(os_error, socket.gaierror):
            return _DNS_ERRNOS.get(os_error.errno or 0, "name not resolved")
        if os_error.errno in _ERRNO_CAUSES:
            return _ERRNO_CAUSES[os_error.errno]
        if isinstance(os_error, TimeoutError):
            return "connection timed out"
        if os_error.strerror:
            return os_error.strerror.lower()
    if isinstance(exc, TimeoutError):
        return "connection timed out"
    return type(exc).__name__
