"""`call`: publish one request as a device would, wait for its reply, print it."""

from __future__ import annotations

import base64
import sys
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bridge.cli.callreply import CallOutcome, ReplyCollector, options_from_flags
from bridge.cli.common import (
    EX_INTERRUPTED,
    EX_NOINPUT,
    EX_TEMPFAIL,
    EX_UNAVAILABLE,
    EX_USAGE,
    load_said,
    unknown_method,
)
from bridge.errors import InvalidParameter
from bridge.jsoncodec import dumps, loads
from bridge.mqtt.oneshot import BrokerUnreachable, request_reply
from bridge.pipeline.options import ReplyOptions

CALL_EXIT_CODES = """exit status:
  0   the reply says "ok"           1   the reply is an error reply (printed)
  64  bad arguments or payload      66  a --file cannot be read
  69  broker unreachable, or no bridge online on the topic prefix
  75  no reply within --timeout     78  invalid configuration
  130 interrupted (Ctrl-C)"""


# How long `call` waits for a bridge's retained `online` state after subscribing; a broker sends
# retained messages right after the SUBACK, so this only bounds a slow broker.
PRESENCE_WAIT = 2.0


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


@dataclass(frozen=True, slots=True)
class PreparedCall:
    """A request ready to publish: its method, payload (with `transaction`) and reply options."""

    method: str
    payload: dict[str, Any]
    options: ReplyOptions


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
    loaded = load_said(path, how)
    if isinstance(loaded, int):
        return loaded
    config, _ = loaded
    prepared = prepare(method, payload_text, files, reply_flags or {})
    if isinstance(prepared, int):
        return prepared
    prefix = config.mqtt.topic_prefix
    tag = suffix or f"cli-{uuid.uuid4().hex[:12]}"
    request_topic = f"{prefix}/request/{prepared.method}/{tag}"
    reply_topic = f"{prefix}/response/{prepared.method}/{tag}"
    collector = ReplyCollector(
        reply_topic,
        prepared.payload["transaction"],
        prepared.options,
        stream_topic=f"{prefix}/stream/{prepared.method}/{tag}",
        on_event=print_event,
    )
    host = config.mqtt.host or "127.0.0.1"
    broker = f"{host}:{config.mqtt.port}"
    try:
        exchange = request_reply(
            config.mqtt,
            host=host,
            state_prefix=f"{prefix}/bridge/",
            instance=config.mqtt.instance_name,
            subscriptions=collector.subscriptions,
            request_topic=request_topic,
            payload=dumps(prepared.payload),
            feed=collector.feed,
            presence_wait=PRESENCE_WAIT,
            timeout=timeout,
        )
    except BrokerUnreachable as exc:
        print(f"cannot connect to the broker at {broker}: {exc}", file=sys.stderr)
        return EX_UNAVAILABLE
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EX_INTERRUPTED
    if exchange.refused is not None:
        print(exchange.refused, file=sys.stderr)
        return EX_UNAVAILABLE
    if not exchange.online:
        seen = ", ".join(f"{name} {state}" for name, state in sorted(exchange.states.items()))
        detail = f"; last seen: {seen}" if seen else ""
        print(
            f"no bridge online on {prefix} (broker {broker}{detail}): start one (./start.sh), or "
            "check that [mqtt] host, port and topic_prefix match the bridge's config",
            file=sys.stderr,
        )
        return EX_UNAVAILABLE
    if exchange.result is None:
        print(f"no reply on {reply_topic} within {timeout:g} s", file=sys.stderr)
        return EX_TEMPFAIL
    return show(exchange.result, output)


def prepare(
    method: str, payload_text: str, files: Sequence[str], reply_flags: dict[str, Any]
) -> PreparedCall | int:
    """The request `call` publishes, or the exit status after saying what is wrong with it."""
    from bridge.methods.catalog import default_table

    op = default_table().find(method)
    if op is None:
        print(unknown_method(method), file=sys.stderr)
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
        options = options_from_flags(payload, **reply_flags)
    except InvalidParameter as exc:
        print(exc.message, file=sys.stderr)
        return EX_USAGE
    payload.setdefault("transaction", uuid.uuid4().hex)
    return PreparedCall(op.name, payload, options)


def print_event(event: bytes) -> None:
    """Print one stream event (or job progress) as it arrives: a JSON line on stdout."""
    sys.stdout.buffer.write(event.rstrip(b"\n") + b"\n")
    sys.stdout.flush()


def show(outcome: CallOutcome, output: str | None) -> int:
    """Print (or write to `output`) what the reply says; its exit status."""
    if outcome.stderr:
        print(outcome.stderr, file=sys.stderr)
    if output is not None and (outcome.stdout or outcome.exit_code == 0):
        with open(output, "wb") as sink:
            sink.write(outcome.stdout)
    else:
        sys.stdout.buffer.write(outcome.stdout)
        sys.stdout.flush()
    return outcome.exit_code
