"""Command line: `run` (default), `check-config`, `methods`, `describe`, `call`, `--version`."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import sys
import threading
import uuid
from collections.abc import Callable, Sequence
from typing import Any

import orjson

from bridge import __version__
from bridge.callreply import CallOutcome, ReplyCollector, options_from_flags
from bridge.config import BridgeConfig, load_config
from bridge.errors import EX_CONFIG, ConfigError, InvalidParameter
from bridge.jsoncodec import dumps, loads

EX_USAGE = 64
EX_UNAVAILABLE = 69
EX_TEMPFAIL = 75


def _parser() -> argparse.ArgumentParser:
    config_help = "TOML config file (default: $OMB_CONFIG; none means built-in defaults)"
    parser = argparse.ArgumentParser(
        prog="openai-mqtt-bridge", description="Every OpenAI REST operation over MQTT."
    )
    parser.add_argument("--config", "-c", default=os.environ.get("OMB_CONFIG"), help=config_help)
    # Sub-commands accept --config too; SUPPRESS keeps them from resetting a global --config.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", "-c", default=argparse.SUPPRESS, help=config_help)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command")
    sub.add_parser("run", parents=[common], help="run the bridge (the default)")
    sub.add_parser("check-config", parents=[common], help="validate the config and print it")
    methods = sub.add_parser("methods", parents=[common], help="list the methods")
    methods.add_argument("--group", help="only this group (e.g. chat, audio, assistants)")
    describe = sub.add_parser("describe", parents=[common], help="describe one method")
    describe.add_argument("method")
    call = sub.add_parser(
        "call", parents=[common], help="call a method over MQTT and print the reply"
    )
    call.add_argument("method")
    call.add_argument("payload", nargs="?", default="{}", help="JSON object, or - for stdin")
    call.add_argument("--timeout", type=float, default=60.0)
    call.add_argument("--suffix", default="", help="topic suffix (default: a fresh id)")
    reply = call.add_argument_group("reply options (the request's _bridge key)")
    reply.add_argument("--select", help="JMESPath expression picking the part of the answer")
    reply.add_argument("--format", choices=("json", "plain", "raw"), dest="reply_format")
    reply.add_argument("--max-bytes", type=int, help="plain: cut longer text, marked with ...")
    reply.add_argument("--chunk-bytes", type=int, help="raw: receive the bytes in chunks")
    reply.add_argument("--output", "-o", help="write the reply there instead of stdout")
    return parser


def _load(path: str | None) -> tuple[BridgeConfig, list[str]]:
    warnings: list[str] = []
    config = load_config(path, warnings=warnings)
    return config, warnings


def _print_problems(exc: ConfigError, path: str | None) -> None:
    print(f"invalid configuration ({path or 'defaults'}):", file=sys.stderr)
    for problem in exc.problems:
        print(f"  {problem}", file=sys.stderr)


def cmd_run(path: str | None) -> int:
    """Run the daemon until SIGTERM/SIGINT."""
    from bridge import logs
    from bridge.allocator import pin_mmap_threshold
    from bridge.daemon import Bridge, StartupError

    try:
        config, warnings = _load(path)
    except ConfigError as exc:
        _print_problems(exc, path)
        return EX_CONFIG
    logs.configure(config.logging.level, config.logging.format, config.secrets())
    log = logs.get_logger()
    for warning in warnings:
        log.warning(warning)
    loop_factory, loop_name = _loop_factory(config.runtime.event_loop)
    if loop_factory is None and config.runtime.event_loop == "uvloop":
        log.error('[runtime] event_loop = "uvloop" but uvloop is not installed')
        return EX_CONFIG
    pinned = pin_mmap_threshold()  # a start-up step of its own: before any large request
    log.debug("event loop", loop=loop_name, mmap_threshold_pinned=pinned)
    try:
        with asyncio.Runner(loop_factory=loop_factory) as runner:
            return runner.run(Bridge(config).run())
    except StartupError as exc:
        log.error(str(exc))
        return EX_CONFIG
    except KeyboardInterrupt:
        return 0


def _loop_factory(choice: str) -> tuple[Callable[[], asyncio.AbstractEventLoop] | None, str]:
    """The event loop factory for `[runtime] event_loop` and its name (None: asyncio's own)."""
    if choice == "asyncio":
        return None, "asyncio"
    try:
        import uvloop
    except ImportError:
        return None, "asyncio"
    return uvloop.new_event_loop, "uvloop"


def cmd_check_config(path: str | None) -> int:
    """Validate the config; print the effective (redacted) config or every problem."""
    try:
        config, warnings = _load(path)
    except ConfigError as exc:
        _print_problems(exc, path)
        return EX_CONFIG
    for warning in warnings:
        print(f"warning: {warning}", file=sys.stderr)
    print(orjson.dumps(config.redacted(), option=orjson.OPT_INDENT_2).decode())
    return 0


def cmd_methods(group: str | None) -> int:
    """Print one line per method: name, verb, path."""
    from bridge.operations import default_table

    table = default_table()
    rows = [op for op in table.operations if group is None or op.group == group.lower()]
    if not rows:
        groups = sorted({op.group for op in table.operations})
        print(f"no methods in group {group!r}; groups: {', '.join(groups)}", file=sys.stderr)
        return EX_USAGE
    width = max(len(op.name) for op in rows)
    for op in rows:
        flags = " (retired)" if op.retired else (" (deprecated)" if op.deprecated else "")
        print(f"{op.name:<{width}}  {op.group:<16} {op.verb:<6} {op.path}{flags}")
    return 0


def cmd_describe(name: str, path: str | None) -> int:
    """Print what to put in the payload of one method."""
    from bridge.describe import describe
    from bridge.operations import default_table

    op = default_table().find(name)
    if op is None:
        print(f"unknown method {name!r}; see `openai-mqtt-bridge methods`", file=sys.stderr)
        return EX_USAGE
    prefix = "openai"
    if path:
        with contextlib.suppress(ConfigError):
            prefix = _load(path)[0].mqtt.topic_prefix
    print(describe(op, topic_prefix=prefix))
    return 0


def cmd_call(
    method: str,
    payload_text: str,
    timeout: float,
    suffix: str,
    path: str | None,
    reply_flags: dict[str, Any] | None = None,
    output: str | None = None,
) -> int:
    """Publish one request, wait for its reply, print it; exit 0 on `ok`, 1 on an error reply.

    `reply_flags` (select, reply_format, max_bytes, chunk_bytes) become the `_bridge` options.
    """
    from paho.mqtt.enums import MQTTProtocolVersion

    from bridge.mqtt import new_client

    try:
        config, _ = _load(path)
    except ConfigError as exc:
        _print_problems(exc, path)
        return EX_CONFIG
    text = sys.stdin.read() if payload_text == "-" else payload_text
    try:
        payload = loads(text.encode("utf-8"))
    except ValueError as exc:
        print(f"payload is not JSON: {exc}", file=sys.stderr)
        return EX_USAGE
    if not isinstance(payload, dict):
        print("payload must be a JSON object", file=sys.stderr)
        return EX_USAGE
    try:
        options = options_from_flags(payload, **(reply_flags or {}))
    except InvalidParameter as exc:
        print(exc.message, file=sys.stderr)
        return EX_USAGE
    transaction = payload.setdefault("transaction", uuid.uuid4().hex)
    tag = suffix or f"cli-{uuid.uuid4().hex[:12]}"
    prefix = config.mqtt.topic_prefix
    request_topic = f"{prefix}/request/{method}/{tag}"
    reply_topic = f"{prefix}/response/{method}/{tag}"
    collector = ReplyCollector(reply_topic, transaction, options)
    done = threading.Event()
    result: dict[str, Any] = {}

    def on_connect(client: Any, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        if reason.is_failure:
            result["error"] = f"broker refused the connection: {reason}"
            done.set()
            return
        client.subscribe([(topic, 1) for topic in collector.subscriptions])

    def on_subscribe(client: Any, userdata: Any, mid: Any, reasons: Any, props: Any) -> None:
        client.publish(request_topic, dumps(payload), qos=1)

    def on_message(client: Any, userdata: Any, msg: Any) -> None:
        if "reply" in result:
            return
        outcome = collector.feed(msg.topic, bytes(msg.payload))
        if outcome is not None:
            result["reply"] = outcome
            done.set()

    client, _ = new_client(
        config.mqtt, protocol=MQTTProtocolVersion.MQTTv311, client_id="", persistent=False
    )
    client.on_connect = on_connect
    client.on_subscribe = on_subscribe
    client.on_message = on_message
    host = config.mqtt.host or "127.0.0.1"
    try:
        client.connect(host, config.mqtt.port, keepalive=30)
    except OSError as exc:
        print(f"cannot connect to the broker at {host}:{config.mqtt.port}: {exc}", file=sys.stderr)
        return EX_UNAVAILABLE
    client.loop_start()
    try:
        if not done.wait(timeout):
            print(f"no reply on {reply_topic} within {timeout:g} s", file=sys.stderr)
            return EX_TEMPFAIL
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


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `openai-mqtt-bridge` console script."""
    args = _parser().parse_args(argv)
    command = args.command or "run"
    if command == "run":
        return cmd_run(args.config)
    if command == "check-config":
        return cmd_check_config(args.config)
    if command == "methods":
        return cmd_methods(args.group)
    if command == "describe":
        return cmd_describe(args.method, args.config)
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
            args.config,
            reply_flags,
            args.output,
        )
    return EX_USAGE


if __name__ == "__main__":
    raise SystemExit(main())
