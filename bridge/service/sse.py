"""Server-sent events: an incremental parser and assemblers that turn a stream into one answer.

Pure: no I/O. `SseParser` follows the WHATWG event-stream rules; the assemblers rebuild what the
same call returns without `"stream": true` (chat completions, legacy completions, Responses), or
keep the last event for the other streams (images, transcription, speech, assistants runs).
"""

from __future__ import annotations

import codecs
import json
import re
from dataclasses import dataclass
from typing import Any, NoReturn, Protocol

from bridge.errors import StreamInterrupted, UpstreamBadResponse

__all__ = [
    "ChatCompletionAssembler",
    "CompletionAssembler",
    "GenericAssembler",
    "ResponsesAssembler",
    "SseEvent",
    "SseParser",
    "StreamAssembler",
    "assembler_for",
    "is_done",
]


@dataclass(frozen=True, slots=True)
class SseEvent:
    """One dispatched event; `event` is None for unnamed events, `id` is the last id seen."""

    event: str | None
    data: str
    id: str | None


_EOL = re.compile(r"\r\n|\r|\n")


class SseParser:
    """Incremental event-stream parser: bytes split anywhere in, complete events out."""

    def __init__(self) -> None:
        # Invalid UTF-8 becomes U+FFFD, as the event-stream spec prescribes.
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._line_parts: list[str] = []
        self._skip_lf = False
        self._started = False
        self._closed = False
        self._data: list[str] = []
        self._event: str | None = None
        self._last_id: str | None = None
        self._fields_pending = False
        self.retry: int | None = None
        """The last `retry:` value in milliseconds, if the server sent one."""
        self.truncated = False
        """Set by `close()`: the stream ended inside an event (no blank line after its fields)."""

    @property
    def pending(self) -> bool:
        """Whether field lines or an unterminated non-comment line await a blank line."""
        if self._fields_pending:
            return True
        return bool(self._line_parts) and not self._line_parts[0].startswith(":")

    def feed(self, chunk: bytes) -> list[SseEvent]:
        """The events completed by `chunk` (possibly none)."""
        if self._closed:
            raise ValueError("feed() after close()")
        return self._consume(self._decoder.decode(chunk))

    def close(self, *, flush: bool = False) -> list[SseEvent]:
        """End of stream: drop an unterminated event (per spec) or dispatch it if `flush`."""
        if self._closed:
            return []
        events = self._consume(self._decoder.decode(b"", final=True))
        self._closed = True
        self.truncated = self.pending
        if flush and self.truncated:
            if self._line_parts:
                line = "".join(self._line_parts)
                self._line_parts.clear()
                self._line(line, events)
            self._dispatch(events)
        return events

    def _consume(self, text: str) -> list[SseEvent]:
        events: list[SseEvent] = []
        if not text:
            return events
        if not self._started:
            self._started = True
            if text[0] == "\ufeff":
                text = text[1:]
        if self._skip_lf and text:
            self._skip_lf = False
            if text[0] == "\n":
                text = text[1:]
        pos = 0
        for match in _EOL.finditer(text):
            piece = text[pos : match.start()]
            if self._line_parts:
                self._line_parts.append(piece)
                piece = "".join(self._line_parts)
                self._line_parts.clear()
            self._line(piece, events)
            pos = match.end()
        if pos < len(text):
            self._line_parts.append(text[pos:])
        else:
            # A CR ending this chunk may be the first half of a CRLF split across chunks.
            self._skip_lf = text.endswith("\r")
        return events

    def _line(self, line: str, events: list[SseEvent]) -> None:
        if not line:
            self._dispatch(events)
            return
        if line[0] == ":":
            return
        self._fields_pending = True
        name, colon, value = line.partition(":")
        if colon and value[:1] == " ":
            value = value[1:]
        if name == "data":
            self._data.append(value)
        elif name == "event":
            self._event = value or None
        elif name == "id":
            if "\0" not in value:
                self._last_id = value
        elif name == "retry" and value.isascii() and value.isdigit():
            self.retry = int(value)

    def _dispatch(self, events: list[SseEvent]) -> None:
        self._fields_pending = False
        if self._data:
            events.append(SseEvent(self._event, "\n".join(self._data), self._last_id))
        self._data = []
        self._event = None


def is_done(event: SseEvent) -> bool:
    """Whether `event` is the `[DONE]` end marker (chat, completions, assistants runs)."""
    return event.data.strip() == "[DONE]"


# --- assembling ----------------------------------------------------------------------------------


class StreamAssembler(Protocol):
    """What the bridge needs from any assembler: events in, the non-streamed answer out."""

    @property
    def complete(self) -> bool:
        """Whether the stream's end marker (or terminal event) has arrived."""
        ...

    def feed(self, event: SseEvent) -> None:
        """Take one parsed event; raises StreamInterrupted for an error event."""
        ...

    def result(self, *, allow_incomplete: bool = False) -> Any:
        """The assembled answer; raises StreamInterrupted if incomplete (unless allowed)."""
        ...


def _raise_stream_error(upstream: Any) -> NoReturn:
    message = upstream.get("message") if isinstance(upstream, dict) else upstream
    if not isinstance(message, str) or not message:
        message = json.dumps(upstream, ensure_ascii=False, default=str)[:500]
    raise StreamInterrupted(f"the stream reported an error: {message}", upstream=upstream)


def _check_error(event_name: str | None, data: Any) -> None:
    if isinstance(data, dict):
        if event_name == "error" or data.get("type") == "error":
            nested = data.get("error")
            _raise_stream_error(nested if isinstance(nested, dict) else data)
        if data.get("error") is not None:
            _raise_stream_error(data["error"])
    elif event_name == "error":
        _raise_stream_error(data)


def _parse(event: SseEvent) -> Any:
    try:
        return json.loads(event.data)
    except ValueError:
        if event.event == "error":
            _raise_stream_error(event.data)
        raise UpstreamBadResponse(
            f"stream event {event.event or 'message'!r} carries data that is not JSON: "
            f"{event.data[:200]!r}"
        ) from None


def _object(data: Any, what: str) -> dict[str, Any]:
    if not isinstance(data, dict):
        raise UpstreamBadResponse(f"{what} is not a JSON object: {str(data)[:200]!r}")
    return data


# Keys whose string values are identities or enums, never fragments to concatenate.
_REPLACE_KEYS = frozenset({"id", "type", "role", "index", "object", "finish_reason", "status"})


def _merge_delta(acc: dict[str, Any], delta: dict[str, Any]) -> None:
    """Fold a streamed fragment into `acc`: strings concatenate, lists extend, dicts recurse."""
    for key, value in delta.items():
        current = acc.get(key)
        if value is None:
            acc.setdefault(key, None)
        elif key == "tool_calls" and isinstance(value, list):
            calls: dict[int, dict[str, Any]] = acc[key] if isinstance(current, dict) else {}
            acc[key] = calls
            for position, call in enumerate(value):
                if isinstance(call, dict):
                    index = call.get("index")
                    key_index = index if isinstance(index, int) else position
                    _merge_delta(calls.setdefault(key_index, {}), call)
        elif isinstance(value, str):
            if key in _REPLACE_KEYS:
                if not current:
                    acc[key] = value
            elif key == "name" and isinstance(current, str) and current:
                # Some compatible servers repeat the whole function name in every delta; OpenAI
                # sends it once. Only a different fragment is appended.
                if value != current:
                    acc[key] = current + value
            else:
                acc[key] = (current if isinstance(current, str) else "") + value
        elif isinstance(value, list):
            if isinstance(current, list):
                current.extend(value)
            else:
                acc[key] = list(value)
        elif isinstance(value, dict):
            if not isinstance(current, dict):
                current = acc[key] = {}
            _merge_delta(current, value)
        else:
            acc[key] = value


def _merge_top(acc: dict[str, Any], chunk: dict[str, Any], skip: frozenset[str]) -> None:
    for key, value in chunk.items():
        if key in skip:
            continue
        if value is not None or key not in acc:
            acc[key] = value


def _finish_tool_calls(message: dict[str, Any]) -> None:
    calls = message.get("tool_calls")
    if not isinstance(calls, dict):
        return
    finished = []
    for index in sorted(calls):
        call = {k: v for k, v in calls[index].items() if k != "index"}
        function = call.get("function")
        if isinstance(function, dict):
            function.setdefault("name", "")
            function.setdefault("arguments", "")
        finished.append(call)
    message["tool_calls"] = finished


# `obfuscation` pads chunk sizes against side channels; it exists only in streams.
_CHUNK_ONLY = frozenset({"choices", "object", "obfuscation"})


class _ChoicesAssembler:
    """Shared machinery for `chat.completion.chunk` and `text_completion` streams."""

    _object_name = ""

    def __init__(self) -> None:
        self._top: dict[str, Any] = {}
        self._choices: dict[int, dict[str, Any]] = {}
        self._done = False
        self._chunks = 0

    @property
    def complete(self) -> bool:
        """`[DONE]` seen, or every choice has a finish_reason (servers that omit `[DONE]`)."""
        if self._done:
            return True
        return bool(self._choices) and all(
            c.get("finish_reason") is not None for c in self._choices.values()
        )

    def feed(self, event: SseEvent) -> None:
        """Take one event: `[DONE]` ends the stream, anything else must be a chunk object."""
        if is_done(event):
            self._done = True
            return
        data = _parse(event)
        _check_error(event.event, data)
        self.add(_object(data, "stream chunk"))

    def add(self, chunk: dict[str, Any]) -> None:
        """Fold one parsed chunk in; raises StreamInterrupted if it carries an `error`."""
        _check_error(None, chunk)
        self._chunks += 1
        _merge_top(self._top, chunk, _CHUNK_ONLY)
        choices = chunk.get("choices")
        if not isinstance(choices, list):
            return
        for position, choice in enumerate(choices):
            if not isinstance(choice, dict):
                continue
            index = choice.get("index", position)
            acc = self._choices.setdefault(index if isinstance(index, int) else position, {})
            _merge_delta(acc, {k: v for k, v in choice.items() if k != "index"})

    def result(self, *, allow_incomplete: bool = False) -> dict[str, Any]:
        """The object the same call returns without streaming."""
        if not self._chunks or not (self.complete or allow_incomplete):
            raise StreamInterrupted(
                "the stream ended before its end marker"
                if self._chunks
                else "the stream ended before any chunk"
            )
        out: dict[str, Any] = {}
        if "id" in self._top:
            out["id"] = self._top["id"]
        out["object"] = self._object_name
        for key in ("created", "model"):
            if key in self._top:
                out[key] = self._top[key]
        out["choices"] = [self._choice(i, self._choices[i]) for i in sorted(self._choices)]
        for key, value in self._top.items():
            out.setdefault(key, value)
        return out

    def _choice(self, index: int, acc: dict[str, Any]) -> dict[str, Any]:
        raise NotImplementedError


class ChatCompletionAssembler(_ChoicesAssembler):
    """Rebuilds a `chat.completion` from `chat.completion.chunk` objects."""

    _object_name = "chat.completion"

    def _choice(self, index: int, acc: dict[str, Any]) -> dict[str, Any]:
        delta = acc.get("delta")
        delta = delta if isinstance(delta, dict) else {}
        message: dict[str, Any] = {
            "role": delta.get("role") or "assistant",
            "content": delta.get("content"),
        }
        message.update((k, v) for k, v in delta.items() if k not in message)
        _finish_tool_calls(message)
        out: dict[str, Any] = {
            "index": index,
            "message": message,
            "logprobs": acc.get("logprobs"),
            "finish_reason": acc.get("finish_reason"),
        }
        out.update((k, v) for k, v in acc.items() if k not in out and k != "delta")
        return out


class CompletionAssembler(_ChoicesAssembler):
    """Rebuilds a legacy `text_completion` (createCompletion) from its streamed chunks."""

    _object_name = "text_completion"

    def _choice(self, index: int, acc: dict[str, Any]) -> dict[str, Any]:
        out: dict[str, Any] = {
            "text": acc.get("text") or "",
            "index": index,
            "logprobs": acc.get("logprobs"),
            "finish_reason": acc.get("finish_reason"),
        }
        out.update((k, v) for k, v in acc.items() if k not in out)
        return out


_RESPONSE_TERMINAL = frozenset({"response.completed", "response.failed", "response.incomplete"})


class ResponsesAssembler:
    """Keeps the `response` object of a Responses stream's terminal event."""

    def __init__(self) -> None:
        self._response: dict[str, Any] | None = None
        self._latest: dict[str, Any] | None = None

    @property
    def complete(self) -> bool:
        """Whether `response.completed`, `response.failed` or `response.incomplete` arrived."""
        return self._response is not None

    def feed(self, event: SseEvent) -> None:
        """Take one event; raises StreamInterrupted for an `error` event."""
        if is_done(event):
            return
        data = _parse(event)
        _check_error(event.event, data)
        self.add(event.event, _object(data, "Responses stream event"))

    def add(self, event_name: str | None, data: dict[str, Any]) -> None:
        """Take one event by name (falls back to the data's `type`)."""
        kind = event_name or data.get("type")
        _check_error(kind, data)
        response = data.get("response")
        if isinstance(response, dict):
            self._latest = response
            if kind in _RESPONSE_TERMINAL:
                self._response = response
        elif kind in _RESPONSE_TERMINAL:
            raise UpstreamBadResponse(f"{kind} event without a response object")

    def result(self, *, allow_incomplete: bool = False) -> dict[str, Any]:
        """The terminal event's `response` (or, if allowed, the latest snapshot of it)."""
        if self._response is not None:
            return self._response
        if allow_incomplete and self._latest is not None:
            return self._latest
        raise StreamInterrupted("the stream ended before response.completed")


# Terminal event types of the other streams: images (`image_generation.completed`,
# `image_edit.completed`), transcription (`transcript.text.done`), speech (`speech.audio.done`).
_TERMINAL_SUFFIXES = (".completed", ".done", ".failed", ".incomplete", ".cancelled", ".expired")


class GenericAssembler:
    """Keeps the last event's data (JSON when it parses); ends at `[DONE]` or a terminal type."""

    def __init__(self) -> None:
        self._last: Any = None
        self._seen = False
        self._done = False

    @property
    def complete(self) -> bool:
        """`[DONE]` seen, or the last event's type ends like a terminal one (`.done`, ...)."""
        return self._done

    def feed(self, event: SseEvent) -> None:
        """Take one event; raises StreamInterrupted for an error event."""
        if is_done(event):
            self._done = True
            return
        try:
            data: Any = json.loads(event.data)
        except ValueError:
            data = event.data
        self.add(event.event, data)

    def add(self, event_name: str | None, data: Any) -> None:
        """Take one event by name (falls back to the data's `type`)."""
        _check_error(event_name, data)
        kind = event_name or (data.get("type") if isinstance(data, dict) else None)
        self._last = data
        self._seen = True
        self._done = isinstance(kind, str) and kind.endswith(_TERMINAL_SUFFIXES)

    def result(self, *, allow_incomplete: bool = False) -> Any:
        """The last event's data."""
        if not self._seen or not (self._done or allow_incomplete):
            raise StreamInterrupted("the stream ended before its end marker")
        return self._last


_ASSEMBLERS: dict[str, type[StreamAssembler]] = {
    "createChatCompletion": ChatCompletionAssembler,
    "createCompletion": CompletionAssembler,
    "createResponse": ResponsesAssembler,
    "beta_createResponse": ResponsesAssembler,
    "getResponse": ResponsesAssembler,
    "beta_getResponse": ResponsesAssembler,
}


def assembler_for(operation_name: str) -> StreamAssembler:
    """A fresh assembler suited to the stream of the operation named `operation_name`."""
    return _ASSEMBLERS.get(operation_name, GenericAssembler)()
