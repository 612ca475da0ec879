"""The supervisor of `[runtime] workers = N`: N bridge processes, one bridge to the outside.

Each worker is `python -m bridge worker --index I --control-fd FD`: an ordinary bridge in one
shared-subscription group with its own client id and journal (bridge/workers/protocol.py). The
supervisor starts them, restarts one that dies (with backoff) or stops reporting, stops them all on
SIGTERM or Ctrl-C (a second one: at once), and is the only one that talks to systemd and publishes
the bridge's state, info, summed stats and Home Assistant discovery, on its own MQTT connection
whose last will marks the bridge offline.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import platform
import signal
import socket
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from bridge import __version__
from bridge.backoff import Backoff
from bridge.config import BridgeConfig
from bridge.errors import EX_CONFIG, EX_SOFTWARE
from bridge.ha.status import OFFLINE, ONLINE, StatusPublisher
from bridge.messages import InboundMessage
from bridge.methods.catalog import default_table
from bridge.mqtt.client import MqttTransport
from bridge.pipeline.model import Observed
from bridge.runtime import process, startup
from bridge.runtime.logs import get_logger, stop_when_log_gone
from bridge.runtime.signals import stop_on_signals
from bridge.runtime.systemd import notify, watchdog_interval
from bridge.topics import Topics
from bridge.workers import protocol as workers

STABLE_SECONDS = 60.0
"""A worker that ran this long before dying is restarted after the shortest delay again."""
STOP_NOW_SECONDS = 5.0
"""After `stop-now`, a worker still running this much later is killed (a stuck event loop)."""


@dataclass(slots=True)
class _Worker:
    index: int
    backoff: Backoff
    process: asyncio.subprocess.Process | None = None
    control: asyncio.StreamWriter | None = None
    ready: bool = False
    last_report: float = 0.0
    started_at: float = 0.0


ConsoleStarter = Callable[
    ["Supervisor", contextlib.AsyncExitStack], Awaitable[Callable[[Observed], None]]
]
"""Serves the console for a supervisor until the stack closes; what to tell of each request."""


class Supervisor:
    """Runs `count` workers for `config`; `run()` returns the process exit code."""

    def __init__(
        self,
        config: BridgeConfig,
        count: int,
        *,
        config_source: str | None = None,
        python: str = sys.executable,
        console: ConsoleStarter | None = None,
    ) -> None:
        self.config = config
        self.count = count
        self.config_source = config_source
        self.python = python
        self.console = console
        """Starts the web console with the summed view (given by the command line when the
        console is on: this module itself never loads aiohttp)."""
        self.observe_request: Callable[[Observed], None] | None = None
        self.log = get_logger(instance=config.mqtt.instance_name, role="supervisor")
        self.topics = Topics(config.mqtt.topic_prefix, config.mqtt.instance_name)
        self.totals = workers.StatsTotals()
        self.status = StatusPublisher(
            config, self.topics, self.log, self.totals.total, workers=count
        )
        self.methods = len(default_table())
        self.workers = [
            _Worker(i, Backoff(config.mqtt.reconnect_min, config.mqtt.reconnect_max))
            for i in range(1, count + 1)
        ]
        self.stop_event = asyncio.Event()
        self.stop_now = asyncio.Event()
        self.all_ready = asyncio.Event()
        self.exit_code = 0
        self.transport: MqttTransport | None = None

    def stop(self, code: int = 0) -> None:
        """Stop every worker gracefully; asked again, at once (call on the loop)."""
        if self.stop_event.is_set():
            if not self.stop_now.is_set():
                asyncio.get_running_loop().call_later(STOP_NOW_SECONDS, self._kill_remaining)
            self.stop_now.set()
            self._command(workers.STOP_NOW)
        else:
            self.exit_code = self.exit_code or code
            self._command(workers.STOP)
        self.stop_event.set()

    async def run(self) -> int:
        """Start the workers and the status connection, serve until stopped; exit code."""
        cfg = self.config
        self.log.info(
            "starting",
            version=__version__,
            python=platform.python_version(),
            workers=self.count,
            group=workers.group(cfg),
            **startup.summary(cfg, self.config_source),
        )
        if (no_key := startup.missing_key_warning(cfg)) is not None:
            self.log.warning(no_key)
        off = process.prepare_supervisor()  # for the status connection; workers check their own
        if off:
            self.log.info("library internals differ; their own behaviour is used", shims=off)
        async with contextlib.AsyncExitStack() as stack:
            stack.enter_context(stop_on_signals(self.stop))
            stack.callback(stop_when_log_gone(self.stop))
            mqtt_cfg = cfg.mqtt.model_copy(update={"client_id": workers.supervisor_client_id(cfg)})
            self.transport = transport = MqttTransport(
                mqtt_cfg,
                subscription=None,
                receive_maximum=16,
                will=(self.topics.state, OFFLINE),
                on_message=self._on_message,
                on_connected=self._on_connected,
                log=self.log,
                extra_subscriptions=self.status.subscriptions(),
            )
            self.status.transport = transport
            stack.push_async_callback(transport.close)
            stack.push_async_callback(self._final_state)  # every way out leaves `offline`
            stack.push_async_callback(self._reap_workers)  # ... and no worker running
            if self.console is not None:
                self.observe_request = await self.console(self, stack)
            try:
                await self._serve(transport)
            except* Exception as failure:  # noqa: BLE001  (any bug: stop, never hang)
                self.log.error(
                    "internal error: stopping",
                    error="; ".join(f"{type(e).__name__}: {e}" for e in failure.exceptions),
                )
                self.exit_code = EX_SOFTWARE
        self.log.info("stopped", exit_code=self.exit_code)
        return self.exit_code

    async def _serve(self, transport: MqttTransport) -> None:
        """Keep the workers and the status connection until stopped, then drain the workers."""
        cfg = self.config
        async with asyncio.TaskGroup() as group:
            keepers = [group.create_task(self._keep(w)) for w in self.workers]
            connecting = group.create_task(transport.start())
            announcing = group.create_task(self._announce_when_ready())
            watch = group.create_task(self._watch())
            stats = None
            if cfg.homeassistant.stats_interval > 0:
                stats = group.create_task(self.status.stats_loop(cfg.homeassistant.stats_interval))
            await self.stop_event.wait()
            notify("STOPPING=1\nSTATUS=workers finishing in-flight requests")
            self.log.info("stopping", workers=self.count)
            await asyncio.gather(*keepers)
            for task in (connecting, announcing, watch, stats):
                if task is not None:
                    task.cancel()

    async def _reap_workers(self) -> None:
        """Wait for the workers still running (an internal error closed their links: each
        drains as on `stop`); kill those left after the shutdown grace and STOP_NOW_SECONDS."""
        processes = [worker.process for worker in self.workers]
        running = [p for p in processes if p is not None and p.returncode is None]
        if not running:
            return
        waits = asyncio.gather(*(process.wait() for process in running))
        bound = self.config.limits.shutdown_grace + STOP_NOW_SECONDS
        try:
            await asyncio.wait_for(asyncio.shield(waits), bound)
        except TimeoutError:
            self._kill_remaining()
            await waits

    async def _final_state(self) -> None:
        """The summed counters and the retained `offline`, then disconnect."""
        transport = self.transport
        assert transport is not None
        if transport.connected.is_set():
            self.status.publish_stats()
        await transport.close(final=(self.topics.state, OFFLINE))

    # --- the workers --------------------------------------------------------------------------

    async def _keep(self, worker: _Worker) -> None:
        """Run worker `worker` until the supervisor stops, restarting it when it dies."""
        while not self.stop_event.is_set():
            code = await self._run_worker(worker)
            self.totals.retire(worker.index)
            if self.stop_event.is_set():
                return
            if code == EX_CONFIG and not worker.ready:
                self.log.error("worker cannot start; stopping", worker=worker.index)
                self.stop(EX_CONFIG)
                return
            if time.monotonic() - worker.started_at >= STABLE_SECONDS:
                worker.backoff.reset()
            delay = worker.backoff.next_delay()
            worker.ready = False
            self.log.warning(
                "worker died; starting another",
                worker=worker.index,
                exit=_describe_exit(code),
                retry_in_s=round(delay, 2),
            )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stop_event.wait(), delay)

    async def _run_worker(self, worker: _Worker) -> int:
        """Start worker `worker`, read its reports until it exits; its exit status."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        command = [
            self.python,
            "-m",
            "bridge",
            "worker",
            "--index",
            str(worker.index),
            "--control-fd",
            str(theirs.fileno()),
        ]
        if self.config_source is not None:
            command += ["--config", self.config_source]
        try:
            process = await asyncio.create_subprocess_exec(
                *command, pass_fds=(theirs.fileno(),), env=workers.worker_environ(os.environ)
            )
        except OSError as exc:  # out of processes or memory: worth another try later
            ours.close()
            self.log.error("cannot start a worker", worker=worker.index, error=str(exc))
            worker.started_at = time.monotonic()
            return 1
        finally:
            theirs.close()
        worker.process, worker.started_at = process, time.monotonic()
        worker.last_report = worker.started_at
        self.log.info("worker started", worker=worker.index, pid=process.pid)
        reader, writer = await asyncio.open_unix_connection(sock=ours, limit=workers.MAX_LINE)
        worker.control = writer
        if self.stop_now.is_set():
            self._send(worker, workers.STOP_NOW)
        elif self.stop_event.is_set():
            self._send(worker, workers.STOP)
        try:
            await self._read_reports(worker, reader)
            return await process.wait()
        finally:
            worker.control = None
            writer.close()
            with contextlib.suppress(ConnectionError, OSError):
                await writer.wait_closed()

    async def _read_reports(self, worker: _Worker, reader: asyncio.StreamReader) -> None:
        while True:
            try:
                line = await reader.readline()
            except ValueError:  # longer than MAX_LINE (report_line never writes one): skip it
                continue
            except ConnectionError:
                return
            if not line:
                return
            if self.observe_request is not None and line.startswith(b'{"event":"request"'):
                seen = workers.parse_request(line)
                if seen is not None:
                    self.observe_request(seen)
                continue
            parsed = workers.parse_report(line)
            if parsed is None:
                continue
            event, stats = parsed
            worker.last_report = time.monotonic()
            if stats is not None:
                self.totals.update(worker.index, stats)
            if event == "ready":
                worker.ready = True
                self._check_all_ready()

    def _check_all_ready(self) -> None:
        if all(w.ready for w in self.workers) and not self.all_ready.is_set():
            self.all_ready.set()

    def _kill_remaining(self) -> None:
        for worker in self.workers:
            process = worker.process
            if process is not None and process.returncode is None:
                self.log.warning("worker did not stop; killing it", worker=worker.index)
                with contextlib.suppress(ProcessLookupError):
                    process.kill()

    def _command(self, line: bytes) -> None:
        for worker in self.workers:
            self._send(worker, line)

    def _send(self, worker: _Worker, line: bytes) -> None:
        writer = worker.control
        if writer is not None and not writer.is_closing():
            writer.write(line)

    async def _watch(self) -> None:
        """Kill a worker that stopped reporting; ping systemd's watchdog while all are well."""
        interval = watchdog_interval()
        last_ping = 0.0
        limit = self.config.runtime.worker_silence
        while True:
            await asyncio.sleep(workers.HEARTBEAT_SECONDS)
            now = time.monotonic()
            for worker in self.workers:
                silent = now - worker.last_report
                process = worker.process
                # Reports start once serving and end when draining: silence counts in between.
                if not worker.ready or self.stop_event.is_set():
                    continue
                if process is None or process.returncode is not None:
                    continue
                if silent > limit:
                    self.log.error(
                        "worker stopped reporting; killing it", worker=worker.index, silent_s=silent
                    )
                    with contextlib.suppress(ProcessLookupError):
                        process.kill()
            healthy = all(w.ready and now - w.last_report <= limit for w in self.workers)
            if interval and healthy and now - last_ping >= interval:
                notify("WATCHDOG=1")
                last_ping = now

    # --- the status connection ----------------------------------------------------------------

    async def _announce_when_ready(self) -> None:
        await self.all_ready.wait()
        notify(f"READY=1\nSTATUS=serving requests with {self.count} workers")
        self.log.info(
            "ready",
            workers=self.count,
            pids=[w.process.pid for w in self.workers if w.process is not None],
            methods=self.methods,
        )
        if self.transport is not None and self.transport.connected.is_set():
            self.status.publish_state(ONLINE)

    def _on_connected(self) -> None:
        assert self.transport is not None
        self.log.info(
            "connected to broker",
            broker=self.transport.describe(),
            client_id=workers.supervisor_client_id(self.config),
        )
        warnings = self.transport.grants.weakened(self.config)
        if warnings != self.status.broker_warnings:
            for warning in warnings:
                self.log.warning(warning)
        self.status.broker = self.transport.grants.as_info()
        self.status.broker_warnings = warnings
        # Online only once every worker serves; until then the last will's `offline` stands.
        self.status.announce(self.methods, online=self.all_ready.is_set())
        if not self.all_ready.is_set():
            self.status.publish_state(OFFLINE)

    def _on_message(self, message: InboundMessage) -> None:
        if message.topic == self.status.ha_status_topic:
            self.status.on_ha_status(message)
        elif self.transport is not None:
            self.transport.ack(message)


def _describe_exit(code: int) -> str:
    """`status 1` or `killed by SIGKILL` for a child's return code."""
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"status {code}"
