"""Command line: `run` (default), `check-config`, `methods`, `describe`, `call`, `--version`."""

from __future__ import annotations

import argparse
import asyncio
import base64
import os
import signal
import sys
import threading
import uuid
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import orjson

from bridge import __version__
from bridge.cli.callreply import CallOutcome, ReplyCollector, options_from_flags
from bridge.config import BridgeConfig, load_config
from bridge.errors import EX_CONFIG, ConfigError, InvalidParameter
from bridge.jsoncodec import dumps, loads

EX_USAGE = 64
EX_NOINPUT = 66
EX_UNAVAILABLE = 69
EX_TEMPFAIL = 75
EX_INTERRUPTED = 130
EX_BROKEN_PIPE = 141

CONFIG_SEARCH = ("config/bridge.toml", "/etc/openai-mqtt-bridge/bridge.toml")
"""Where a config file is looked for when neither --config nor $OMB_CONFIG names one."""

CALL_EXIT_CODES = """exit status:
  0   the reply says "ok"           1   the reply is an error reply (printed)
  64  bad arguments or payload      66  a --file cannot be read
  69  broker unreachable, or no bridge online on the topic prefix
  75  no reply within --timeout     78  invalid configuration
  130 interrupted (Ctrl-C)"""

# How long `call` waits for a bridge's retained `online` state after subscribing; a broker sends
# retained messages right after the SUBACK, so this only bounds a slow broker.
PRESENCE_WAIT = 2.0


def _parser() -> argparse.ArgumentParser:
    config_help = (
        "TOML config file (default: $OMB_CONFIG, else ./config/bridge.toml, else "
        "/etc/openai-mqtt-bridge/bridge.toml, else built-in defaults)"
    )
    parser = argparse.ArgumentParser(
        prog="openai-mqtt-bridge", description="Every OpenAI REST operation over MQTT."
    )
    parser.add_argument("--config", "-c", default=None, help=config_help)
    # Sub-commands accept --config too; SUPPRESS keeps them from resetting a global --config.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", "-c", default=argparse.SUPPRESS, help=config_help)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="{run,check-config,methods,describe,call}")
    sub.add_parser("run", parents=[common], help="run the bridge (the default)")
    # One of `[runtime] workers`, started by the supervisor (bridge/workers/supervisor.py); not for
    # users.
    worker = sub.add_parser("worker", parents=[common])
    worker.add_argument("--index", type=int, required=True)
    worker.add_argument("--control-fd", type=int, required=True)
    sub.add_parser("check-config", parents=[common], help="validate the config and print it")
    methods = sub.add_parser("methods", parents=[common], help="list the methods")
    methods.add_argument("--group", help="only this group (e.g. chat, audio, assistants)")
    describe = sub.add_parser("describe", parents=[common], help="describe one method")
    describe.add_argument("method")
    call = sub.add_parser(
        "call",
        parents=[common],
        help="call a method over MQTT and print the reply",
        description="Publish one request to a running bridge, wait for its reply, print it.",
        epilog=CALL_EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    call.add_argument("method")
    call.add_argument("payload", nargs="?", default="{}", help="JSON object, or - for stdin")
    call.add_argument(
        "--file",
        "-f",
        action="append",
        default=[],
        metavar="FIELD=PATH",
        help="send a local file in FIELD (read, base64-encoded and named for you); repeatable",
    )
    call.add_argument(
        "--timeout",
        type=float,
        default=60.0,
        metavar="SECONDS",
        help="how long to wait for the reply (default: %(default)g)",
    )
    call.add_argument("--suffix", default="", help="topic suffix (default: a fresh id)")
    reply = call.add_argument_group("reply options (the request's _bridge key)")
    reply.add_argument("--select", help="JMESPath expression picking the part of the answer")
    reply.add_argument("--format", choices=("json", "plain", "raw"), dest="reply_format")
    reply.add_argument("--max-bytes", type=int, help="plain: cut longer text, marked with ...")
    reply.add_argument("--chunk-bytes", type=int, help="raw: receive the bytes in chunks")
    reply.add_argument("--output", "-o", help="write the reply there instead of stdout")
    return parser


def find_config(
    explicit: str | None, environ: Mapping[str, str] | None = None
) -> tuple[str | None, str]:
    """The config file and why: --config, $OMB_CONFIG, then `CONFIG_SEARCH`; None: defaults."""
    env = os.environ if environ is None else environ
    if explicit:
        return explicit, "--config"
    if env.get("OMB_CONFIG"):
        return env["OMB_CONFIG"], "$OMB_CONFIG"
    for candidate in CONFIG_SEARCH:
        if os.path.isfile(candidate):
            return candidate, "found"
    return None, "no file found"


def _config_note(path: str | None, how: str) -> str:
    """One line saying which configuration is in force."""
    if path is None:
        return f"config: built-in defaults (no {' or '.join(CONFIG_SEARCH)})"
    return f"config: {path} ({how})" if how != "found" else f"config: {path}"


def _load(path: str | None) -> tuple[BridgeConfig, list[str]]:
    warnings: list[str] = []
    config = load_config(path, warnings=warnings)
    return config, warnings


def _print_problems(exc: ConfigError, path: str | None) -> None:
    if exc.from_env:
        where = f"{path} and the environment" if path else "the environment"
    else:
        where = path or "defaults"
    print(f"invalid configuration ({where}):", file=sys.stderr)
    for problem in exc.problems:
        print(f"  {problem}", file=sys.stderr)


def _unknown_method(name: str) -> str:
    """`unknown method 'x'` with the closest method names."""
    from bridge.methods.model import default_table

    return default_table().unknown(name)


def cmd_run(path: str | None, how: str = "--config") -> int:
    """Run the daemon until SIGTERM/SIGINT."""
    from bridge.errors import StartupError
    from bridge.runtime import logs
    from bridge.runtime.allocator import pin_mmap_threshold
    from bridge.runtime.daemon import Bridge
    from bridge.workers.protocol import resolve_workers
    from bridge.workers.supervisor import Supervisor

    try:
        config, warnings = _load(path)
    except ConfigError as exc:
        _print_problems(exc, path)
        return EX_CONFIG
    _configure_logs(config)
    log = logs.get_logger()
    log.info(_config_note(path, how))
    for warning in warnings:
        log.warning(warning)
    loop_factory, loop_name = _loop_factory(config.runtime.event_loop)
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
                return runner.run(Supervisor(config, count, config_source=path).run())
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
    from bridge.runtime.allocator import pin_mmap_threshold
    from bridge.runtime.daemon import Bridge
    from bridge.workers.link import WorkerLink
    from bridge.workers.protocol import worker_config

    # The supervisor relays SIGTERM and Ctrl-C (which reach the whole process group) as commands.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        config = worker_config(load_config(path), index)
    except ConfigError as exc:
        _print_problems(exc, path)
        return EX_CONFIG
    _configure_logs(config)
    log = logs.get_logger(worker=index)
    loop_factory, _ = _loop_factory(config.runtime.event_loop)
    pin_mmap_threshold()
    bridge = Bridge(config, config_source=path, worker=WorkerLink(index, control_fd))
    try:
        with asyncio.Runner(loop_factory=loop_factory) as runner:
            return runner.run(bridge.run())
    except StartupError as exc:
        log.error(str(exc))
        return EX_CONFIG


def _configure_logs(config: BridgeConfig) -> None:
    """Logging per `[logging]`, with every secret in `config` redacted."""
    from bridge.runtime import logs

    logs.configure(
        config.logging.level,
        config.logging.format,
        config.secrets(),
        libraries=config.logging.libraries,
    )


def _loop_factory(choice: str) -> tuple[Callable[[], asyncio.AbstractEventLoop] | None, str]:
    """The event loop factory for `[runtime] event_loop` and its name (None: asyncio's own)."""
    if choice == "asyncio":
        return None, "asyncio"
    try:
        import uvloop
    except ImportError:
        return None, "asyncio"
    return uvloop.new_event_loop, "uvloop"


def cmd_check_config(path: str | None, how: str = "--config") -> int:
    """Validate the config; print the effective (redacted) config or every problem."""
    print(_config_note(path, how), file=sys.stderr)
    try:
        config, warnings = _load(path)
    except ConfigError as exc:
        _print_problems(exc, path)
        return EX_CONFIG
    for warning in warnings:
        print(f"warning: {warning}", file=sys.stderr)
    print(orjson.dumps(config.redacted(), option=orjson.OPT_INDENT_2).decode())
    return 0


def cmd_methods(group: str | None, path: str | None) -> int:
    """Print one line per method: name, group, verb, path (the config is checked, not used)."""
    from bridge.methods.model import default_table

    try:
        _load(path)
    except ConfigError as exc:
        _print_problems(exc, path)
        return EX_CONFIG
    table = default_table()
    every = (*table.operations, *table.extra)
    rows = [op for op in every if group is None or op.group == group.lower()]
    if not rows:
        groups = sorted({op.group for op in every})
        print(f"no methods in group {group!r}; groups: {', '.join(groups)}", file=sys.stderr)
        return EX_USAGE
    # callEndpoint takes its verb and path from the payload.
    lines = [
        (op, "ANY", "/<path from the payload>") if op.generic else (op, op.verb, op.path)
        for op in rows
    ]
    name_width = max(len(op.name) for op in rows)
    group_width = max(len(op.group) for op in rows)
    verb_width = max(len(verb) for _, verb, _ in lines)
    for op, verb, op_path in lines:
        flags = " (retired)" if op.retired else (" (deprecated)" if op.deprecated else "")
        print(
            f"{op.name:<{name_width}}  {op.group:<{group_width}}  {verb:<{verb_width}}  "
            f"{op_path}{flags}"
        )
    return 0


def cmd_describe(name: str, path: str | None) -> int:
    """Print what to put in the payload of one method."""
    from bridge.methods.describe import describe
    from bridge.methods.model import default_table

    op = default_table().find(name)
    if op is None:
        print(_unknown_method(name), file=sys.stderr)
        return EX_USAGE
    try:
        prefix = _load(path)[0].mqtt.topic_prefix
    except ConfigError as exc:
        _print_problems(exc, path)
        return EX_CONFIG
    print(describe(op, topic_prefix=prefix))
    return 0


def read_files(specs: Sequence[str], multi: Sequence[str]) -> dict[str, Any]:
    """`FIELD=PATH` options as payload fields: {"base64", "filename"} objects (arrays if repeated).

    Raises ValueError (bad option) or OSError (unreadable file).
    """
    fields: dict[str, Any] = {}
    for spec in specs:
        field, eq, file_path = spec.partition("=")
        if not eq or not field or not file_path:
            raise ValueError(f"--file {spec!r}: expected FIELD=PATH, e.g. file=./hello.wav")
        data = Path(file_path).expanduser().read_bytes()
        value = {"base64": base64.b64encode(data).decode("ascii"), "filename": Path(file_path).name}
        if field in fields:
            if field not in multi:
                raise ValueError(f"--file {field}=...: this method takes one file in {field!r}")
            previous = fields[field]
            fields[field] = [*previous, value] if isinstance(previous, list) else [previous, value]
        else:
            fields[field] = value
    return fields


def cmd_call(
    method: str,
    payload_text: str,
    timeout: float,
    suffix: str,
    path: str | None,
    how: str = "--config",
    files: Sequence[str] = (),
    reply_flags: dict[str, Any] | None = None,
    output: str | None = None,
) -> int:
    """Publish one request, wait for its reply, print it; exit 0 on `ok`, 1 on an error reply.

    `reply_flags` (select, reply_format, max_bytes, chunk_bytes) become the `_bridge` options.
    """
    from paho.mqtt.enums import MQTTProtocolVersion

    from bridge.methods.model import default_table
    from bridge.mqtt.client import new_client
    from bridge.neterrors import connection_cause

    print(_config_note(path, how), file=sys.stderr)
    try:
        config, _ = _load(path)
    except ConfigError as exc:
        _print_problems(exc, path)
        return EX_CONFIG
    op = default_table().find(method)
    if op is None:
        print(_unknown_method(method), file=sys.stderr)
        return EX_USAGE
    text = sys.stdin.read() if payload_text == "-" else payload_text
    try:
        payload = loads(text.encode("utf-8"))
    except ValueError as exc:
        print(f"payload is not JSON: {exc}", file=sys.stderr)
        return EX_USAGE
    if not isinstance(payload, dict):
        print("payload must be a JSON object", file=sys.stderr)
        return EX_USAGE
    for spec in files:
        field = spec.partition("=")[0]
        if field and field not in op.file_fields:
            takes = ", ".join(op.file_fields) if op.file_fields else "none"
            print(
                f"--file {spec!r}: {op.name} has no file field {field!r} (its file fields: "
                f"{takes})",
                file=sys.stderr,
            )
            return EX_USAGE
    try:
        payload.update(read_files(files, op.multi_file_fields))
    except ValueError as exc:
        print(str(exc), file=sys.stderr)
        return EX_USAGE
    except OSError as exc:
        print(f"cannot read {exc.filename}: {exc.strerror}", file=sys.stderr)
        return EX_NOINPUT
    try:
        options = options_from_flags(payload, **(reply_flags or {}))
    except InvalidParameter as exc:
        print(exc.message, file=sys.stderr)
        return EX_USAGE
    transaction = payload.setdefault("transaction", uuid.uuid4().hex)
    tag = suffix or f"cli-{uuid.uuid4().hex[:12]}"
    prefix = config.mqtt.topic_prefix
    request_topic = f"{prefix}/request/{op.name}/{tag}"
    reply_topic = f"{prefix}/response/{op.name}/{tag}"
    collector = ReplyCollector(reply_topic, transaction, options)
    state_head = f"{prefix}/bridge/"
    state_filter = f"{state_head}+/state"
    done = threading.Event()
    online = threading.Event()
    states: dict[str, str] = {}
    result: dict[str, Any] = {}

    def on_connect(client: Any, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        if reason.is_failure:
            result["error"] = f"broker refused the connection: {reason}"
            done.set()
            online.set()
            return
        client.subscribe([(topic, 1) for topic in collector.subscriptions] + [(state_filter, 1)])

    def on_message(client: Any, userdata: Any, msg: Any) -> None:
        if msg.topic.startswith(state_head) and msg.topic.endswith("/state"):
            on_state(client, msg.topic[len(state_head) : -len("/state")], bytes(msg.payload))
            return
        if "reply" in result:
            return
        outcome = collector.feed(msg.topic, bytes(msg.payload))
        if outcome is not None:
            result["reply"] = outcome
            done.set()

    def on_state(client: Any, instance: str, body: bytes) -> None:
        try:
            state = loads(body) if body else {}
        except ValueError:
            return
        if not isinstance(state, dict):
            return
        states[instance] = str(state.get("state"))
        if state.get("state") == "online" and not online.is_set():
            online.set()
            client.publish(request_topic, dumps(payload), qos=1)

    client, _ = new_client(
        config.mqtt, protocol=MQTTProtocolVersion.MQTTv311, client_id="", persistent=False
    )
    client.on_connect = on_connect
    client.on_message = on_message
    host = config.mqtt.host or "127.0.0.1"
    try:
        client.connect(host, config.mqtt.port, keepalive=30)
    except OSError as exc:
        cause = connection_cause(exc)
        print(
            f"cannot connect to the broker at {host}:{config.mqtt.port}: {cause}", file=sys.stderr
        )
        return EX_UNAVAILABLE
    client.loop_start()
    try:
        if not online.wait(min(PRESENCE_WAIT, timeout)) or "error" in result:
            if "error" not in result:
                seen = ", ".join(f"{name} {state}" for name, state in sorted(states.items()))
                detail = f"; last seen: {seen}" if seen else ""
                print(
                    f"no bridge online on {prefix} (broker {host}:{config.mqtt.port}{detail}): "
                    "start one (./start.sh), or check "
                    f"that [mqtt] host, port and topic_prefix match the bridge's config",
                    file=sys.stderr,
                )
                return EX_UNAVAILABLE
        elif not done.wait(timeout):
            print(f"no reply on {reply_topic} within {timeout:g} s", file=sys.stderr)
            return EX_TEMPFAIL
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EX_INTERRUPTED
    finally:
        client.disconnect()
        client.loop_stop()
    if "error" in result:
        print(result["error"], file=sys.stderr)
        return EX_UNAVAILABLE
    outcome: CallOutcome = result["reply"]
    if outcome.stderr:
        print(outcome.stderr, file=sys.stderr)
    if output is not None and (outcome.stdout or outcome.exit_code == 0):
        with open(output, "wb") as sink:
            sink.write(outcome.stdout)
    else:
        sys.stdout.buffer.write(outcome.stdout)
        sys.stdout.flush()
    return outcome.exit_code


def _dispatch(argv: Sequence[str] | None) -> int:
    args = _parser().parse_args(argv)
    command = args.command or "run"
    path, how = find_config(args.config)
    if command == "run":
        return cmd_run(path, how)
    if command == "worker":
        return cmd_worker(path, args.index, args.control_fd)
    if command == "check-config":
        return cmd_check_config(path, how)
    if command == "methods":
        return cmd_methods(args.group, path)
    if command == "describe":
        return cmd_describe(args.method, path)
    if command == "call":
        reply_flags = {
            "select": args.select,
            "reply_format": args.reply_format,
            "max_bytes": args.max_bytes,
            "chunk_bytes": args.chunk_bytes,
        }
        return cmd_call(
            args.method,
            args.payload,
            args.timeout,
            args.suffix,
            path,
            how,
            args.file,
            reply_flags,
            args.output,
        )
    return EX_USAGE


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `openai-mqtt-bridge` console script."""
    try:
        try:
            code = _dispatch(argv)
        finally:  # also after argparse's SystemExit (--help)
            sys.stdout.flush()  # a closed pipe shows here, not in the interpreter's final flush
    except BrokenPipeError:
        # The reader went away (`methods | head`): stop quietly, as `cat` would.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EX_BROKEN_PIPE
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EX_INTERRUPTED
    return code


if __name__ == "__main__":
    raise SystemExit(main())
