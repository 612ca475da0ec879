"""The render stage: an answer's reply data, and the one envelope around it, as bytes.

The envelope is `{"status", "method", "transaction"?, "data" | "error"}`. The reply data of a
complete answer is chosen by the operation and the Content-Type: JSON spliced in as it came,
text as `{"text", "content_type"}`, anything else as `{"base64", "content_type", "size"}`.
The request's `_bridge` options (bridge/pipeline/options.py) may select from the data or ask for the
plain or raw format instead of the envelope (bridge/pipeline/replyformat.py).
"""

from __future__ import annotations

import binascii
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import orjson

from bridge.errors import BridgeError, ReplyTooLarge, UpstreamBadResponse
from bridge.jsoncodec import dumps
from bridge.methods.model import Operation
from bridge.pipeline.model import MISSING
from bridge.pipeline.options import DEFAULT_OPTIONS, ReplyOptions
from bridge.pipeline.replyformat import Answer, format_error, format_ok, selected

if TYPE_CHECKING:
    from bridge.service.client import ServiceResult


_TEXT_TYPES = ("text/", "application/sdp")
_JSON_TYPES = ("application/json", "application/problem+json")


def _head(status: bytes, method: str, transaction: Any) -> bytes:
    head = b'{"status":' + status + b',"method":' + dumps(method)
    if transaction is not MISSING:
        head += b',"transaction":' + dumps(transaction)
    return head


SELECT_NO_MATCH = dumps(
    {
        "code": "select_no_match",
        "message": "_bridge.select gave null: nothing in the answer matched it, or the value "
        "there is null; check the expression's spelling against the answer without select",
    }
)
"""The `warning` of an ok envelope whose `select` produced null."""


def ok_raw(method: str, transaction: Any, data_json: bytes | list[bytes]) -> bytes:
    """A success envelope around already-valid JSON (bytes or fragments), spliced in one copy."""
    parts = [_head(b'"ok"', method, transaction), b',"data":']
    if isinstance(data_json, bytes):
        parts.append(data_json)
    else:
        parts.extend(data_json)
    parts.append(b"}")
    return b"".join(parts)


def ok(method: str, transaction: Any, data: Any) -> bytes:
    """A success envelope around a JSON-serialisable value."""
    return ok_raw(method, transaction, dumps(data))


def error(method: str, transaction: Any, exc: BridgeError) -> bytes:
    """An error envelope rendering `exc` as the `error` object."""
    return _head(b'"error"', method, transaction) + b',"error":' + dumps(exc.to_dict()) + b"}"


def binary_data(body: bytes, content_type: str) -> list[bytes]:
    """The `{"base64", "content_type", "size"}` reply data for raw bytes, as JSON fragments.

    Fragments, not one bytes object: the envelope joins them once, so a large download is
    copied once less on its way out.
    """
    return [
        b'{"base64":"',
        binascii.b2a_base64(body, newline=False),
        b'","content_type":',
        dumps(content_type),
        b',"size":',
        str(len(body)).encode(),
        b"}",
    ]


def reply_data(op: Operation, body: bytes, content_type: str) -> bytes | list[bytes]:
    """Reply data (valid JSON, whole or in fragments) for a complete 2xx body of `op`."""
    media = content_type.split(";", 1)[0].strip()
    if op.response_kind == "binary":
        return binary_data(body, media or "application/octet-stream")
    if not body:
        return b"null"
    if (
        media.startswith(_JSON_TYPES)
        or media.endswith("+json")
        or (not media and op.response_kind == "json")
    ):
        try:
            orjson.loads(body)  # validation only: the bytes are spliced into the reply as-is
        except orjson.JSONDecodeError:
            raise UpstreamBadResponse(
                "service host sent a body that is not valid JSON", http_status=200
            ) from None
        return body
    if media.startswith(_TEXT_TYPES):
        text = body.decode("utf-8", "replace")
        return dumps({"text": text, "content_type": media})
    return binary_data(body, media or "application/octet-stream")


class StreamAnswer(Protocol):
    """A streamed answer reassembled from its events (the stream sink is one)."""

    def finish(self) -> Any:
        """The whole answer, as the API would have sent it unstreamed."""


class StreamFramer:
    """The messages of one request's stream topic: events and job progress, numbered by `seq`.

    Each is `{"transaction": ..., "seq": n, "event": ..., "data": ...}` (no `transaction` key
    when the request had none).
    """

    def __init__(self, transaction: Any) -> None:
        head = b'{"seq":'
        if transaction is not MISSING:
            head = b'{"transaction":' + dumps(transaction) + b',"seq":'
        self._head = head

    def frame(self, seq: int, event: Any, data: Any) -> bytes:
        """One stream message as bytes."""
        return b"".join(
            (
                self._head,
                str(seq).encode(),
                b',"event":',
                dumps(event),
                b',"data":',
                dumps(data),
                b"}",
            )
        )


@dataclass(slots=True)
class Outcome:
    """One rendered reply and what the request line logs about it."""

    method: str
    """The operation's name, or the method level of the topic when no operation matched."""
    transaction: Any
    payload: bytes
    error: BridgeError | None = None
    http_status: int | None = None
    request_id: str | None = None
    attempts: int = 0
    content_type: str | None = None
    """For the MQTT 5 Content Type property (plain and raw formats); None for the envelope."""
    chunks: tuple[bytes, ...] = ()
    """Raw chunks published before `payload` (the end message) on `<reply topic>/<n>`."""
    chunk_type: str | None = None
    options: ReplyOptions = field(default=DEFAULT_OPTIONS)
    """The request's reply options, so that deliver can render a replacement error alike."""


def answer(
    op: Operation,
    transaction: Any,
    result: ServiceResult,
    sink: StreamAnswer | None,
    options: ReplyOptions = DEFAULT_OPTIONS,
) -> Outcome:
    """The success reply for `result`; takes the body off it, so the reply holds the only copy.

    Raises a BridgeError when the answer cannot be rendered (not valid JSON, a stream cut short).
    """
    body: bytes | None = None
    if result.streamed:
        if sink is None:
            raise UpstreamBadResponse("service host streamed an answer that was not asked for")
        data: bytes | list[bytes] = dumps(sink.finish())
    else:
        body, result.body = result.body, b""
        data = reply_data(op, body, result.content_type)
        if options.format != "raw":
            body = None  # only the raw format sends the body itself
    done = Outcome(
        op.name,
        transaction,
        b"",
        None,
        result.http_status,
        result.request_id,
        result.attempts,
        options=options,
    )
    if options.format == "json":
        value = None
        if options.select is not None:
            value = selected(options, Answer(data))
            data = dumps(value)
        done.payload = ok_raw(op.name, transaction, data)
        if options.select is not None and value is None:
            # Legitimately null at times (a tool call's content), so no error: a flag instead.
            done.payload = done.payload[:-1] + b',"warning":' + SELECT_NO_MATCH + b"}"
        return done
    content_type = result.content_type.strip() or None
    reply = format_ok(options, Answer(data, body, content_type), _transaction_json(transaction))
    done.payload, done.content_type = reply.payload, reply.content_type
    done.chunks, done.chunk_type = reply.chunks, reply.chunk_type
    return done


def failure(
    method: str, transaction: Any, exc: BridgeError, options: ReplyOptions = DEFAULT_OPTIONS
) -> Outcome:
    """The error reply for `exc`, in the format the request asked for."""
    outcome = Outcome(method, transaction, b"", exc, exc.http_status, None, exc.attempts)
    outcome.options = options
    if options.format == "json":
        outcome.payload = error(method, transaction, exc)
    else:
        reply = format_error(options, exc)
        outcome.payload, outcome.content_type = reply.payload, reply.content_type
    return outcome


def _transaction_json(transaction: Any) -> bytes | None:
    return None if transaction is MISSING else dumps(transaction)


def too_large(outcome: Outcome, size: int) -> Outcome:
    """The error reply that replaces `outcome` when the broker would refuse its `size` bytes."""
    error = ReplyTooLarge(
        f"the reply ({size} bytes) exceeds the broker's maximum packet size"
        + ("; a smaller chunk_bytes fits" if outcome.chunks else "")
    )
    replaced = failure(outcome.method, outcome.transaction, error, outcome.options)
    replaced.request_id, replaced.attempts = outcome.request_id, outcome.attempts
    return replaced
