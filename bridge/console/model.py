"""The console's pure parts: the live request list, payload previews, and who may ask what.

No sockets here: bridge/console/app.py serves these over HTTP.
"""

from __future__ import annotations

import itertools
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from bridge.config import is_loopback
from bridge.redact import Redactor

PREVIEW_BYTES = 4096
"""How much of a request or reply payload the console keeps (redacted) for its detail view."""


@dataclass(slots=True)  # not frozen: a frozen dataclass pays a setattr call per field
class RequestRecord:
    """One answered request as the live list keeps it: raw, cut fields; shown via `view`.

    Kept as given so that recording costs an append (it runs for every request): the
    transaction is redacted and the payloads previewed only when a page asks.
    """

    seq: int
    at: float
    method: str
    suffix: str
    transaction: Any
    code: str | None
    http_status: int | None
    duration_ms: float
    request_head: bytes
    """The request's first bytes as the device sent them (not yet redacted)."""
    bytes_in: int
    reply_head: bytes
    """The reply's first bytes as published (already redacted)."""
    bytes_out: int
    reply_type: str | None

    def summary(self, redactor: Redactor) -> dict[str, Any]:
        """The list view's row (no payloads), the transaction redacted."""
        return {
            "seq": self.seq,
            "at": self.at,
            "method": self.method,
            "suffix": self.suffix,
            "transaction": redactor.any(self.transaction),
            "status": "error" if self.code else "ok",
            "code": self.code,
            "http_status": self.http_status,
            "duration_ms": self.duration_ms,
            "bytes_in": self.bytes_in,
            "bytes_out": self.bytes_out,
        }

    def detail(self, redactor: Redactor) -> dict[str, Any]:
        """The row with its redacted, truncated request and reply previews."""
        return {
            **self.summary(redactor),
            "request": preview(self.request_head, redactor, "application/json", self.bytes_in),
            "reply": preview(self.reply_head, redactor, self.reply_type, self.bytes_out),
        }


def preview(
    payload: bytes,
    redactor: Redactor,
    content_type: str | None = None,
    size: int | None = None,
) -> dict[str, Any]:
    """A redacted, truncated view of a payload: text when it is UTF-8, else its size and type.

    `payload` may already be a head of the whole, whose length is then `size`.
    """
    head = payload[:PREVIEW_BYTES]
    total = len(payload) if size is None else size
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        if total > PREVIEW_BYTES:
            try:  # a cut inside a multi-byte character is still text
                text = head[:-3].decode("utf-8", "strict") if len(head) > 3 else ""
            except UnicodeDecodeError:
                return {"binary": True, "size": total, "type": content_type}
        else:
            return {"binary": True, "size": total, "type": content_type}
    return {
        "text": redactor.text(text),
        "size": total,
        "truncated": total > PREVIEW_BYTES,
        "type": content_type,
    }


class RequestLog:
    """The last `size` answered requests, newest last; each with a number to ask for newer."""

    def __init__(self, size: int, clock: Callable[[], float] = time.time) -> None:
        self._records: deque[RequestRecord] = deque(maxlen=size)
        self._seq = itertools.count(1)
        self._clock = clock

    def add(
        self,
        method: str,
        suffix: str,
        transaction: Any,
        code: str | None,
        http_status: int | None,
        duration_ms: float,
        request_head: bytes,
        bytes_in: int,
        reply: bytes,
        reply_type: str | None,
        reply_size: int | None = None,
    ) -> None:
        """Append one answered request: on the request path, so only the fields as given (the
        reply cut to the preview's size); redaction and previews wait for a page to ask.
        `reply_size`: the whole reply's size when `reply` is only its start (a worker's)."""
        self._records.append(
            RequestRecord(
                next(self._seq),
                self._clock(),
                method,
                suffix,
                transaction,
                code,
                http_status,
                duration_ms,
                request_head,
                bytes_in,
                reply[:PREVIEW_BYTES],
                len(reply) if reply_size is None else reply_size,
                reply_type,
            )
        )

    def since(self, seq: int) -> list[RequestRecord]:
        """The records newer than `seq`, oldest first."""
        return [r for r in self._records if r.seq > seq]

    def find(self, seq: int) -> RequestRecord | None:
        """The record numbered `seq`, while it is still kept."""
        return next((r for r in self._records if r.seq == seq), None)


class Guard:
    """Who may use the console: the Host and Origin it is reached by, and the token if set.

    A page on another site cannot use it: state-changing requests need a custom header (which
    a cross-site form cannot send and the console never allows through CORS) and this console's
    own Origin; a renamed host (DNS rebinding) is refused by the Host check.
    """

    HEADER = "X-OMB-Console"

    def __init__(self, host: str, port: int, token: str, names: Iterable[str] = ()) -> None:
        loopback_names = ("127.0.0.1", "localhost", "[::1]") if is_loopback(host) else ()
        self.hosts = {f"{name}:{port}" for name in (*loopback_names, host, *names)}
        self.token = token

    def host_refusal(self, host: str | None) -> tuple[int, str] | None:
        """Why a request by this Host is refused (a renamed host: DNS rebinding), or None."""
        if host is None or host.lower() not in self.hosts:
            return 421, "unknown Host: open the console by the address it listens on"
        return None

    def refusal(
        self, *, host: str | None, origin: str | None, authorization: str | None, changes: bool
    ) -> tuple[int, str] | None:
        """Why a request is refused (HTTP status, reason), or None when it may go on."""
        if (refused := self.host_refusal(host)) is not None:
            return refused
        if self.token and authorization != f"Bearer {self.token}":
            return 401, "this console needs its token ([console] token)"
        own = {f"http://{h}" for h in self.hosts}
        if changes and (origin is None or origin.lower() not in own):
            return 403, "a state-changing request must come from the console's own page"
        return None


class RateLimit:
    """A token bucket: `rate` per second, bursts of `burst`."""

    def __init__(
        self, rate: float, burst: int, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.rate, self.burst = rate, float(burst)
        self._tokens, self._clock = float(burst), clock
        self._last = clock()

    def take(self) -> bool:
        """Whether one more request may go now (and count it)."""
        now = self._clock()
        self._tokens = min(self.burst, self._tokens + (now - self._last) * self.rate)
        self._last = now
        if self._tokens < 1:
            return False
        self._tokens -= 1
        return True
