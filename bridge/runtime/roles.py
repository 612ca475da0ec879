"""What a bridge process shows the outside: standing alone, or one worker behind a supervisor.

A `Bridge` (bridge/runtime/daemon.py) serves requests the same way in both roles; the role adds
what differs: the retained state and its last will, info, stats and Home Assistant discovery,
systemd and signals for a bridge on its own; the report link to the supervisor for a worker.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import platform
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

from bridge import __version__
from bridge.ha.status import OFFLINE, StatusPublisher
from bridge.messages import InboundMessage, StatusTransport
from bridge.pipeline.model import Observed
from bridge.pipeline.stats import Stats
from bridge.realtime import group as realtime_group
from bridge.runtime import startup
from bridge.runtime.logs import stop_when_log_gone
from bridge.runtime.signals import stop_on_signals
from bridge.runtime.systemd import notify, watchdog_interval
from bridge.workers import protocol as workers
from bridge.workers.link import WorkerLink

if TYPE_CHECKING:
    from structlog.typing import FilteringBoundLogger

    from bridge.config import BridgeConfig
    from bridge.console.app import Console
    from bridge.methods.model import MethodTable
    from bridge.topics import Topics


class Bridge(Protocol):
    """What a role sees of its bridge (bridge/runtime/daemon.py)."""

    config: BridgeConfig
    config_source: str | None
    table: MethodTable
    topics: Topics
    log: FilteringBoundLogger
    broker_info: dict[str, Any]
    broker_warnings: list[str]

    def stop(self) -> None:
        """Ask the bridge to stop (again: at once)."""

    def stats(self) -> Stats:
        """The request counters."""

    @property
    def dispatching(self) -> bool:
        """Whether the request dispatcher has been made (it has the counters)."""


class Role(Protocol):
    """The part of a bridge that depends on how it runs."""

    will: tuple[str, bytes] | None
    """The last will (topic, payload) the broker publishes if the connection drops."""
    final_state: tuple[str, bytes] | None
    """What is published (retained) on the way out, however the bridge stops."""
    observer: Callable[[Observed], None] | None
    """Told of every answered request (the web console), None when nobody looks."""

    def starting(self) -> None:
        """Say what starts, before anything does."""

    async def enter(self, stack: contextlib.AsyncExitStack) -> None:
        """Set up what the role needs for the whole run; its cleanup goes on `stack`."""

    def subscriptions(self) -> list[tuple[str, int]]:
        """(filter, QoS) pairs to subscribe to beside the requests."""

    def connected(self, transport: StatusTransport) -> None:
        """The broker connection is up (again)."""

    def serving(self, group: asyncio.TaskGroup) -> list[asyncio.Task[None]]:
        """Announce readiness; the background loops started in `group` (cancelled at stop)."""

    def take(self, message: InboundMessage) -> bool:
        """Whether `message` is the role's own (then it is not a request)."""

    def stopping(self, in_flight: int) -> dict[str, Any]:
        """Say the bridge is stopping; extra fields for the `stopping` log line."""


class Standalone:
    """A bridge on its own: state, info, stats and discovery, systemd, SIGTERM and Ctrl-C."""

    def __init__(self, bridge: Bridge) -> None:
        self.bridge = bridge
        self.status = StatusPublisher(bridge.config, bridge.topics, bridge.log, bridge.stats)
        self.will: tuple[str, bytes] | None = (bridge.topics.state, OFFLINE)
        self.final_state: tuple[str, bytes] | None = self.will
        self.observer: Callable[[Observed], None] | None = None
        self.transport: StatusTransport | None = None
        self.console: Console | None = None

    def starting(self) -> None:
        """Log the start-up summary, the effective config (debug) and a missing key."""
        bridge, cfg = self.bridge, self.bridge.config
        bridge.log.info(
            "starting",
            version=__version__,
            python=platform.python_version(),
            **startup.summary(cfg, bridge.config_source),
        )
        bridge.log.debug("effective config", config=cfg.redacted())
        if (no_key := startup.missing_key_warning(cfg)) is not None:
            bridge.log.warning(no_key)

    async def enter(self, stack: contextlib.AsyncExitStack) -> None:
        """Stop on SIGTERM and SIGINT (a second one: at once), and when the log's reader is gone;
        serve the web console."""
        stack.enter_context(stop_on_signals(self.bridge.stop))
        stack.callback(stop_when_log_gone(self.bridge.stop))
        cfg = self.bridge.config
        if cfg.console.enabled:
            # Imported here: aiohttp's web server (and the MIME table it loads) only when used.
            from bridge.runtime.console_source import BridgeSource, start_console

            bridge = self.bridge
            source = BridgeSource(
                cfg,
                bridge.config_source,
                bridge.table,
                lambda: bridge.stats() if bridge.dispatching else None,
                lambda: self.transport,
            )
            console = await start_console(source, bridge.log, stack)
            self.console, self.observer = console, console.observe

    def subscriptions(self) -> list[tuple[str, int]]:
        """Home Assistant's birth topic: discovery is published again when it restarts."""
        return self.status.subscriptions()

    def connected(self, transport: StatusTransport) -> None:
        """Publish state, info and discovery on the new connection."""
        self.status.transport = self.transport = transport
        self.status.broker, self.status.broker_warnings = (
            self.bridge.broker_info,
            self.bridge.broker_warnings,
        )
        self.status.announce(len(self.bridge.table))

    def serving(self, group: asyncio.TaskGroup) -> list[asyncio.Task[None]]:
        """Tell systemd; run the watchdog and stats loops."""
        cfg = self.bridge.config
        notify("READY=1\nSTATUS=connected, serving requests")
        self.bridge.log.info(
            "ready", methods=len(self.bridge.table), instance=cfg.mqtt.instance_name
        )
        loops: list[asyncio.Task[None]] = []
        interval = watchdog_interval()
        if interval:
            loops.append(group.create_task(_watchdog(interval)))
        if cfg.homeassistant.stats_interval > 0:
            loops.append(
                group.create_task(self.status.stats_loop(cfg.homeassistant.stats_interval))
            )
        return loops

    def take(self, message: InboundMessage) -> bool:
        """Home Assistant's birth message."""
        if message.topic != self.status.ha_status_topic:
            return False
        self.status.on_ha_status(message)
        return True

    def stopping(self, in_flight: int) -> dict[str, Any]:
        """Tell systemd; hint at the second signal when there is something to wait for."""
        notify("STOPPING=1\nSTATUS=finishing in-flight requests")
        return {"hint": "a second Ctrl-C (or SIGTERM) stops at once"} if in_flight else {}


class Worker:
    """One of `[runtime] workers`: reports to the supervisor and follows its commands."""

    def __init__(self, bridge: Bridge, link: WorkerLink) -> None:
        self.bridge = bridge
        self.link = link
        cfg = bridge.config.mqtt
        # Not retained (see the daemon): the group's other members reap this worker's realtime
        # sessions when it dies (docs/scaling.md#realtime-sessions).
        self.will: tuple[str, bytes] | None = (
            realtime_group.worker_will_topic(cfg.topic_prefix, cfg.instance_name, link.index),
            json.dumps(
                {
                    "state": "offline",
                    "member": realtime_group.member_name(cfg.instance_name, link.index),
                }
            ).encode(),
        )
        self.final_state: tuple[str, bytes] | None = None
        # The supervisor's console shows what the workers answer.
        self.observer: Callable[[Observed], None] | None = (
            self._report_request if bridge.config.console.enabled else None
        )

    def starting(self) -> None:
        """Nothing: the supervisor said it."""

    async def enter(self, stack: contextlib.AsyncExitStack) -> None:
        """Open the link, follow the supervisor's commands; report the final counters at exit."""
        await self.link.open()
        stack.push_async_callback(self._close)
        # Stop is the supervisor's command (even when it dies), never a signal of ours.
        follow = asyncio.create_task(self.link.follow(self.bridge.stop))

        async def stop_following() -> None:
            follow.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await follow

        stack.push_async_callback(stop_following)

    def _report_request(self, seen: Observed) -> None:
        self.link.send_line(workers.request_line(seen))

    async def _close(self) -> None:
        await self.link.close(self.bridge.stats() if self.bridge.dispatching else Stats())

    def subscriptions(self) -> list[tuple[str, int]]:
        """None: the supervisor listens for Home Assistant."""
        return []

    def connected(self, transport: StatusTransport) -> None:
        """Nothing: the supervisor publishes the state."""

    def serving(self, group: asyncio.TaskGroup) -> list[asyncio.Task[None]]:
        """Report `ready`; send the counters every second (the supervisor's sign of life)."""
        # Logged before it is reported: the supervisor's `ready` then always follows every
        # worker's own line in the log.
        self.bridge.log.info("worker ready", pid=os.getpid())
        self.link.send("ready")
        return [group.create_task(self.link.heartbeat(self.bridge.stats()))]

    def take(self, message: InboundMessage) -> bool:
        """Never: every message is a request."""
        return False

    def stopping(self, in_flight: int) -> dict[str, Any]:
        """Nothing beyond the log line."""
        return {}


async def _watchdog(interval: float) -> None:
    while True:
        notify("WATCHDOG=1")
        await asyncio.sleep(interval)
