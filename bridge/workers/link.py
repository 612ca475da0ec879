"""A worker's end of its socket pair to the supervisor (the lines: bridge/workers/protocol.py)."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Callable

from bridge.pipeline.stats import Stats
from bridge.workers import protocol as workers


class WorkerLink:
    """Reports `ready`, stats and `stopping` to the supervisor; turns its commands into calls."""

    def __init__(self, index: int, fd: int) -> None:
        self.index = index
        self._fd = fd
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    async def open(self) -> None:
        """Take over the inherited socket."""
        sock = socket.socket(fileno=self._fd)
        self._reader, self._writer = await asyncio.open_unix_connection(sock=sock)

    def send(self, event: str, stats: Stats | None = None) -> None:
        """Queue one report line; a supervisor that went away is not an error here."""
        self.send_line(workers.report_line(event, stats))

    def send_line(self, line: bytes) -> None:
        """Queue one prepared report line (e.g. an answered request for the console)."""
        writer = self._writer
        if writer is not None and not writer.is_closing():
            writer.write(line)

    async def heartbeat(self, stats: Stats) -> None:
        """Report `stats` every HEARTBEAT_SECONDS (the supervisor's sign of life)."""
        while True:
            self.send("stats", stats)
            await asyncio.sleep(workers.HEARTBEAT_SECONDS)

    async def follow(self, stop: Callable[[], None]) -> None:
        """Call `stop` on `stop`, twice on `stop-now`, and on end of file (the supervisor died):
        a worker never outlives its supervisor."""
        assert self._reader is not None
        while True:
            try:
                line = await self._reader.readline()
            except (ConnectionError, ValueError):
                line = b""
            if line == workers.STOP_NOW:
                stop()
                stop()
                return
            if line in (workers.STOP, b""):
                stop()
                if line == b"":
                    return

    async def close(self, stats: Stats) -> None:
        """Send the final counters and close the socket."""
        writer = self._writer
        if writer is None:
            return
        self.send("stopping", stats)
        with contextlib.suppress(ConnectionError, OSError):
            await writer.drain()
        writer.close()
        with contextlib.suppress(ConnectionError, OSError):
            await writer.wait_closed()
