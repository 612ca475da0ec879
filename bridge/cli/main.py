"""Command line: `run` (default), `check-config`, `methods`, `describe`, `call`, `realtime`,
`--version`."""

from __future__ import annotations

import argparse
import os
import signal
import sys
from collections.abc import Sequence

from bridge import __version__
from bridge.cli.common import EX_BROKEN_PIPE, EX_INTERRUPTED, EX_USAGE, find_config

# The commands are imported by `_dispatch`, inside `main`'s handling of Ctrl-C: importing them
# takes about 0.2 s, and a Ctrl-C then must end in "interrupted", not a traceback.


def _parser() -> argparse.ArgumentParser:
    from bridge.cli.call import CALL_EXIT_CODES

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
    sub = parser.add_subparsers(
        dest="command", metavar="{run,check-config,methods,describe,call,realtime}"
    )
    sub.add_parser("run", parents=[common], help="run the bridge (the default)")
    # One of `[runtime] workers`, started by the supervisor (bridge/runtime/supervisor.py); not for
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
    voice = sub.add_parser(
        "realtime",
        parents=[common],
        help="speak a WAV file to the Realtime API through the bridge, save the spoken answer",
        description="Stream a 16-bit mono 24 kHz WAV file to a realtime session over MQTT, ask "
        "for a response and write its audio to a WAV file; its transcript goes to stdout.",
    )
    voice.add_argument("wav_in", help="the question: 16-bit mono 24 kHz WAV")
    voice.add_argument("-o", "--output", default="answer.wav", help="the answer (WAV)")
    voice.add_argument("--model", default="", help="default: the bridge's [realtime] model")
    voice.add_argument("--timeout", type=float, default=60.0, help="seconds (default 60)")
    voice.add_argument(
        "--fast", action="store_true", help="send the audio at once, not in real time"
    )
    reply = call.add_argument_group("reply options (the request's _bridge key)")
    reply.add_argument("--select", help="JMESPath expression picking the part of the answer")
    reply.add_argument("--format", choices=("json", "plain", "raw"), dest="reply_format")
    reply.add_argument("--max-bytes", type=int, help="plain: cut longer text, marked with ...")
    reply.add_argument("--chunk-bytes", type=int, help="raw: receive the bytes in chunks")
    reply.add_argument("--output", "-o", help="write the reply there instead of stdout")
    return parser


def _dispatch(argv: Sequence[str] | None) -> int:
    from bridge.cli.call import cmd_call
    from bridge.cli.info import cmd_check_config, cmd_describe, cmd_methods
    from bridge.cli.run import cmd_run, cmd_worker
    from bridge.cli.voice import cmd_realtime

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
    if command == "realtime":
        return cmd_realtime(
            path,
            how,
            args.wav_in,
            args.output,
            model=args.model,
            timeout=args.timeout,
            pace=not args.fast,
        )
    return EX_USAGE


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `openai-mqtt-bridge` console script."""
    # SIGINT interrupts every command, also when the parent ignored it (a background job of a
    # script, and every process that job starts): `call` went on waiting for its reply.
    signal.signal(signal.SIGINT, signal.default_int_handler)
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
