"""One realtime session: its upstream socket, its limits, and what goes out on its topics."""

from __future__ import annotations

import asyncio
import base64
import binascii
import collections
import contextlib
import json
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

from bridge import errors
from bridge.config import RealtimeConfig
from bridge.errors import BridgeError
from bridge.messages import PublishFailed, StreamPublisher
from bridge.realtime import model
from bridge.redact import Redactor, StreamScrubber

if TYPE_CHECKING:
    from bridge.realtime.tools import SessionTools


class UpstreamClosed(Exception):
    """The upstream socket ended or could not open; `reason` is the `closed` state's code."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


class Upstream(Protocol):
    """One open upstream WebSocket (bridge/realtime/websocket.py)."""

    async def send(self, text: str) -> None:
        """Send one text frame; raises UpstreamClosed."""

    async def receive(self) -> str:
        """The next text frame; raises UpstreamClosed when the socket ends."""

    async def close(self) -> None:
        """Close cleanly (idempotent)."""


class Connector(Protocol):
    """Opens upstream sockets."""

    async def connect(self, url: str, headers: dict[str, str]) -> Upstream:
        """Open one; raises UpstreamClosed (`connect_failed`)."""


class Session:
    """One device's session; `run()` lives from open to `closed` and returns the reason."""

    def __init__(
        self,
        *,
        prefix: str,
        kind: str,
        name: str,
        options: model.OpenOptions,
        limits: RealtimeConfig,
        publisher: StreamPublisher,
        redactor: Redactor,
        instance: str,
        labels: dict[str, str] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.kind, self.name, self.options, self.limits = kind, name, options, limits
        self._topics = {o: model.output_topic(prefix, kind, name, o) for o in model.OUTPUTS}
        self._publisher = publisher
        self._redactor = redactor
        self._text_scrubber = StreamScrubber(redactor)
        self._event_scrubber = StreamScrubber(redactor)
        """Deltas read on from the earlier ones: a key split over deltas is masked too."""
        self._instance = instance
        self._labels = labels or {}
        """More fields of the state: `input`, and `member` in a group."""
        self._clock = clock
        self._outbox: collections.deque[str] = collections.deque()
        """Client events in arrival order, for the sender."""
        self._wake: asyncio.Future[None] | None = None
        """The sender's wait for `_outbox` to fill (a future of the loop: no asyncio.Queue, whose
        every get asks for the running loop, a getpid() system call on Python 3.11)."""
        self._ended = asyncio.Event()
        self.reason = ""
        self.detail = ""
        self.started = clock()
        self.last_device = self.started
        self.audio_bytes = 0
        self._allowance = limits.max_events_per_second
        self._allowance_at = self.started
        self._pending: set[asyncio.Future[None]] = set()
        self._pending_bytes = 0
        self.tools: SessionTools | None = None
        """The tools its open named, run by the bridge (bridge/realtime/tools.py)."""

    # --- from the device ------------------------------------------------------------------------

    def admit(self) -> None:
        """Count one device message against the rate limit; raises RateLimited."""
        now = self._clock()
        self.last_device = now
        rate = self.limits.max_events_per_second
        self._allowance = min(rate, self._allowance + (now - self._allowance_at) * rate)
        self._allowance_at = now
        if self._allowance < 1:
            raise errors.RateLimited(f"more than {rate:g} messages a second on this session")
        self._allowance -= 1

    def forward(self, event_text: str) -> None:
        """Queue one client event (already checked) for upstream, in order."""
        self._outbox.append(event_text)
        wake = self._wake
        if wake is not None and not wake.done():
            wake.set_result(None)

    def audio(self, data: bytes) -> None:
        """Queue raw audio as `input_audio_buffer.append`; ends the session past the audio limit."""
        if self.kind == "responsesWebSocket":
            raise errors.NoAudio("a Responses WebSocket session takes no audio")
        self.audio_bytes += len(data)
        rate = model.BYTES_PER_SECOND[self.options.audio_format]
        if self.audio_bytes > self.limits.max_audio_seconds * rate:
            self.end("audio_limit", f"more than {self.limits.max_audio_seconds:g} s of audio")
            return
        encoded = base64.b64encode(data).decode("ascii")
        self.forward(f'{{"type":"input_audio_buffer.append","audio":"{encoded}"}}')

    def end(self, reason: str, detail: str = "") -> None:
        """Ask the session to close with `reason` (the first reason given wins)."""
        if not self.reason:
            self.reason, self.detail = reason, detail
        self._ended.set()

    # --- the session's life ---------------------------------------------------------------------

    async def run(self, connector: Connector, url: str, headers: dict[str, str]) -> str:
        """Connect, pump both directions until an end, publish `closed`; the reason."""
        self._state("connecting")
        upstream: Upstream | None = None
        try:
            upstream = await connector.connect(url, headers)
            if not self._ended.is_set():
                self._state("open")
                session = self.options.session
                if self.tools is not None:
                    session = self.tools.session(session)
                if session is not None:
                    update = (
                        "transcription_session.update"
                        if self.kind == "realtimeTranscription"
                        else "session.update"
                    )
                    await upstream.send(json.dumps({"type": update, "session": session}))
                await self._pump(upstream)
        except UpstreamClosed as exc:
            self.end(exc.reason, exc.detail)
        except Exception as exc:  # a bug: the device still gets its `closed`, the log the cause
            self.end("internal_error", type(exc).__name__)
            raise
        finally:
            if self.tools is not None:
                await self.tools.close()
            if upstream is not None:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(upstream.close(), 2.0)
            if not self.reason:
                self.end("shutdown", "the bridge is stopping")
            self._state("closed", reason=self.reason, detail=self.detail)
        return self.reason

    async def _pump(self, upstream: Upstream) -> None:
        async with asyncio.TaskGroup() as group:
            tasks = [
                group.create_task(self._send_loop(upstream)),
                group.create_task(self._receive_loop(upstream)),
                group.create_task(self._watch()),
            ]
            await self._ended.wait()
            for task in tasks:
                task.cancel()

    async def _send_loop(self, upstream: Upstream) -> None:
        loop = asyncio.get_running_loop()
        outbox = self._outbox
        try:
            while True:
                while outbox:
                    await upstream.send(outbox.popleft())
                self._wake = loop.create_future()
                await self._wake
        except UpstreamClosed as exc:
            self.end(exc.reason, exc.detail)

    async def _receive_loop(self, upstream: Upstream) -> None:
        try:
            while True:
                self._server_event(await upstream.receive())
        except UpstreamClosed as exc:
            self.end(exc.reason, exc.detail)

    async def _watch(self) -> None:
        """End the session when the device is silent too long or the session too old."""
        limits = self.limits
        while True:
            now = self._clock()
            idle_left = self.last_device + limits.idle_timeout - now
            age_left = self.started + limits.max_session_seconds - now
            if age_left <= 0:
                self.end("max_duration", f"sessions last at most {limits.max_session_seconds:g} s")
                return
            if idle_left <= 0:
                self.end("idle", f"nothing from the device for {limits.idle_timeout:g} s")
                return
            await asyncio.sleep(min(idle_left, age_left) + 0.01)

    # --- to the device --------------------------------------------------------------------------

    def _server_event(self, text: str) -> None:
        """Publish one server event where the device wants it (in arrival order)."""
        wants = self.options.outputs
        try:
            event = json.loads(text)
            kind = event.get("type") if isinstance(event, dict) else None
        except ValueError:
            event, kind = None, None
        if not isinstance(kind, str):
            self._error("upstream_garbage", "upstream sent a frame that is not a JSON event")
            return
        if kind in model.AUDIO_DELTAS and "audio" in wants:
            try:
                audio = base64.b64decode(event.get("delta") or "", validate=True)
            except (binascii.Error, TypeError, ValueError):
                self._error("upstream_garbage", f"{kind} with a delta that is not base64")
                return
            for piece in model.chunks(audio, self.options.chunk_bytes):
                self._publish("audio", piece, qos=self.limits.audio_qos)
        elif kind in model.TEXT_DELTAS and "text" in wants and isinstance(event.get("delta"), str):
            delta = self._text_scrubber.any(event["delta"], (kind,))
            self._publish("text", delta.encode("utf-8"))
        if kind in model.DONE_EVENTS and "done" in wants:
            self._publish("done", kind.encode("utf-8"))
        if kind == "error" and "error" in wants:
            upstream = self._redactor.any(event.get("error"))
            self._error("upstream_error", "the service host reported an error", upstream)
        if "event" in wants:
            scrubbed = self._event_scrubber.any(event, (kind,))
            # The frame as upstream sent it, unless scrubbing changed it.
            payload = text if scrubbed == event else json.dumps(scrubbed)
            self._publish("event", self._redactor.data(payload.encode("utf-8")))
        if self.tools is not None:
            self.tools.server_event(event)

    def note(self, event: dict[str, Any]) -> None:
        """Publish an event of the bridge's own (a tool call, its result) on the event topic."""
        if "event" in self.options.outputs:
            self._publish("event", self._redactor.data(json.dumps(event).encode("utf-8")))

    def _error(
        self, code: str, message: str, upstream: Any = None, *, retryable: bool = False
    ) -> None:
        body: dict[str, Any] = {
            "code": code,
            "message": message,
            "retryable": retryable,
            "session": self.name,
        }
        if upstream is not None:
            body["upstream"] = upstream
        if "error" in self.options.outputs:
            self._publish("error", json.dumps(body).encode("utf-8"))

    def reject(self, exc: BridgeError) -> None:
        """Answer a device message the session could not take on its error topic."""
        self._error(exc.code, exc.message, retryable=exc.is_retryable)

    def _state(self, state: str, **extra: str) -> None:
        body = {"state": state, "kind": self.kind, "instance": self._instance, **self._labels}
        body |= extra
        if self.options.model:
            body["model"] = self.options.model
        self._publish("state", json.dumps(body).encode("utf-8"), retain=True, always=True)

    def _publish(
        self,
        output: str,
        payload: bytes,
        *,
        retain: bool = False,
        qos: int = -1,
        always: bool = False,
    ) -> None:
        if self._pending_bytes > self.limits.max_pending_bytes and not always:
            self.end("device_too_slow", "the broker does not take the session's output")
            return
        try:
            future = self._publisher.publish(
                self._topics[output],
                payload,
                retain=retain,
                qos=self.limits.qos if qos < 0 else qos,
            )
        except PublishFailed:
            self.end("device_too_slow", "the broker does not take the session's output")
            return
        self._pending.add(future)
        size = len(payload)
        self._pending_bytes += size
        future.add_done_callback(lambda f: self._settled(f, size))

    def _settled(self, future: asyncio.Future[None], size: int) -> None:
        self._pending.discard(future)
        self._pending_bytes -= size
        if not future.cancelled() and future.exception() is not None:
            self.end("device_too_slow", "the broker does not take the session's output")
