"""The daemon: wires config, broker transport, service client and dispatcher; runs until stopped."""

from __future__ import annotations

import asyncio
import contextlib
import os
import platform
from pathlib import Path

from bridge import __version__
from bridge.config import BridgeConfig, MqttConfig
from bridge.errors import StartupError
from bridge.ha.status import OFFLINE, StatusPublisher
from bridge.journal.postgres import PgJournal
from bridge.journal.sqlite import Journal
from bridge.messages import InboundMessage
from bridge.methods.catalog import default_table
from bridge.methods.model import MethodTable
from bridge.mqtt.client import MqttTransport
from bridge.mqtt.trial_broker import (
    EMBEDDED_NOTICE,
    EmbeddedBroker,
    PortInUse,
    port_busy_message,
)
from bridge.pipeline.dispatch import Dispatcher
from bridge.pipeline.model import JournalLike
from bridge.pipeline.stats import Stats
from bridge.runtime import process, startup
from bridge.runtime.logs import get_logger
from bridge.runtime.signals import stop_on_signals
from bridge.runtime.systemd import notify, watchdog_interval
from bridge.service.aiohttp_transport import AiohttpTransport
from bridge.service.client import ServiceClient
from bridge.topics import Topics
from bridge.workers import protocol as workers
from bridge.workers.link import WorkerLink


class EmbeddedPortBusy(StartupError):
    """The embedded broker's port is taken (usually by a real broker already running)."""


class Bridge:
    """One running bridge instance; `run()` returns the process exit code.
    With `worker` it is one of several processes behind a supervisor
    (bridge/runtime/supervisor.py): it
    serves requests but publishes no state, info, stats or discovery (the supervisor does), takes
    its commands from the supervisor instead of signals and reports to it.
    """

    def __init__(
        self,
        config: BridgeConfig,
        table: MethodTable | None = None,
        *,
        config_source: str | None = None,
        worker: WorkerLink | None = None,
    ) -> None:
        self.config = config
        self.config_source = config_source
        """The config file in use (for the start-up summary), None for built-in defaults."""
        self.table = table or default_table()
        self.worker = worker
        context = {"worker": worker.index} if worker is not None else {}
        self.log = get_logger(instance=config.mqtt.instance_name, **context)
        self.stop_event = asyncio.Event()
        self.stop_now = asyncio.Event()
        """Set by a second stop request: skip the rest of the shutdown grace."""
        self.ready = asyncio.Event()
        self.topics = Topics(
            config.mqtt.topic_prefix, config.mqtt.instance_name, config.mqtt.shared_group
        )
        self.transport: MqttTransport | None = None
        self.dispatcher: Dispatcher | None = None
        self.status = StatusPublisher(config, self.topics, self.log, self._stats)
        self._follow: asyncio.Task[None] | None = None

    def stop(self) -> None:
        """Ask the bridge to shut down gracefully; asked again, at once (call on the loop)."""
        if self.stop_event.is_set():
            self.stop_now.set()
        self.stop_event.set()

    def _stats(self) -> Stats:
        assert self.dispatcher is not None
        return self.dispatcher.stats

    def _on_connected(self) -> None:
        assert self.transport is not None
        transport = self.transport
        self.log.info(
            "connected to broker",
            broker=f"{transport.config.host}:{transport.config.port}",
            protocol=transport.protocol_label,
            subscription=self.topics.subscription,
        )
        if self.worker is None:
            self.status.announce(len(self.table))

    async def run(self) -> int:
        """Start everything, serve until `stop()` or a signal, shut down gracefully; exit code.

        Raises StartupError (exit 78) when a part cannot start; what had started is closed.
        """
        cfg = self.config
        if self.worker is None:
            self.log.info(
                "starting",
                version=__version__,
                python=platform.python_version(),
                **startup.summary(cfg, self.config_source),
            )
            self.log.debug("effective config", config=cfg.redacted())
            if (no_key := startup.missing_key_warning(cfg)) is not None:
                self.log.warning(no_key)
        off = process.prepare_bridge()  # library internals: each checked against its version
        if off:
            self.log.info("library internals differ; their own behaviour is used", shims=off)
        # Everything started is closed in reverse order, however the start or the run ends.
        async with contextlib.AsyncExitStack() as stack:
            if self.worker is not None:
                await self.worker.open()
            mqtt_cfg, protocol = cfg.mqtt, None
            if cfg.mqtt.embedded:
                embedded = EmbeddedBroker("127.0.0.1", cfg.mqtt.port)
                await self._start_embedded(embedded)
                stack.push_async_callback(embedded.stop)
                mqtt_cfg = cfg.mqtt.model_copy(update={"host": "127.0.0.1"})
                protocol = "3.1.1"
            journal = await self._open_journal()
            if journal is not None:
                stack.push_async_callback(journal.close)
            service = ServiceClient(cfg.service, AiohttpTransport(cfg.service))
            await service.start()
            stack.push_async_callback(service.close)
            self.transport = transport = self._make_transport(mqtt_cfg, protocol)
            self.status.transport = transport
            stack.push_async_callback(transport.close)
            self.dispatcher = Dispatcher(
                config=cfg,
                table=self.table,
                service=service,
                publisher=transport,
                topics=self.topics,
                log=self.log,
                journal=journal,
            )
            if self.worker is None:
                stack.enter_context(stop_on_signals(self.stop))
            else:
                # Stop is the supervisor's command (even when it dies), never a signal of ours.
                stack.push_async_callback(self.worker.close, self.dispatcher.stats)
                self._follow = asyncio.create_task(self.worker.follow(self.stop))
                stack.push_async_callback(self._stop_following)
            if await self._connected(transport):
                await self._serve()
            await self._shutdown()
        self.log.info("stopped")
        return 0

    async def _open_journal(self) -> JournalLike | None:
        """The journal per `[journal]`, or None (said in the log) when off or unusable."""
        cfg = self.config.journal
        url = cfg.url.get_secret_value()
        if url:
            return await PgJournal.open(
                url,
                scope=cfg.scope,
                max_bytes=cfg.max_bytes,
                max_age=cfg.max_age,
                max_answer_bytes=cfg.max_answer_bytes,
                log=self.log,
            )
        return await asyncio.to_thread(
            Journal.open,
            Path(cfg.path),
            scope=cfg.scope,
            max_bytes=cfg.max_bytes,
            max_age=cfg.max_age,
            max_answer_bytes=cfg.max_answer_bytes,
            synchronous=cfg.synchronous,
            log=self.log,
            recent_seconds=self.config.limits.dedup_seconds,
        )

    async def _start_embedded(self, embedded: EmbeddedBroker) -> None:
        port = self.config.mqtt.port
        try:
            await embedded.start()
        except ImportError:
            raise StartupError(
                "no [mqtt] host set and the embedded trial broker is not installed: set [mqtt] "
                "host, or install it with pip install 'openai-mqtt-bridge[trial]'"
            ) from None
        except PortInUse:
            raise EmbeddedPortBusy(port_busy_message(port)) from None
        except Exception as exc:  # noqa: BLE001  (amqtt wraps other errors in its BrokerError)
            raise EmbeddedPortBusy(
                f"cannot start the embedded broker on 127.0.0.1:{port} ({exc}); if a broker "
                'already runs there, set [mqtt] host = "127.0.0.1" to use it'
            ) from None
        self.log.warning(EMBEDDED_NOTICE.format(host="127.0.0.1", port=port))

    def _make_transport(self, mqtt_cfg: MqttConfig, protocol: str | None) -> MqttTransport:
        cfg = self.config
        return MqttTransport(
            mqtt_cfg,
            subscription=self.topics.subscription,
            # Waited jobs stay unacknowledged for their whole wait, outside max_concurrency.
            receive_maximum=cfg.limits.max_concurrency + cfg.jobs.max_waiting,
            will=(self.topics.state, OFFLINE) if self.worker is None else None,
            on_message=self._submit,
            on_connected=self._on_connected,
            log=self.log,
            protocol=protocol,
            # Home Assistant announces restarts there; discovery is then published again.
            extra_subscriptions=self.status.subscriptions() if self.worker is None else [],
            # amqtt keeps no such leftovers, and its UNSUBSCRIBE handling is not worth a risk.
            unsubscribe=[] if cfg.mqtt.embedded else self._stale_subscriptions(),
        )

    async def _stop_following(self) -> None:
        if self._follow is not None:
            self._follow.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._follow

    def _stale_subscriptions(self) -> list[str]:
        """Request filters an earlier configuration may have left in our persistent session:
        the plain one in a group, the workers' group in plain mode. Both left in place would
        bring each request twice."""
        request_filter = self.topics.request_filter
        if self.config.mqtt.shared_group:
            return [request_filter]
        return [f"$share/{workers.default_group(self.config)}/{request_filter}"]

    async def _connected(self, transport: MqttTransport) -> bool:
        """Connect, unless `stop()` comes first; whether connected."""
        started = asyncio.create_task(transport.start())
        stopper = asyncio.create_task(self.stop_event.wait())
        try:
            await asyncio.wait({started, stopper}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (started, stopper):
                if not task.done():
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await task
        if not started.done() or started.cancelled():
            return False
        started.result()
        return True

    async def _serve(self) -> None:
        """Announce readiness and serve until `stop()`, with the background loops running."""
        cfg = self.config
        assert self.dispatcher is not None
        self.ready.set()
        async with asyncio.TaskGroup() as group:
            loops: list[asyncio.Task[None]] = []
            if self.worker is not None:
                self.worker.send("ready")
                self.log.info("worker ready", pid=os.getpid())
                loops.append(group.create_task(self.worker.heartbeat(self.dispatcher.stats)))
            else:
                notify("READY=1\nSTATUS=connected, serving requests")
                self.log.info("ready", methods=len(self.table), instance=cfg.mqtt.instance_name)
                interval = watchdog_interval()
                if interval:
                    loops.append(group.create_task(self._watchdog(interval)))
                if cfg.homeassistant.stats_interval > 0:
                    stats_every = cfg.homeassistant.stats_interval
                    loops.append(group.create_task(self.status.stats_loop(stats_every)))
            await self.stop_event.wait()
            for task in loops:
                task.cancel()

    def _submit(self, message: InboundMessage) -> None:
        if message.topic == self.status.ha_status_topic and self.worker is None:
            self.status.on_ha_status(message)
            return
        assert self.dispatcher is not None
        self.dispatcher.submit(message)

    async def _shutdown(self) -> None:
        assert self.dispatcher is not None and self.transport is not None
        grace = self.config.limits.shutdown_grace
        if self.worker is None:
            notify("STOPPING=1\nSTATUS=finishing in-flight requests")
        in_flight = self.dispatcher.in_flight
        # Only worth saying when there is something to wait for.
        hint = (
            {"hint": "a second Ctrl-C (or SIGTERM) stops at once"}
            if in_flight and self.worker is None
            else {}
        )
        self.log.info("stopping", in_flight=in_flight, grace_s=grace, **hint)
        drain = asyncio.create_task(self.dispatcher.drain(grace))
        now = asyncio.create_task(self.stop_now.wait())
        await asyncio.wait({drain, now}, return_when=asyncio.FIRST_COMPLETED)
        now.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await now
        if not drain.done():
            drain.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await drain
            self.log.warning(
                "second signal: stopping now; unfinished requests stay unacknowledged and the "
                "broker redelivers them",
                unfinished=self.dispatcher.in_flight,
            )
            await self.dispatcher.cancel_all()
        elif not drain.result():
            self.log.warning(
                "shutdown grace expired; unfinished requests stay unacknowledged for redelivery",
                unfinished=self.dispatcher.in_flight,
            )
            await self.dispatcher.cancel_all()
        final = (self.topics.state, OFFLINE) if self.worker is None else None
        await self.transport.close(final=final)

    async def _watchdog(self, interval: float) -> None:
        while True:
            notify("WATCHDOG=1")
            await asyncio.sleep(interval)
