"""What `openai-mqtt-bridge call` makes of the reply messages, in each `_bridge` reply format.

Pure: the CLI feeds every message it receives on the reply topics and prints the outcome.
JSON envelopes are matched by `transaction`; plain and raw replies by their topic (the CLI's
topic suffix is unique); a chunked raw reply is reassembled from `<reply topic>/<n>` once its end
message arrives.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from bridge.jsoncodec import dumps, loads
from bridge.pipeline.options import OPTIONS_KEY, ReplyOptions, parse_options
from bridge.pipeline.replyformat import ERROR_PREFIX


@dataclass(frozen=True, slots=True)
class CallOutcome:
    """The CLI's result: exit status, bytes for stdout, text for stderr."""

    exit_code: int
    stdout: bytes = b""
    stderr: str = ""


def options_from_flags(
    payload: dict[str, Any],
    *,
    select: str | None,
    reply_format: str | None,
    max_bytes: int | None,
    chunk_bytes: int | None,
) -> ReplyOptions:
    """Merge the flags into `payload["_bridge"]`; the options (raise InvalidParameter if bad)."""
    given = {
        "select": select,
        "format": reply_format,
        "max_bytes": max_bytes,
        "chunk_bytes": chunk_bytes,
    }
    flags = {name: value for name, value in given.items() if value is not None}
    if flags:
        existing = payload.get(OPTIONS_KEY)
        payload[OPTIONS_KEY] = {**(existing if isinstance(existing, dict) else {}), **flags}
    return parse_options(payload.get(OPTIONS_KEY))


@dataclass
class ReplyCollector:
    """Turns the reply messages of one call into its outcome."""

    reply_topic: str
    transaction: Any
    options: ReplyOptions
    stream_topic: str = ""
    """Where stream events and job progress of this call arrive ("": not watched)."""
    on_event: Callable[[bytes], None] | None = None
    """Called with each stream event of this call as it arrives."""
    _chunks: dict[int, bytes] = field(default_factory=dict)

    @property
    def subscriptions(self) -> list[str]:
        """The topic filters to subscribe to before publishing the request."""
        topics = [self.reply_topic]
        if self.options.chunk_bytes is not None:
            topics.append(f"{self.reply_topic}/+")
        if self.stream_topic:
            topics.append(self.stream_topic)
        return topics

    def feed(self, topic: str, payload: bytes) -> CallOutcome | None:
        """Take one message; the outcome once the reply is complete, else None."""
        if topic == self.stream_topic:
            self._event(payload)
            return None
        if topic != self.reply_topic:
            tail = topic[len(self.reply_topic) + 1 :]
            if topic.startswith(self.reply_topic + "/") and tail.isdigit():
                self._chunks[int(tail)] = payload
            return None
        if self.options.format == "json" or _is_envelope_error(payload):
            return self._envelope(payload)
        if payload.startswith(ERROR_PREFIX):
            return CallOutcome(1, stderr=payload.decode("utf-8", "replace"))
        if self.options.format == "plain":
            return CallOutcome(0, payload + b"\n")
        if self.options.chunk_bytes is None:
            return CallOutcome(0, payload)
        return self._assembled(payload)

    def _envelope(self, payload: bytes) -> CallOutcome | None:
        try:
            reply = loads(payload)
        except ValueError:
            return None
        if not isinstance(reply, dict) or not self._ours(reply):
            return None
        return CallOutcome(0 if reply.get("status") == "ok" else 1, dumps(reply) + b"\n")

    def _ours(self, reply: dict[str, Any]) -> bool:
        """Whether an envelope on the reply topic answers this call: its transaction, or an error
        without one (the bridge could not read the request, e.g. payload_too_large; the topic's
        suffix is this call's own)."""
        if "transaction" not in reply:
            return reply.get("status") == "error"
        return bool(reply["transaction"] == self.transaction)

    def _event(self, payload: bytes) -> None:
        try:
            event = loads(payload)
        except ValueError:
            return
        ours = isinstance(event, dict) and event.get("transaction") == self.transaction
        if ours and self.on_event is not None:
            self.on_event(payload)

    def _assembled(self, payload: bytes) -> CallOutcome | None:
        try:
            end = loads(payload)
        except ValueError:
            return None
        if not isinstance(end, dict) or end.get("transaction") != self.transaction:
            return None
        count = end.get("chunks")
        if not isinstance(count, int) or any(n not in self._chunks for n in range(count)):
            got = len(self._chunks)
            return CallOutcome(1, stderr=f"incomplete reply: {got} of {count} chunks arrived")
        return CallOutcome(0, b"".join(self._chunks[n] for n in range(count)))


def _is_envelope_error(payload: bytes) -> bool:
    """A JSON error envelope: what a refused request gets before its options were read."""
    return payload.startswith(b'{"status":"error"')
