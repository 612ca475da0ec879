"""The reconnect supervisor on its own: states, backoff, protocol switches, a fake transport."""

from __future__ import annotations

import asyncio

from support.fakes import FakeLog

from bridge.backoff import Backoff
from bridge.mqtt.reconnect import (
    ConnectionLost,
    ConnectionState,
    ConnectRefused,
    ReconnectLogic,
)


class FakeTransport:
    """Fails connect attempts with the queued exceptions, then succeeds."""

    def __init__(self, failures: list[Exception], other_protocol: bool = False) -> None:
        self.failures = failures
        self.other_protocol = other_protocol
        self.lost = asyncio.Event()
        self.attempts = 0
        self.resets = 0
        self.switches = 0

    async def connect_once(self) -> None:
        """Raise the next queued failure, or connect."""
        self.attempts += 1
        if self.failures:
            raise self.failures.pop(0)
        self.lost.clear()

    def retry_with_other_protocol(self, exc: Exception) -> bool:
        """Switch on an Unsupported Protocol Version refusal when `other_protocol`."""
        if self.other_protocol and isinstance(exc, ConnectRefused) and exc.code == 132:
            self.switches += 1
            return True
        return False

    def reset(self) -> None:
        """Count the clean-ups."""
        self.resets += 1

    def describe(self) -> str:
        """A fixed broker address."""
        return "broker:1883"


def state(logic: ReconnectLogic) -> ConnectionState:
    """The supervisor's state, read afresh (it changes across awaits)."""
    return logic.state


def supervisor(transport: FakeTransport) -> tuple[ReconnectLogic, list[float], FakeLog]:
    """A supervisor whose sleeps are recorded, not slept; jitter-free backoff 1 s .. 8 s."""
    delays: list[float] = []

    async def sleep(delay: float) -> None:
        delays.append(delay)

    log = FakeLog()
    backoff = Backoff(1.0, 8.0, rand=lambda: 1.0)
    return ReconnectLogic(transport, backoff, log.bound, sleep), delays, log


async def test_first_connect_retries_with_backoff_until_connected() -> None:
    transport = FakeTransport([OSError("refused"), TimeoutError(), ConnectionLost("closed")])
    logic, delays, log = supervisor(transport)
    assert state(logic) is ConnectionState.IDLE
    await logic.start()
    assert state(logic) is ConnectionState.CONNECTED
    assert (transport.attempts, transport.resets, delays) == (4, 3, [1.0, 2.0, 4.0])
    # The first failure of the first start is a warning, the second says it is still trying,
    # the third is a debug line (still_trying_due: 2, 4, 8, every 16th).
    assert [level for level, *_ in log.lines] == ["warning", "warning", "debug"]
    await logic.stop()
    assert state(logic) is ConnectionState.CLOSED


async def test_bad_credentials_wait_the_longest_delay() -> None:
    transport = FakeTransport([ConnectRefused(134, "Bad user name or password")])
    logic, delays, log = supervisor(transport)
    await logic.start()
    assert delays == [8.0]
    assert log.lines[0][:2] == ("warning", "broker refused the connection")
    await logic.stop()


async def test_unsupported_protocol_switches_at_once_without_waiting() -> None:
    transport = FakeTransport([ConnectRefused(132, "Unsupported")], other_protocol=True)
    logic, delays, _ = supervisor(transport)
    await logic.start()
    assert (transport.switches, delays, transport.attempts) == (1, [], 2)
    await logic.stop()


async def test_a_lost_connection_is_reestablished_after_a_backoff() -> None:
    transport = FakeTransport([])
    logic, delays, _ = supervisor(transport)
    await logic.start()
    transport.failures.append(OSError("still down"))
    transport.lost.set()
    for _ in range(10):  # a few loop turns: the fake sleeps return at once
        await asyncio.sleep(0)
    assert state(logic) is ConnectionState.CONNECTED
    assert (transport.attempts, delays) == (3, [1.0, 2.0])
    await logic.stop()
    assert state(logic) is ConnectionState.CLOSED
