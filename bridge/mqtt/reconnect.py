"""The reconnect supervisor: keeps one MQTT connection up, with backoff, in explicit states.

In the spirit of aioesphomeapi's ReconnectLogic: the transport knows how to make one connection
attempt and how to clean up after a failed one; this module decides when to try, how long to
wait, and what to log, and its `state` says where it is.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Protocol

from bridge.backoff import Backoff
from bridge.neterrors import connection_cause

if TYPE_CHECKING:
    from structlog.typing import FilteringBoundLogger


class ConnectionState(enum.Enum):
    """Where the supervisor is."""

    IDLE = "idle"
    """Not started."""
    CONNECTING = "connecting"
    """A connection attempt (CONNECT, CONNACK, SUBSCRIBE, SUBACK) is under way."""
    CONNECTED = "connected"
    """Subscribed and serving."""
    WAITING = "waiting"
    """The last attempt failed or the connection was lost: waiting out the backoff."""
    CLOSED = "closed"
    """Stopped for good."""


class ConnectRefused(Exception):
    """The broker answered CONNECT or SUBSCRIBE with a failure reason code."""

    def __init__(self, code: int, text: str) -> None:
        super().__init__(text)
        self.code = code
        self.text = text


class ConnectionLost(Exception):
    """The connection closed or failed before it was usable."""


# MQTT 5 reason codes (paho 2 maps MQTT 3.1.1 CONNACK codes onto these).
UNSUPPORTED_PROTOCOL = 132
BAD_AUTH_CODES = frozenset({133, 134, 135, 138})
"""Client id not valid, bad user name or password, not authorized, banned: retry slowly."""


class Connectable(Protocol):
    """What the supervisor needs from the transport."""

    lost: asyncio.Event
    """Set when an established connection is lost."""

    async def connect_once(self) -> None:
        """One attempt: connect and subscribe; raise ConnectRefused, ConnectionLost, OSError or
        TimeoutError on failure."""

    def retry_with_other_protocol(self, exc: Exception) -> bool:
        """Whether `exc` means the broker wants the other protocol version (then switched)."""

    def reset(self) -> None:
        """Drop what a failed or lost connection left behind (socket, TLS socket)."""

    def describe(self) -> str:
        """`host:port` for log lines."""


def still_trying_due(attempt: int) -> bool:
    """Whether failed attempt number `attempt` is said at warning level: 2, 4, 8, every 16th.

    With the default backoff (up to 60 s) that is within a minute, then about every 16 minutes,
    so a log that went quiet still says where the bridge is trying to get to.
    """
    return attempt in (2, 4, 8) or (attempt > 0 and attempt % 16 == 0)


class ReconnectLogic:
    """Connects `transport`, and after every loss waits out the backoff and connects again."""

    def __init__(
        self,
        transport: Connectable,
        backoff: Backoff,
        log: FilteringBoundLogger,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self.transport = transport
        self.backoff = backoff
        self.log = log
        self._sleep = sleep
        self.state = ConnectionState.IDLE
        self._runner: asyncio.Task[None] | None = None

    @property
    def closed(self) -> bool:
        """Whether `stop()` was called."""
        return self.state is ConnectionState.CLOSED

    async def start(self) -> None:
        """Connect once (retrying until it works), then keep reconnecting in the background."""
        await self._connect_until_up(first=True)
        if self.state is ConnectionState.CONNECTED:
            self._runner = asyncio.create_task(self._supervise(), name="mqtt-supervisor")

    async def stop(self) -> None:
        """Stop reconnecting (the transport closes its own connection)."""
        self.state = ConnectionState.CLOSED
        if self._runner is not None:
            self._runner.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._runner
            self._runner = None

    async def _connect_until_up(self, *, first: bool) -> None:
        while not self.closed:
            self.state = ConnectionState.CONNECTING
            try:
                await self.transport.connect_once()
            except (ConnectRefused, ConnectionLost, OSError, TimeoutError) as exc:
                if self.closed:
                    return
                if self.transport.retry_with_other_protocol(exc) and isinstance(
                    exc, ConnectRefused
                ):
                    continue  # the broker said which version it speaks: no need to wait
                delay = self._failed(exc, first=first)
            else:
                self.backoff.reset()
                self.state = ConnectionState.CONNECTED
                return
            self.state = ConnectionState.WAITING
            self.transport.reset()
            await self._sleep(delay)

    def _failed(self, exc: Exception, *, first: bool) -> float:
        """The delay before the next attempt, after logging the failure."""
        if isinstance(exc, ConnectRefused):
            delay = (
                self.backoff.give_up_delay()
                if exc.code in BAD_AUTH_CODES
                else self.backoff.next_delay()
            )
            self.log.warning(
                "broker refused the connection", reason=exc.text, retry_in=round(delay, 2)
            )
            return delay
        delay = self.backoff.next_delay()
        attempt = self.backoff.attempt
        broker = self.transport.describe()
        cause = (
            connection_cause(exc) if isinstance(exc, OSError) else f"{type(exc).__name__}: {exc}"
        )
        if first and attempt == 1:
            self.log.warning(
                "cannot connect to broker", broker=broker, error=cause, retry_in=round(delay, 2)
            )
        elif still_trying_due(attempt):
            self.log.warning(
                f"still trying to reach broker {broker}",
                attempts=attempt,
                error=cause,
                retry_in=round(delay, 2),
            )
        else:
            self.log.debug(
                "cannot connect to broker", broker=broker, error=cause, retry_in=round(delay, 2)
            )
        return delay

    async def _supervise(self) -> None:
        while not self.closed:
            await self.transport.lost.wait()
            if self.closed:
                return
            self.state = ConnectionState.WAITING
            self.transport.reset()
            await self._sleep(self.backoff.next_delay())
            await self._connect_until_up(first=False)
