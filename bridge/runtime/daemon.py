"""The daemon: wires config, broker transport, service client and dispatcher; runs until stopped."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path
from typing import Any

from bridge.config import BridgeConfig, MqttConfig, ServiceConfig
from bridge.errors import EX_SOFTWARE, StartupError
from bridge.journal.postgres import PgJournal
from bridge.journal.sqlite import Journal
from bridge.messages import InboundMessage
from bridge.methods.catalog import default_table
from bridge.methods.model import MethodTable
from bridge.mqtt.client import MqttTransport
from bridge.mqtt.trial_broker import (
    EMBEDDED_NOTICE,
    EXISTING_BROKER_NOTICE,
    EmbeddedBroker,
    PortInUse,
    answers_mqtt,
    port_busy_message,
)
from bridge.mqtt.watch import TopicWatcher
from bridge.pipeline.dispatch import Dispatcher
from bridge.pipeline.model import JournalLike
from bridge.pipeline.stats import Stats
from bridge.presets.book import preset_problems
from bridge.realtime import group as realtime_group
from bridge.realtime import model as realtime_model
from bridge.realtime.manager import RealtimeManager
from bridge.realtime.websocket import AiohttpWebSockets
from bridge.redact import Redactor
from bridge.runtime import process
from bridge.runtime.logs import get_logger
from bridge.runtime.roles import Role, Standalone, Worker
from bridge.runtime.takeover import DormantSession, take_over
from bridge.service.aiohttp_transport import AiohttpTransport
from bridge.service.client import ServiceClient
from bridge.service.transport import HttpTransport
from bridge.tools.config import build_tools
from bridge.tools.runner import ToolRunner
from bridge.topics import Topics
from bridge.workers import protocol as workers
from bridge.workers.link import WorkerLink


def http_transport(config: ServiceConfig) -> HttpTransport:
    """The lean path with aiohttp behind it when `lean_http` is on and httptools is installed."""
    if config.lean_http:
        try:
            from bridge.service.lean_transport import LeanTransport
        except ImportError:  # no httptools wheel for this machine: aiohttp does it all
            return AiohttpTransport(config)
        return LeanTransport(config, AiohttpTransport(config))
    return AiohttpTransport(config)


class EmbeddedPortBusy(StartupError):
    """The embedded broker's port is taken (usually by a real broker already running)."""


class Bridge:
    """One running bridge instance; `run()` returns the process exit code.

    Its role decides what it shows the outside: standing alone it publishes the state (with the
    last will), info, stats and discovery and talks to systemd; as one of several processes
    behind a supervisor (bridge/runtime/supervisor.py) it only serves requests, takes its
    commands from the supervisor instead of signals and reports to it.
    """

    def __init__(
        self,
        config: BridgeConfig,
        table: MethodTable | None = None,
        *,
        config_source: str | None = None,
        worker: WorkerLink | None = None,
        dormant_from: int | None = None,
    ) -> None:
        self.config = config
        self.config_source = config_source
        """The config file in use (for the start-up summary), None for built-in defaults."""
        self.table = table or default_table()
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
        self.tool_runner: ToolRunner | None = None
        """Runs `[tools]` calls (`offer`, `execute`): for other front ends, e.g. realtime."""
        self.realtime: RealtimeManager | None = None
        """Realtime sessions; in a group each is pinned to the process that opened it."""
        self.worker_index = worker.index if worker is not None else None
        if dormant_from is None and worker is None and not config.mqtt.shared_group:
            dormant_from = 2
        self.dormant_from = None if config.mqtt.embedded else dormant_from
        """The first worker index whose session this bridge takes over at its first connect
        (bridge/runtime/takeover.py); None: none (a worker but the first, or a user's group)."""
        self._dormant: list[DormantSession] = []
        self.broker_warnings: list[str] = []
        """What the broker's last CONNACK weakens (bridge/mqtt/grants.py), said once each."""
        self.broker_info: dict[str, Any] = {}
        """What the broker's last CONNACK stated, for the info document."""
        self.role: Role = Standalone(self) if worker is None else Worker(self, worker)

    def stop(self) -> None:
        """Ask the bridge to shut down gracefully; asked again, at once (call on the loop)."""
        if self.stop_event.is_set():
            self.stop_now.set()
        self.stop_event.set()

    def stats(self) -> Stats:
        """The request counters (the dispatcher's; it exists once `run()` has started it)."""
        assert self.dispatcher is not None
        return self.dispatcher.stats

    @property
    def dispatching(self) -> bool:
        """Whether `run()` has made the dispatcher (it holds the counters)."""
        return self.dispatcher is not None

    def _on_connected(self) -> None:
        assert self.transport is not None
        transport = self.transport
        self.log.info(
            "connected to broker",
            broker=f"{transport.config.host}:{transport.config.port}",
            protocol=transport.protocol_label,
            subscription=self.topics.subscription,
        )
        warnings = transport.grants.weakened(self.config)
        if warnings != self.broker_warnings:
            for warning in warnings:
                self.log.warning(warning)
        self.broker_warnings = warnings
        self.broker_info = transport.grants.as_info()
        self.role.connected(transport)

    async def run(self) -> int:
        """Start everything, serve until `stop()` or a signal, shut down; the exit code.

        Every way out (a stop, a signal, an internal error in a background loop) drains and
        cancels the requests, publishes `offline` where the role owns the state and closes what
        was started. Raises StartupError (exit 78) when a part cannot start.
        """
        self.role.starting()
        off = process.prepare_bridge()  # library internals: each checked against its version
        if off:
            self.log.info("library internals differ; their own behaviour is used", shims=off)
        code = 0
        # Everything started is closed in reverse order, however the start or the run ends.
        async with contextlib.AsyncExitStack() as stack:
            await self.role.enter(stack)
            cfg = self.config
            mqtt_cfg, protocol = cfg.mqtt, None
            if cfg.mqtt.embedded and await answers_mqtt("127.0.0.1", cfg.mqtt.port):
                self.log.warning(
                    EXISTING_BROKER_NOTICE.format(host="127.0.0.1", port=cfg.mqtt.port)
                )
                mqtt_cfg = cfg.mqtt.model_copy(update={"host": "127.0.0.1"})
            elif cfg.mqtt.embedded:
                embedded = EmbeddedBroker("127.0.0.1", cfg.mqtt.port)
                await self._start_embedded(embedded)
                stack.push_async_callback(embedded.stop)
                mqtt_cfg = cfg.mqtt.model_copy(update={"host": "127.0.0.1"})
                protocol = "3.1.1"
            journal = await self._open_journal()
            if journal is not None:
                stack.push_async_callback(journal.close)
            service = ServiceClient(
                cfg.service,
                http_transport(cfg.service),
                max_answer_bytes=cfg.limits.max_answer_bytes,
            )
            await service.start()
            stack.push_async_callback(service.close)
            self.transport = transport = self._make_transport(mqtt_cfg, protocol)
            stack.push_async_callback(transport.close)
            runner, watcher = self._tool_runner(mqtt_cfg, transport, journal)
            self.tool_runner = runner
            self.dispatcher = Dispatcher(
                config=cfg,
                table=self.table,
                service=service,
                publisher=transport,
                topics=self.topics,
                log=self.log,
                journal=journal,
                observer=self.role.observer,
                tools=runner,
                owner=mqtt_cfg.effective_client_id,
            )
            stack.push_async_callback(self._shutdown)
            sockets = AiohttpWebSockets(cfg.service.connect_timeout, cfg.realtime.heartbeat)
            stack.push_async_callback(sockets.close)
            self.realtime = RealtimeManager(
                config=cfg,
                publisher=transport,
                connector=sockets,
                log=self.log,
                serving=self._serves_realtime(),
                tools=runner,
                member=self._realtime_member(),
            )
            # Closed before the final state: each session publishes `closed` (`shutdown`).
            stack.push_async_callback(self.realtime.close_all)
            # Before connecting: the waits resumed count in the pool from the first request on.
            await self.dispatcher.resume_waits()
            if await self._connected(transport):
                self.dispatcher.online()
                if watcher is not None:
                    await self._start_watcher(watcher)
                    stack.push_async_callback(watcher.close)
                try:
                    await self._serve()
                except* Exception as failure:  # noqa: BLE001  (any bug: stop, never hang)
                    self.log.error(
                        "internal error: stopping",
                        error="; ".join(f"{type(e).__name__}: {e}" for e in failure.exceptions),
                    )
                    code = EX_SOFTWARE
        self.log.info("stopped")
        return code

    def _tool_runner(
        self, mqtt_cfg: MqttConfig, transport: MqttTransport, journal: JournalLike | None
    ) -> tuple[ToolRunner | None, TopicWatcher | None]:
        """The tool runner of `[tools]` (None when none are declared) and its topic reader."""
        cfg = self.config
        tools, problems = build_tools(cfg)
        problems += preset_problems(cfg)
        if problems:
            raise StartupError("invalid [tools]: " + "; ".join(problems))
        if not tools:
            return None, None
        reads = any(t.config.kind != "publish" for t in tools.values())
        watcher = TopicWatcher(mqtt_cfg, f"{mqtt_cfg.effective_client_id}-tools") if reads else None
        runner = ToolRunner(
            tools,
            transport,
            watcher,
            self.log,
            journal=journal,
            audit_topic=self.topics.audit if cfg.tool_loop.audit else None,
            redactor=Redactor(cfg.secrets()),
            max_output_bytes=cfg.tool_loop.max_output_bytes,
        )
        return runner, watcher

    async def _start_watcher(self, watcher: TopicWatcher) -> None:
        """Connect the tools' reading connection (read and request tools time out without it)."""
        try:
            await watcher.start()
        except (OSError, TimeoutError) as exc:
            self.log.warning("tool topic reader not connected; it retries", error=str(exc)[:200])

    def _make_transport(self, mqtt_cfg: MqttConfig, protocol: str | None) -> MqttTransport:
        cfg = self.config
        return MqttTransport(
            mqtt_cfg,
            subscription=self.topics.subscription,
            # Waited jobs stay unacknowledged for their whole wait, outside max_concurrency.
            receive_maximum=cfg.limits.max_concurrency + cfg.jobs.max_waiting,
            will=self.role.will,
            # A worker's will only tells its group it is gone; its supervisor holds the state.
            will_retain=isinstance(self.role, Standalone),
            on_message=self._submit,
            on_connected=self._on_connected,
            log=self.log,
            protocol=protocol,
            extra_subscriptions=[
                *self.role.subscriptions(),
                *self._realtime_subscriptions(),
                *([(self.topics.ask_subscription, 1)] if cfg.presets else []),
            ],
            # amqtt keeps no such leftovers, and its UNSUBSCRIBE handling is not worth a risk.
            unsubscribe=[] if cfg.mqtt.embedded else self._stale_subscriptions(),
            before_first_subscribe=self._take_over_dormant if self.dormant_from else None,
            shared_probe=(
                self.topics.probe(mqtt_cfg.effective_client_id)
                if cfg.mqtt.shared_group_check
                else None
            ),
        )

    def _serves_realtime(self) -> bool:
        """Whether this process serves realtime sessions (`[realtime] enabled`)."""
        return self.config.realtime.enabled

    def _realtime_member(self) -> str | None:
        """This process's name in its group's realtime topics; None outside any group."""
        if not self.config.mqtt.shared_group:
            return None
        return realtime_group.member_name(self.config.mqtt.instance_name, self.worker_index)

    def _realtime_subscriptions(self) -> list[tuple[str, int]]:
        """The retained session states, read at each connect to close what a crash left open;
        in a group also the claims, this member's input topics and the others' last wills."""
        if not self._serves_realtime():
            return []
        prefix = self.config.mqtt.topic_prefix
        states = [(f"{prefix}/response/{kind}/+/state", 1) for kind in realtime_model.KINDS]
        member = self._realtime_member()
        if member is None:
            return states
        return [*states, *realtime_group.subscriptions(prefix, member)]

    async def _take_over_dormant(self) -> None:
        """Drain and end the sessions of workers that no longer run, before subscribing."""
        assert self.transport is not None and self.dormant_from is not None
        self._dormant = await take_over(
            self.config,
            self.dormant_from,
            self.transport.protocol_label,
            self._submit,
            self.log,
        )
        if self._dormant:
            self.log.info(
                "taking over the sessions of workers that no longer run",
                workers=[s.index for s in self._dormant],
                requests=sum(s.handed_over for s in self._dormant),
            )

    def _stale_subscriptions(self) -> list[str]:
        """Request filters an earlier configuration may have left in our persistent session:
        the plain one in a group, the workers' group (and a group's realtime topics) in plain
        mode. Both left in place would bring each request twice."""
        filters = [self.topics.request_filter, self.topics.ask_filter]  # requests, preset questions
        if self.config.mqtt.shared_group:
            return filters
        stale = [f"$share/{workers.default_group(self.config)}/{f}" for f in filters]
        # A group's realtime topics (worker 1 keeps this session): claims, wills, pinned input.
        prefix, instance = self.config.mqtt.topic_prefix, self.config.mqtt.instance_name
        for member in (instance, realtime_group.member_name(instance, 1)):
            stale += [f for f, _ in realtime_group.subscriptions(prefix, member) if f not in stale]
        return stale

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
        """Announce readiness and serve until `stop()`, with the role's background loops."""
        self.ready.set()
        async with asyncio.TaskGroup() as group:
            loops = self.role.serving(group)
            await self.stop_event.wait()
            for task in loops:
                task.cancel()

    def _submit(self, message: InboundMessage) -> None:
        if self.role.take(message):
            return
        if self.realtime is not None and self.realtime.takes(message.topic):
            self.realtime.submit(message)
            return
        assert self.dispatcher is not None
        self.dispatcher.submit(message)

    async def _shutdown(self) -> None:
        """Drain (or, on a second stop, cancel) the requests, then publish the final state."""
        assert self.dispatcher is not None and self.transport is not None
        self.stop_event.set()
        grace = self.config.limits.shutdown_grace
        in_flight = self.dispatcher.in_flight
        self.log.info(
            "stopping", in_flight=in_flight, grace_s=grace, **self.role.stopping(in_flight)
        )
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
        elif not drain.result():
            self.log.warning(
                "shutdown grace expired; unfinished requests stay unacknowledged for redelivery",
                unfinished=self.dispatcher.in_flight,
            )
        await self.dispatcher.cancel_all()  # nothing of a request outlives the bridge
        for session in self._dormant:
            await session.close()
        await self.transport.close(final=self.role.final_state)

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
