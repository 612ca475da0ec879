"""`openai-mqtt-bridge realtime`: speak a WAV file to the Realtime API through a running bridge,
write the spoken answer to a WAV file, as a device would (docs/protocol.md#realtime-sessions)."""

from __future__ import annotations

import json
import sys
import threading
import time
import uuid
import wave
from collections.abc import Callable
from dataclasses import dataclass, field

from bridge.cli.common import (
    EX_TEMPFAIL,
    EX_UNAVAILABLE,
    load_said,
)
from bridge.mqtt.oneshot import BrokerUnreachable, subscribed_exchange

RATE = 24_000
CHUNK = 960
"""20 ms of 24 kHz mono PCM16: what a device sends per message."""


@dataclass
class Answer:
    """What came back on the session's topics."""

    audio: bytearray = field(default_factory=bytearray)
    text: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    reason: str = ""
    opened: threading.Event = field(default_factory=threading.Event)
    answered: threading.Event = field(default_factory=threading.Event)


def read_pcm(path: str) -> bytes:
    """The frames of a 16-bit mono 24 kHz WAV file; raises ValueError for any other format."""
    with wave.open(path, "rb") as wav:
        shape = (wav.getsampwidth(), wav.getnchannels(), wav.getframerate())
        if shape != (2, 1, RATE):
            raise ValueError(f"{path}: need 16-bit mono 24 kHz PCM, got {shape}")
        return wav.readframes(wav.getnframes())


def cmd_realtime(
    path: str | None,
    how: str,
    wav_in: str,
    wav_out: str,
    *,
    model: str,
    timeout: float,
    pace: bool,
) -> int:
    """Stream `wav_in`, ask for a response, write its audio to `wav_out`, print its text;
    0 when an answer came, 1 on an error or a session closed early."""
    loaded = load_said(path, how)
    if isinstance(loaded, int):
        return loaded
    config, _ = loaded
    try:
        pcm = read_pcm(wav_in)
    except (OSError, ValueError, EOFError, wave.Error) as exc:
        print(f"cannot read {wav_in}: {exc}", file=sys.stderr)
        return 1
    prefix, name = config.mqtt.topic_prefix, f"cli-{uuid.uuid4().hex[:12]}"
    inp, out = f"{prefix}/request/realtime/{name}", f"{prefix}/response/realtime/{name}"
    answer = Answer()
    where = {"input": inp}
    """Where the session's audio and events go: the state's `input` (a group's member's topic)."""

    def feed(topic: str, payload: bytes) -> Answer | None:
        output = topic.rpartition("/")[2]
        if output == "audio":
            answer.audio += payload
        elif output == "text":
            answer.text.append(payload.decode("utf-8", "replace"))
        elif output == "error":
            answer.errors.append(payload.decode("utf-8", "replace"))
        elif output == "state":
            state = json.loads(payload)
            if isinstance(state.get("input"), str):
                where["input"] = state["input"]
            if state.get("state") == "open":
                answer.opened.set()
            elif state.get("state") == "closed":
                answer.reason = str(state.get("reason"))
                answer.opened.set()
                return answer
        elif output == "event" and b'"response.done"' in payload:
            answer.answered.set()
        return None

    def speak(publish: Callable[[str, bytes], None]) -> None:
        options = {"outputs": ["audio", "text", "error", "event"], "model": model}
        publish(f"{inp}/open", json.dumps({k: v for k, v in options.items() if v}).encode())
        if not answer.opened.wait(timeout) or answer.reason:
            return
        start = time.monotonic()
        for n, at in enumerate(range(0, len(pcm), CHUNK)):
            if pace:
                time.sleep(max(0.0, start + n * 0.02 - time.monotonic()))
            publish(f"{where['input']}/audio", pcm[at : at + CHUNK])
        publish(f"{where['input']}/event", b'{"type":"input_audio_buffer.commit"}')
        publish(f"{where['input']}/event", b'{"type":"response.create"}')
        answer.answered.wait(timeout)
        publish(f"{where['input']}/close", b"")

    host = config.mqtt.host or "127.0.0.1"
    try:
        result = subscribed_exchange(
            config.mqtt,
            host=host,
            subscriptions=[f"{out}/#"],
            start=speak,
            feed=feed,
            timeout=timeout,
        )
    except BrokerUnreachable as exc:
        print(f"cannot connect to the broker at {host}:{config.mqtt.port}: {exc}", file=sys.stderr)
        return EX_UNAVAILABLE
    for error in answer.errors:
        print(f"error: {error}", file=sys.stderr)
    if result is None:
        print(f"no closed state on {out}/state within {timeout:g} s", file=sys.stderr)
        return EX_TEMPFAIL
    with wave.open(wav_out, "wb") as wav:
        wav.setnchannels(1)
        wav.setsampwidth(2)
        wav.setframerate(RATE)
        wav.writeframes(bytes(answer.audio))
    print("".join(answer.text))
    print(
        f"{len(answer.audio)} bytes of audio written to {wav_out}; session closed: {answer.reason}",
        file=sys.stderr,
    )
    return 0 if answer.answered.is_set() and answer.reason == "client_close" else 1
