"""What the web console shows of a running bridge or supervisor, and how it is started.

Imported only when the console is on: it loads aiohttp's web server.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import platform
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yarl

from bridge import __version__
from bridge.config import ENV_PREFIX, BridgeConfig, load_config
from bridge.console.app import Console
from bridge.errors import ConfigError
from bridge.journal.postgres import PgSize
from bridge.journal.sqlite import TailKeys, read_size
from bridge.messages import StatusTransport
from bridge.methods.describe import describe, example_payload
from bridge.methods.model import MethodTable
from bridge.mqtt.watch import TopicWatcher
from bridge.pipeline.stats import Stats
from bridge.redact import Redactor
from bridge.runtime import startup
from bridge.workers.protocol import worker_journal_path

if TYPE_CHECKING:
    from structlog.typing import FilteringBoundLogger

JOURNAL_EVERY = 2.0
"""Seconds the journal's entries and size are reused before they are read again."""
FOLLOW_TIMEOUT = 10.0
"""Seconds the console's own broker connection may take to connect and subscribe."""


class BridgeSource:
    """The console's view of one bridge: its config, table, counters and connection."""

    def __init__(
        self,
        config: BridgeConfig,
        config_source: str | None,
        table: MethodTable,
        stats: Callable[[], Stats | None],
        transport: Callable[[], StatusTransport | None],
        workers: int = 1,
    ) -> None:
        self.config = config
        self.config_source = config_source
        self.table = table
        self.topic_prefix = config.mqtt.topic_prefix
        self._stats = stats
        self._transport = transport
        self._started = time.time()
        self.workers = workers
        url = config.journal.url.get_secret_value()
        self._pg = PgSize(url) if url and config.journal.scope != "off" else None
        self._journal: tuple[float, dict[str, Any]] | None = None
        self._tails = TailKeys()
        self._watcher: TopicWatcher | None = None
        self._watcher_lock = asyncio.Lock()

    async def status(self) -> dict[str, Any]:
        """State, broker, service host (no credentials), versions, uptime, counters, journal."""
        cfg, transport = self.config, self._transport()
        online = transport is not None and transport.connected.is_set()
        stats = self._stats()
        journal = await self.journal()
        return {
            "state": "online" if online else "offline",
            "instance": cfg.mqtt.instance_name,
            "broker": f"{cfg.mqtt.host or '127.0.0.1'}:{cfg.mqtt.port}",
            "protocol": transport.protocol_label if transport is not None else None,
            "service": str(yarl.URL(cfg.service.api_base).with_user(None)),
            "version": __version__,
            "python": platform.python_version(),
            "uptime_s": round(time.time() - self._started),
            "workers": self.workers,
            "methods": len(self.table),
            "journal": journal,
            "counters": asdict(stats) if stats is not None else {},
        }

    async def journal(self) -> dict[str, Any]:
        """The journal's kind, scope, entries and bytes: every worker's SQLite file summed, or
        the PostgreSQL table the group shares (read at most every JOURNAL_EVERY seconds)."""
        now = time.monotonic()
        if self._journal is not None and now - self._journal[0] < JOURNAL_EVERY:
            return self._journal[1]
        cfg = self.config.journal
        journal: dict[str, Any] = {"scope": cfg.scope}
        if self._pg is not None:
            read = await self._pg.read()
            entries, size = read if read is not None else (None, None)
            journal.update(kind="postgresql", entries=entries, bytes=size)
        elif cfg.path and cfg.scope != "off":
            paths = [Path(worker_journal_path(cfg.path, i)) for i in range(1, self.workers + 1)]
            tails = self._tails
            sizes = await asyncio.to_thread(lambda: [read_size(p, tails) for p in paths])
            counts = [entries for entries, _ in sizes]
            journal.update(
                kind="sqlite",
                path=str(paths[0]) if len(paths) == 1 else [str(p) for p in paths],
                entries=None if None in counts else sum(c for c in counts if c is not None),
                bytes=sum(size for _, size in sizes),
            )
        self._journal = (now, journal)
        return journal

    def config_view(self) -> dict[str, Any]:
        """The effective config (redacted), its file, each `OMB_` override with its (redacted)
        value, and check-config's findings: the file validated again now, with its warnings."""
        redacted = self.config.redacted()
        overrides = []
        for name in sorted(os.environ):
            if not name.startswith(ENV_PREFIX) or "__" not in name:
                continue
            value: Any = redacted
            for part in (p.lower() for p in name[len(ENV_PREFIX) :].split("__") if p):
                value = value.get(part) if isinstance(value, dict) else None
            overrides.append({"variable": name, "value": value})
        findings = [w for w in [startup.missing_key_warning(self.config)] if w]
        warnings: list[str] = []
        try:
            load_config(self.config_source, warnings=warnings)
        except ConfigError as exc:  # the file changed since the start: say what check-config would
            findings += [f"error: {problem}" for problem in exc.problems]
        return {
            "source": self.config_source,
            "overrides": overrides,
            "findings": findings + warnings,
            "config": redacted,
        }

    def methods(self) -> list[dict[str, Any]]:
        """Every method: name, group, verb, path."""
        every = (*self.table.operations, *self.table.extra)
        return [{"name": o.name, "group": o.group, "verb": o.verb, "path": o.path} for o in every]

    def describe(self, name: str) -> dict[str, Any] | None:
        """What goes in one method's payload, and an example payload."""
        op = self.table.find(name)
        if op is None:
            return None
        return {
            "name": op.name,
            "text": describe(op, topic_prefix=self.topic_prefix),
            "example": example_payload(op),
        }

    def publish(self, topic: str, payload: bytes) -> Awaitable[None]:
        """Publish a request through the broker on the bridge's own connection."""
        transport = self._transport()
        if transport is None:
            raise ConnectionError("not connected to the broker")
        return transport.publish(topic, payload, qos=1)

    @contextlib.asynccontextmanager
    async def follow(
        self, topics: Sequence[str], deliver: Callable[[str, bytes], None]
    ) -> AsyncIterator[None]:
        """Inside, every message on `topics` goes to `deliver`, read through the broker on the
        console's own connection (`<client id>-console`, connected when first needed)."""
        async with self._watcher_lock:
            if self._watcher is None:
                mqtt = self.config.mqtt
                mqtt = mqtt.model_copy(update={"host": mqtt.host or "127.0.0.1"})
                watcher = TopicWatcher(mqtt, f"{mqtt.effective_client_id}-console")
                try:
                    await asyncio.wait_for(watcher.start(FOLLOW_TIMEOUT), FOLLOW_TIMEOUT)
                except BaseException:
                    await watcher.close()
                    raise
                self._watcher = watcher
        async with self._watcher.following(topics, deliver, FOLLOW_TIMEOUT):
            yield

    async def close(self) -> None:
        """Close the console's own connections (broker, PostgreSQL)."""
        if self._watcher is not None:
            await self._watcher.close()
            self._watcher = None
        if self._pg is not None:
            await self._pg.close()


async def start_console(
    source: BridgeSource, log: FilteringBoundLogger, stack: contextlib.AsyncExitStack
) -> Console:
    """Serve the console for `source` until `stack` closes."""
    config = source.config
    console = Console(config.console, source, Redactor(config.secrets()), log)
    stack.push_async_callback(source.close)
    await console.start()
    stack.push_async_callback(console.close)
    return console
