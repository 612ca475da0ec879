"""Pure reply rendering for the `_bridge` options: select, plain text, raw bytes, chunks, deltas.

Nothing here does I/O. The render stage (bridge/pipeline/render.py) wraps the JSON format in the
envelope and hands the plain and raw formats to `format_ok` / `format_error`; the stream sink uses
`plain_stream_payloads`.

Wire forms (docs/protocol.md, "Reply options"):
- plain: the selected value alone as UTF-8 (a string as it is, anything else as compact JSON);
  with `max_bytes`, a longer payload is cut on a UTF-8 boundary and ends in `...` (CUT_MARKER).
- errors in plain and raw: `ERROR <code>: <message>` on the reply topic.
- raw: the answer's bytes; with `chunk_bytes`, chunks on `<reply topic>/<n>` (n from 0), then
  `{"chunks": n, "size": bytes, "content_type": type}` on the reply topic.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from bridge.errors import BridgeError
from bridge.jsoncodec import dumps, loads
from bridge.pipeline.options import ReplyOptions

CUT_MARKER = b"..."
"""Ends a plain payload that `max_bytes` cut short."""
ERROR_PREFIX = b"ERROR "
"""Starts every error payload in the plain and raw formats."""
PLAIN_TYPE = "text/plain; charset=utf-8"
JSON_TYPE = "application/json"
BINARY_TYPE = "application/octet-stream"


@dataclass(frozen=True, slots=True)
class Answer:
    """A successful answer in every form a format may need."""

    data_json: bytes | list[bytes]
    """The envelope's `data` as valid JSON (whole, or fragments to concatenate)."""
    body: bytes | None = None
    """The answer's own bytes when it was bytes or text (what `raw` sends), else None."""
    content_type: str | None = None
    """The Content-Type of `body` as the service host sent it."""


# --- building blocks ------------------------------------------------------------------------------


def utf8_boundary(data: bytes, limit: int) -> int:
    """The largest index <= `limit` at which `data` can be cut without splitting a code point."""
    if limit >= len(data):
        return len(data)
    end = max(limit, 0)
    # A UTF-8 continuation byte is 0b10xxxxxx; a code point is at most 4 bytes long.
    while end > 0 and data[end] & 0xC0 == 0x80:
        end -= 1
    return end


def cut_utf8(data: bytes, max_bytes: int | None) -> bytes:
    """`data` if it fits in `max_bytes`, else its longest whole-character prefix plus `...`."""
    if max_bytes is None or len(data) <= max_bytes:
        return data
    return data[: utf8_boundary(data, max_bytes - len(CUT_MARKER))] + CUT_MARKER


def split_utf8(data: bytes, max_bytes: int | None) -> list[bytes]:
    """`data` in consecutive pieces of at most `max_bytes`, none splitting a code point."""
    if max_bytes is None or len(data) <= max_bytes:
        return [data]
    pieces: list[bytes] = []
    start = 0
    while start < len(data):
        end = start + utf8_boundary(data[start:], max_bytes)
        if end == start:  # cannot happen for valid UTF-8 and max_bytes >= 4; never loop forever
            end = start + max_bytes
        pieces.append(data[start:end])
        start = end
    return pieces


def plain_bytes(value: Any) -> bytes:
    """A value as plain text: a string as it is (UTF-8), anything else as compact JSON."""
    if isinstance(value, str):
        return value.encode("utf-8", "replace")
    return dumps(value)


def plain_error(exc: BridgeError, max_bytes: int | None = None) -> bytes:
    """The error form of the plain and raw formats: `ERROR <code>: <message>`, cut to fit."""
    text = ERROR_PREFIX + exc.code.encode() + b": " + exc.message.encode("utf-8", "replace")
    return cut_utf8(text, max_bytes)


def end_message(
    chunks: int, size: int, content_type: str, transaction_json: bytes | None = None
) -> bytes:
    """The message after the chunks: count, total size, content type (and the transaction)."""
    head = b"{" if transaction_json is None else b'{"transaction":' + transaction_json + b","
    return (
        head
        + b'"chunks":'
        + str(chunks).encode()
        + b',"size":'
        + str(size).encode()
        + b',"content_type":'
        + dumps(content_type)
        + b"}"
    )


def chunk_count(size: int, chunk_bytes: int) -> int:
    """How many chunks `size` bytes become."""
    return -(-size // chunk_bytes)


# --- whole replies --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class FormattedReply:
    """A reply in the plain or raw format: the reply message, and the chunks that precede it."""

    payload: bytes
    """The reply message (with chunks: the end message)."""
    content_type: str | None = None
    chunks: tuple[bytes, ...] = ()
    """Published first, in order, on `<reply topic>/<n>` (see `chunk_topic`)."""
    chunk_type: str | None = None


def chunk_topic(reply_topic: str, n: int) -> str:
    """The topic of chunk `n` (from 0) of a reply on `reply_topic`."""
    return f"{reply_topic}/{n}"


def _joined(data_json: bytes | list[bytes]) -> bytes:
    return data_json if isinstance(data_json, bytes) else b"".join(data_json)


def selected(options: ReplyOptions, answer: Answer) -> Any:
    """The answer's `data` after `select` (the whole `data` without one)."""
    data = loads(_joined(answer.data_json))
    return options.select.search(data) if options.select is not None else data


def format_ok(
    options: ReplyOptions, answer: Answer, transaction_json: bytes | None
) -> FormattedReply:
    """A successful reply in the plain or raw format (`transaction_json`: for the end message)."""
    if options.format == "plain":
        payload = cut_utf8(plain_bytes(selected(options, answer)), options.max_bytes)
        return FormattedReply(payload, PLAIN_TYPE)
    payload, content_type = raw_payload(options, answer)
    if options.chunk_bytes is None:
        return FormattedReply(payload, content_type)
    size = options.chunk_bytes
    chunks = tuple(payload[start : start + size] for start in range(0, len(payload), size))
    end = end_message(len(chunks), len(payload), content_type, transaction_json)
    return FormattedReply(end, JSON_TYPE, chunks, content_type)


def raw_payload(options: ReplyOptions, answer: Answer) -> tuple[bytes, str]:
    """The raw format's bytes and content type: the answer's bytes, or a selection as text."""
    if options.select is not None:
        value = selected(options, answer)
        return plain_bytes(value), PLAIN_TYPE if isinstance(value, str) else JSON_TYPE
    if answer.body is not None:
        return answer.body, answer.content_type or BINARY_TYPE
    return _joined(answer.data_json), JSON_TYPE


def format_error(options: ReplyOptions, exc: BridgeError) -> FormattedReply:
    """An error reply in the plain or raw format: `ERROR <code>: <message>`."""
    return FormattedReply(plain_error(exc, options.max_bytes), PLAIN_TYPE)


# --- streaming --------------------------------------------------------------------------------


# Named events whose `delta` string is answer text (Responses, transcription, refusals).
_TEXT_DELTA_EVENTS = frozenset(
    {"response.output_text.delta", "response.refusal.delta", "transcript.text.delta"}
)


def text_delta(event: str | None, data: Any) -> str | None:
    """The answer text one stream event adds, or None for events that carry no answer text.

    Chat and completions chunks (no event name): the first choice's `delta.content` or `text`;
    `response.output_text.delta`, `response.refusal.delta`, `transcript.text.delta`: `delta`;
    `thread.message.delta`: the text values of `delta.content`.
    """
    if not isinstance(data, dict):
        return None
    if event is None:
        choices = data.get("choices")
        if not isinstance(choices, list):
            return None
        for choice in choices:
            if not isinstance(choice, dict) or choice.get("index", 0) != 0:
                continue
            delta = choice.get("delta")
            text = delta.get("content") if isinstance(delta, dict) else choice.get("text")
            return text if isinstance(text, str) and text else None
        return None
    if event in _TEXT_DELTA_EVENTS:
        text = data.get("delta")
        return text if isinstance(text, str) and text else None
    if event == "thread.message.delta":
        delta = data.get("delta")
        content = delta.get("content") if isinstance(delta, dict) else None
        if not isinstance(content, list):
            return None
        parts = [
            part["text"]["value"]
            for part in content
            if isinstance(part, dict)
            and isinstance(part.get("text"), dict)
            and isinstance(part["text"].get("value"), str)
        ]
        joined = "".join(parts)
        return joined or None
    return None


def plain_stream_payloads(event: str | None, data: Any, max_bytes: int | None) -> list[bytes]:
    """The plain-format stream messages of one event: its text delta, split to fit `max_bytes`."""
    text = text_delta(event, data)
    if text is None:
        return []
    return split_utf8(text.encode("utf-8", "replace"), max_bytes)
