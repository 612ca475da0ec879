"""The realtime wire contract, pure: session kinds, topics, names, open options, event types."""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from typing import Any

from bridge.errors import BadOpen, BadSessionName
from bridge.pipeline.options import MAX_TOOLS

KINDS = ("realtime", "realtimeTranscription", "responsesWebSocket")
"""The method-like level naming a session's kind; `[access]` rules match these names."""

VERBS = ("open", "event", "audio", "close")
"""What a device publishes under `<prefix>/request/<kind>/<session>/`."""

OUTPUTS = ("state", "event", "audio", "text", "error", "done")
"""What the bridge publishes under `<prefix>/response/<kind>/<session>/`."""

SESSION_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}")
"""One topic level: letters, digits, `_`, `.`, `-`; never `+`, `#`, `/`, empty or `..`."""

REALTIME_CLIENT_EVENTS = frozenset(
    {
        "conversation.item.create",
        "conversation.item.delete",
        "conversation.item.retrieve",
        "conversation.item.truncate",
        "input_audio_buffer.append",
        "input_audio_buffer.clear",
        "input_audio_buffer.commit",
        "output_audio_buffer.clear",
        "response.cancel",
        "response.create",
        "session.update",
    }
)
"""The spec's `RealtimeClientEvent` types (tests/unit/test_realtime_model.py checks the list)."""

CLIENT_EVENTS: dict[str, frozenset[str]] = {
    "realtime": REALTIME_CLIENT_EVENTS,
    "realtimeTranscription": REALTIME_CLIENT_EVENTS | {"transcription_session.update"},
    "responsesWebSocket": frozenset({"response.create"}),
}

AUDIO_DELTAS = frozenset({"response.output_audio.delta", "response.audio.delta"})
"""Server events whose base64 `delta` goes out as raw bytes on the audio topic."""

TEXT_DELTAS = frozenset(
    {
        "response.output_audio_transcript.delta",
        "response.audio_transcript.delta",
        "response.output_text.delta",
        "response.text.delta",
        "conversation.item.input_audio_transcription.delta",
    }
)
"""Server events whose `delta` goes out as plain UTF-8 on the text topic."""

DONE_EVENTS = frozenset(
    {
        "response.done",
        "response.completed",
        "response.failed",
        "response.incomplete",
        "conversation.item.input_audio_transcription.completed",
    }
)
"""Server events that end an answer: their type goes out as text on the done topic, so a device
that takes no JSON events still knows when to stop listening."""

BYTES_PER_SECOND = {
    "pcm16": 48_000,
    "g711_ulaw": 8_000,
    "g711_alaw": 8_000,
    "audio/pcm": 48_000,
    "audio/pcmu": 8_000,
    "audio/pcma": 8_000,
}
"""Audio byte rate per format name (PCM16 at 24 kHz mono, G.711 at 8 kHz, 1 byte a sample): the
spec's format types (`audio/pcm`, `audio/pcmu`, `audio/pcma`) and the older names."""

SAMPLE_BYTES = {name: 2 if rate == 48_000 else 1 for name, rate in BYTES_PER_SECOND.items()}
"""Bytes per sample: a `chunk_bytes` piece never splits one."""


def declared_formats(session: Any) -> tuple[str | None, str | None]:
    """The input and output audio formats a session configuration declares (None: not said).

    The spec's `audio.input.format.type` / `audio.output.format.type`, or the older
    `input_audio_format` / `output_audio_format` strings; an unknown name counts as not said
    (the service host answers it).
    """
    if not isinstance(session, dict):
        return None, None
    found: list[str | None] = []
    for side in ("input", "output"):
        name: Any = session.get(f"{side}_audio_format")
        audio = session.get("audio")
        if isinstance(audio, dict) and isinstance(audio.get(side), dict):
            fmt = audio[side].get("format")
            if isinstance(fmt, dict):
                name = fmt.get("type")
        found.append(name if isinstance(name, str) and name in BYTES_PER_SECOND else None)
    return found[0], found[1]


@dataclass(frozen=True, slots=True)
class RealtimeTopic:
    """A parsed `<prefix>/request/<kind>/<session>/<verb>` topic."""

    kind: str
    session: str
    verb: str


def parse_topic(prefix: str, topic: str) -> RealtimeTopic | None:
    """The parts of a realtime request topic; None when `topic` is no realtime topic at all.

    Raises BadSessionName for a realtime topic whose session level or verb is unusable.
    """
    head = f"{prefix}/request/"
    if not topic.startswith(head):
        return None
    parts = topic[len(head) :].split("/")
    if parts[0] not in KINDS:
        return None
    if len(parts) != 3 or parts[2] not in VERBS:
        raise BadSessionName(
            f"realtime topics are <prefix>/request/{parts[0]}/<session>/"
            f"{{{'|'.join(VERBS)}}}: got {topic[:200]!r}"
        )
    session = parts[1]
    if not valid_session(session):
        raise BadSessionName(
            f"session name {session[:80]!r} must be 1-64 of A-Z a-z 0-9 _ . - "
            "(not starting with '.' or '-')"
        )
    return RealtimeTopic(parts[0], session, parts[2])


def valid_session(name: str) -> bool:
    """Whether `name` is a usable session level (never a wildcard, empty or a dot path)."""
    return SESSION_NAME.fullmatch(name) is not None


def output_topic(prefix: str, kind: str, session: str, output: str) -> str:
    """Where the bridge publishes one of a session's OUTPUTS."""
    return f"{prefix}/response/{kind}/{session}/{output}"


def kind_error_topic(prefix: str, kind: str) -> str:
    """The error topic for realtime messages that name no usable session."""
    return f"{prefix}/response/{kind}/error"


@dataclass(frozen=True, slots=True)
class OpenOptions:
    """What an open message asks for."""

    model: str = ""
    session: dict[str, Any] | None = None
    """Sent upstream as the first `session.update` (or `transcription_session.update`)."""
    outputs: frozenset[str] = field(default_factory=lambda: frozenset(OUTPUTS))
    """Which outputs the device wants (state always goes out)."""
    audio_format: str = "pcm16"
    """The input audio's format (what the audio limit and budget count with)."""
    output_format: str = "pcm16"
    """The output audio's format (what `chunk_bytes` pieces are aligned to)."""
    chunk_request: int = 0
    """`chunk_bytes` as the device asked."""
    chunk_bytes: int = 0
    """Largest audio payload published at once, whole samples of `output_format`; 0: each delta
    as one message."""
    tools: tuple[str, ...] = ()
    """`[tools.<name>]` the model may call; the bridge runs those calls (`realtime` only)."""
    allow_dangerous: frozenset[str] = frozenset()
    """Tools marked `dangerous` this session allows."""
    dry_run: bool = False
    """The session's tool calls publish nothing: each says what it would have sent."""

    def declaring(self, session: Any) -> OpenOptions:
        """These options once `session` (a session configuration) is in force."""
        inp, out = declared_formats(session)
        inp, out = inp or self.audio_format, out or self.output_format
        if (inp, out) == (self.audio_format, self.output_format):
            return self
        return replace(
            self,
            audio_format=inp,
            output_format=out,
            chunk_bytes=aligned(self.chunk_request, out),
        )


def aligned(chunk: int, audio_format: str) -> int:
    """`chunk` bytes rounded down to whole samples of `audio_format` (0 stays 0)."""
    width = SAMPLE_BYTES[audio_format]
    return max(width, chunk - chunk % width) if chunk else 0


def parse_open(payload: Any, default_model: str) -> OpenOptions:
    """The options of an open payload (an object or nothing); raises BadOpen."""
    if payload is None:
        payload = {}
    if not isinstance(payload, dict):
        raise BadOpen("an open payload is empty or a JSON object")
    unknown = set(payload) - OPEN_OPTIONS
    if unknown:
        raise BadOpen(f"unknown open options: {', '.join(sorted(unknown))}")
    model = payload.get("model", default_model)
    if not isinstance(model, str) or not re.fullmatch(r"[A-Za-z0-9_.:-]{0,128}", model):
        raise BadOpen("model must be a model name")
    session = payload.get("session")
    if session is not None and not isinstance(session, dict):
        raise BadOpen("session must be an object (the session configuration)")
    outputs = payload.get("outputs", list(OUTPUTS))
    if not isinstance(outputs, list) or not all(o in OUTPUTS for o in outputs):
        raise BadOpen(f"outputs must be a list of {', '.join(OUTPUTS)}")
    declared_in, declared_out = declared_formats(session)
    audio_format = payload.get("audio_format", declared_in or "pcm16")
    if not isinstance(audio_format, str) or audio_format not in BYTES_PER_SECOND:
        raise BadOpen(f"audio_format must be one of {', '.join(BYTES_PER_SECOND)}")
    if declared_in is not None and BYTES_PER_SECOND[declared_in] != BYTES_PER_SECOND[audio_format]:
        raise BadOpen(f"audio_format {audio_format} differs from the session's {declared_in}")
    output_format = declared_out or audio_format
    chunk = payload.get("chunk_bytes", 0)
    if not isinstance(chunk, int) or isinstance(chunk, bool) or not 0 <= chunk <= 1 << 20:
        raise BadOpen("chunk_bytes must be an integer from 0 to 1048576")
    tools = _tool_names(payload, "tools")
    allow_dangerous = _tool_names(payload, "allow_dangerous")
    dry_run = payload.get("dry_run", False)
    if not isinstance(dry_run, bool):
        raise BadOpen("dry_run must be true or false")
    if (allow_dangerous or dry_run) and not tools:
        raise BadOpen("allow_dangerous and dry_run apply to the tools the open names in tools")
    return OpenOptions(
        model=model,
        session=session,
        outputs=frozenset(outputs) | {"state"},
        audio_format=audio_format,
        output_format=output_format,
        chunk_request=chunk,
        chunk_bytes=aligned(chunk, output_format),
        tools=tools,
        allow_dangerous=frozenset(allow_dangerous),
        dry_run=dry_run,
    )


OPEN_OPTIONS = frozenset(
    {
        "model",
        "session",
        "outputs",
        "audio_format",
        "chunk_bytes",
        "tools",
        "allow_dangerous",
        "dry_run",
    }
)


def _tool_names(payload: dict[str, Any], option: str) -> tuple[str, ...]:
    """A list of tool names (strings, repeats dropped, at most MAX_TOOLS); raises BadOpen."""
    value = payload.get(option)
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise BadOpen(f"{option} must be a list of tool names")
    if len(value) > MAX_TOOLS:
        raise BadOpen(f"{option} may name at most {MAX_TOOLS} tools")
    return tuple(dict.fromkeys(value))


def chunks(data: bytes, size: int) -> list[bytes]:
    """`data` cut into pieces of at most `size` bytes (whole when `size` is 0)."""
    if size <= 0 or len(data) <= size:
        return [data]
    return [data[i : i + size] for i in range(0, len(data), size)]


def upstream_url(api_base: str, kind: str, model: str) -> str:
    """The WebSocket URL for a session: api_base's scheme mapped to ws/wss, plus the kind's path."""
    scheme, sep, rest = api_base.partition("://")
    ws = {"https": "wss", "http": "ws"}[scheme] + sep + rest.rstrip("/")
    if kind == "responsesWebSocket":
        return f"{ws}/responses"
    if kind == "realtimeTranscription":
        return f"{ws}/realtime?intent=transcription"
    return f"{ws}/realtime?model={model}" if model else f"{ws}/realtime"
