"""A scripted HTTP transport and a hand-moved clock, for ServiceClient without sockets."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import TypeVar

from bridge.service.models import HttpRequest
from bridge.service.transport import Response, TransportError

T = TypeVar("T")


@dataclass
class FakeBody:
    """A body delivered in `chunks`, then cut off when `cut` is set."""

    chunks: list[bytes]
    cut: bool = False
    taken: int = 0
    """Chunks handed out so far (a reader that stops early leaves the rest)."""

    async def read(self) -> bytes:
        """The whole body."""
        if self.cut:
            raise TransportError("cut", "ClientPayloadError")
        return b"".join(self.chunks)

    async def iter_any(self) -> AsyncIterator[bytes]:
        """The chunks, then the cut."""
        for chunk in self.chunks:
            self.taken += 1
            yield chunk
        if self.cut:
            raise TransportError("cut", "ClientPayloadError")


@dataclass
class FakeResponse:
    """A scripted response."""

    status: int
    content: FakeBody
    headers: dict[str, str] = field(default_factory=dict)
    reason: str | None = "Reason"


def answer(
    status: int,
    body: bytes = b"{}",
    content_type: str = "application/json",
    headers: dict[str, str] | None = None,
) -> FakeResponse:
    """A complete response."""
    return FakeResponse(status, FakeBody([body]), {"Content-Type": content_type, **(headers or {})})


class FakeTransport:
    """Answers each exchange with the next scripted response or failure."""

    def __init__(self, script: list[FakeResponse | TransportError]) -> None:
        self.script = script
        self.sent: list[HttpRequest] = []

    async def start(self) -> None:
        """Nothing to open."""

    async def close(self) -> None:
        """Nothing to close."""

    async def exchange(self, request: HttpRequest, read: Callable[[Response], Awaitable[T]]) -> T:
        """The next scripted step."""
        self.sent.append(request)
        step = self.script.pop(0)
        if isinstance(step, TransportError):
            raise step
        return await read(step)


class Clock:
    """A clock that only moves when told, and a sleep that moves it."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    async def sleep(self, delay: float) -> None:
        """Record the delay and let it pass at once."""
        self.sleeps.append(delay)
        self.now += delay
