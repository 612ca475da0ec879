"""`run` (the default) and `worker`: the daemon, one process or a supervisor's worker."""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import Callable
from typing import TYPE_CHECKING

from bridge.cli.common import config_note, load, print_problems
from bridge.config import BridgeConfig, load_config
from bridge.errors import EX_CONFIG, ConfigError

if TYPE_CHECKING:
    from bridge.pipeline.model import Observed
    from bridge.runtime.supervisor import Supervisor


def cmd_run(path: str | None, how: str = "--config") -> int:
    """Run the daemon until SIGTERM/SIGINT."""
    from bridge.errors import StartupError
    from bridge.runtime import logs
    from bridge.runtime.daemon import Bridge
    from bridge.runtime.process import pin_mmap_threshold
    from bridge.runtime.supervisor import Supervisor
    from bridge.workers.protocol import resolve_workers

    try:
        config, warnings = load(path)
    except ConfigError as exc:
        print_problems(exc, path)
        return EX_CONFIG
    configure_logs(config)
    log = logs.get_logger()
    log.info(config_note(path, how))
    for warning in warnings:
        log.warning(warning)
    loop_factory, loop_name = event_loop_factory(config.runtime.event_loop)
    if loop_factory is None and config.runtime.event_loop == "uvloop":
        log.error('[runtime] event_loop = "uvloop" but uvloop is not installed')
        return EX_CONFIG
    pinned = pin_mmap_threshold()  # a start-up step of its own: before any large request
    log.debug("event loop", loop=loop_name, mmap_threshold_pinned=pinned)
    count, fewer = resolve_workers(config)
    if fewer is not None:
        log.warning(f"running 1 worker, not {config.runtime.workers}: {fewer}")
    try:
        with asyncio.Runner(loop_factory=loop_factory) as runner:
            if count > 1:
                console = supervisor_console if config.console.enabled else None
                supervisor = Supervisor(config, count, config_source=path, console=console)
                return runner.run(supervisor.run())
            return runner.run(Bridge(config, config_source=path).run())
    except StartupError as exc:
        log.error(str(exc))
        return EX_CONFIG
    except KeyboardInterrupt:
        return 0


def cmd_worker(path: str | None, index: int, control_fd: int) -> int:
    """Run worker `index` of a supervisor, reporting on `control_fd`, until told to stop."""
    from bridge.errors import StartupError
    from bridge.runtime import logs
    from bridge.runtime.daemon import Bridge
    from bridge.runtime.process import pin_mmap_threshold
    from bridge.tools.config import check_tools
    from bridge.workers.link import WorkerLink
    from bridge.workers.protocol import resolve_workers, worker_config

    # The supervisor relays SIGTERM and Ctrl-C (which reach the whole process group) as commands.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        loaded = check_tools(load_config(path))
    except ConfigError as exc:
        print_problems(exc, path)
        return EX_CONFIG
    config = worker_config(loaded, index)
    # Worker 1 takes over the sessions of workers beyond the count (reduced since the last run);
    # in a group the user named, other hosts may use such ids: left alone there.
    count, _ = resolve_workers(loaded)
    dormant_from = count + 1 if index == 1 and not loaded.mqtt.shared_group else None
    configure_logs(config)
    log = logs.get_logger(worker=index)
    loop_factory, _ = event_loop_factory(config.runtime.event_loop)
    pin_mmap_threshold()
    bridge = Bridge(
        config,
        config_source=path,
        worker=WorkerLink(index, control_fd),
        dormant_from=dormant_from,
    )
    try:
        with asyncio.Runner(loop_factory=loop_factory) as runner:
            return runner.run(bridge.run())
    except StartupError as exc:
        log.error(str(exc))
        return EX_CONFIG


def configure_logs(config: BridgeConfig) -> None:
    """Logging per `[logging]`, with every secret in `config` redacted."""
    from bridge.runtime import logs

    logs.configure(
        config.logging.level,
        config.logging.format,
        config.secrets(),
        libraries=config.logging.libraries,
    )


def event_loop_factory(choice: str) -> tuple[Callable[[], asyncio.AbstractEventLoop] | None, str]:
    """The event loop factory for `[runtime] event_loop` and its name (None: asyncio's own)."""
    if choice == "asyncio":
        return None, "asyncio"
    try:
        import uvloop
    except ImportError:
        return None, "asyncio"
    return uvloop.new_event_loop, "uvloop"


async def supervisor_console(
    supervisor: Supervisor, stack: contextlib.AsyncExitStack
) -> Callable[[Observed], None]:
    """The web console of a supervisor: the summed counters, and what every worker answers."""
    from bridge.methods.catalog import default_table
    from bridge.runtime.console_source import BridgeSource, start_console

    source = BridgeSource(
        supervisor.config,
        supervisor.config_source,
        default_table(),
        supervisor.totals.total,
        lambda: supervisor.transport,
        workers=supervisor.count,
    )
    console = await start_console(source, supervisor.log, stack)
    return console.observe
