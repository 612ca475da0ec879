"""The sessions of one bridge process: intake of realtime messages, limits, shutdown, restart."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from typing import Any

from structlog.typing import FilteringBoundLogger

from bridge import errors
from bridge.config import BridgeConfig
from bridge.errors import BadJson, BadOpen, BridgeError, MethodNotAllowed, NotAnObject, UnknownTool
from bridge.messages import InboundMessage, Publisher
from bridge.pipeline.access import AccessRules
from bridge.pipeline.build import RequestBuilder
from bridge.realtime import model
from bridge.realtime.session import Connector, Session
from bridge.realtime.tools import SessionTools, session_key
from bridge.redact import Redactor
from bridge.tools.config import Tool
from bridge.tools.runner import CallContext, ToolRunner


class RealtimeManager:
    """Owns every realtime session of this process; `submit` never raises."""

    def __init__(
        self,
        *,
        config: BridgeConfig,
        publisher: Publisher,
        connector: Connector,
        log: FilteringBoundLogger,
        redactor: Redactor | None = None,
        serving: bool = True,
        tools: ToolRunner | None = None,
    ) -> None:
        self.config = config
        self.limits = config.realtime
        self.prefix = config.mqtt.topic_prefix
        self.instance = config.mqtt.instance_name
        self.publisher = publisher
        self.connector = connector
        self.log = log
        self.redactor = redactor or Redactor(config.secrets())
        self.access = AccessRules(config.access.allow_methods, config.access.deny_methods)
        self.builder = RequestBuilder(config.service)
        self.sessions: dict[tuple[str, str], Session] = {}
        self._tasks: set[asyncio.Task[str]] = set()
        self.accepting = True
        self._clock = time.monotonic
        self._budget_start = self._clock()
        self._budget_used = 0.0
        """Seconds of input audio in the current budget window, over all sessions."""
        self.serving = serving
        """False: every realtime message is answered `realtime_unavailable` (see the daemon)."""
        self.tools = tools
        """Runs the calls of the tools a session's open names (None: no tools configured)."""

    def takes(self, topic: str) -> bool:
        """Whether `topic` is a realtime request topic or one of its sessions' states."""
        if not topic.startswith(f"{self.prefix}/"):
            return False
        level, _, rest = topic[len(self.prefix) + 1 :].partition("/")
        return level in ("request", "response") and rest.partition("/")[0] in model.KINDS

    def submit(self, message: InboundMessage) -> None:
        """Handle one realtime message (acknowledged at once: sessions are not resumable)."""
        self.publisher.ack(message)
        if message.topic.startswith(f"{self.prefix}/response/"):
            self._restarted(message)
            return
        if message.retain or not self.accepting:
            return
        try:
            self._handle(message)
        except errors.RealtimeError as exc:
            self._reject(message.topic, exc)
        except BridgeError as exc:
            self._reject(message.topic, exc)

    def _handle(self, message: InboundMessage) -> None:
        parsed = model.parse_topic(self.prefix, message.topic)
        if parsed is None:
            return
        if not self.serving:
            raise errors.RealtimeUnavailable(
                "this bridge serves no realtime sessions ([realtime] enabled is off, or it is "
                "one process of a group): use a bridge with workers = 1 outside any group"
            )
        if not self.access.allows(parsed.kind):
            raise MethodNotAllowed(f"{parsed.kind} is not allowed by this bridge's [access] rules")
        if len(message.payload) > self.limits.max_message_bytes:
            raise errors.MessageTooLarge(
                f"{len(message.payload)} bytes: realtime messages are at most "
                f"{self.limits.max_message_bytes} bytes"
            )
        key = (parsed.kind, parsed.session)
        session = self.sessions.get(key)
        if parsed.verb == "open":
            if session is not None:
                raise errors.SessionExists(f"session {parsed.session!r} is already open")
            self._open(parsed, message.payload)
            return
        if session is None:
            raise errors.UnknownSession(
                f"no open {parsed.kind} session {parsed.session!r}: publish to .../open first"
            )
        try:
            session.admit()
            if parsed.verb == "close":
                session.end("client_close", "closed by the device")
            elif parsed.verb == "audio":
                self._spend_audio(session, len(message.payload))
                session.audio(message.payload)
            else:
                text, event = self._client_event(parsed.kind, message.payload)
                if event["type"] in ("session.update", "transcription_session.update"):
                    # A format declared mid-session counts from here on (limits, chunk_bytes).
                    session.options = session.options.declaring(event.get("session"))
                if session.tools is not None:
                    text = session.tools.client_event(text, event)
                session.forward(text)
        except (errors.RealtimeError, BadJson, NotAnObject) as exc:
            session.reject(exc)

    def _spend_audio(self, session: Session, size: int) -> None:
        """Count input audio against the bridge's budget per window; raises AudioBudgetExhausted."""
        budget = self.limits.audio_budget_seconds
        if budget <= 0:
            return
        now = self._clock()
        if now - self._budget_start >= self.limits.audio_budget_window:
            self._budget_start, self._budget_used = now, 0.0
        seconds = size / model.BYTES_PER_SECOND[session.options.audio_format]
        if self._budget_used + seconds > budget:
            left = self._budget_start + self.limits.audio_budget_window - now
            raise errors.AudioBudgetExhausted(
                f"this bridge's {budget:g} s of input audio per "
                f"{self.limits.audio_budget_window:g} s are used up; more in {left:.0f} s"
            )
        self._budget_used += seconds

    def _client_event(self, kind: str, payload: bytes) -> tuple[str, dict[str, Any]]:
        """The payload as text and parsed, once it is a JSON object naming one of the kind's
        client events."""
        try:
            text = payload.decode("utf-8")
            event = json.loads(text)
        except ValueError:
            raise BadJson("a realtime event is a UTF-8 JSON object") from None
        if not isinstance(event, dict):
            raise NotAnObject("a realtime event is a JSON object")
        if event.get("type") not in model.CLIENT_EVENTS[kind]:
            raise errors.UnknownEvent(
                f"{str(event.get('type'))[:80]!r} is not a {kind} client event"
            )
        return text, event

    def _open(self, parsed: model.RealtimeTopic, payload: bytes) -> None:
        try:
            data: Any = json.loads(payload) if payload.strip() else None
        except ValueError:
            raise BadJson("an open payload is empty or a UTF-8 JSON object") from None
        options = model.parse_open(data, self.limits.model)
        if len(self.sessions) >= self.limits.max_sessions:
            raise errors.TooManySessions(
                f"{self.limits.max_sessions} sessions are open on this bridge: try later"
            )
        offered = self._offer(parsed, options)
        session = Session(
            prefix=self.prefix,
            kind=parsed.kind,
            name=parsed.session,
            options=options,
            limits=self.limits,
            publisher=self.publisher,
            redactor=self.redactor,
            instance=self.instance,
        )
        if offered and self.tools is not None:
            context = CallContext(
                key=session_key(parsed.kind, parsed.session),
                caller=parsed.session,
                tools=offered,
                allow_dangerous=options.allow_dangerous,
                dry_run=options.dry_run,
            )
            session.tools = SessionTools(
                self.tools,
                context,
                self.config.tool_loop,
                send=session.forward,
                note=session.note,
                refuse=session.reject,
            )
        key = (parsed.kind, parsed.session)
        self.sessions[key] = session
        url = model.upstream_url(self.config.service.api_base, parsed.kind, options.model)
        url, headers = self.builder.websocket_request(url)
        task = asyncio.get_running_loop().create_task(self._run(key, session, url, headers))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _offer(self, parsed: model.RealtimeTopic, options: model.OpenOptions) -> dict[str, Tool]:
        """The tools an open names, checked as a request's (`unknown_tool`, `tool_not_allowed`)."""
        if not options.tools:
            return {}
        if parsed.kind != "realtime":
            raise BadOpen("tools apply to realtime sessions (the model's function calls)")
        if self.tools is None:
            raise UnknownTool("no tools are configured on this bridge ([tools.<name>])")
        return self.tools.offer(options.tools, parsed.session)

    async def _run(
        self, key: tuple[str, str], session: Session, url: str, headers: dict[str, str]
    ) -> str:
        self.log.info("realtime session opening", kind=key[0], session=key[1])
        try:
            reason = await session.run(self.connector, url, headers)
        except Exception:
            self.log.exception("realtime session failed", kind=key[0], session=key[1])
            reason = "internal_error"
        finally:
            self.sessions.pop(key, None)
        self.log.info(
            "realtime session closed",
            kind=key[0],
            session=key[1],
            reason=reason,
            detail=session.detail,
            audio_bytes=session.audio_bytes,
        )
        return reason

    def _reject(self, topic: str, exc: BridgeError) -> None:
        """Answer on the session's error topic, or the kind's when the topic names none."""
        parsed: model.RealtimeTopic | None = None
        with contextlib.suppress(errors.RealtimeError):
            parsed = model.parse_topic(self.prefix, topic)
        body = {**exc.to_dict(), "topic": topic[:200]}
        if parsed is not None:
            target = model.output_topic(self.prefix, parsed.kind, parsed.session, "error")
        else:
            kind = topic[len(self.prefix) + len("/request/") :].partition("/")[0]
            target = model.kind_error_topic(
                self.prefix, kind if kind in model.KINDS else "realtime"
            )
        self.log.info("realtime message refused", code=exc.code, topic=topic[:200])
        self.publisher.publish(target, self.redactor.data(json.dumps(body).encode("utf-8")))

    def _restarted(self, message: InboundMessage) -> None:
        """A retained state left `open` by an earlier run of this instance: publish `closed`.

        Upstream sessions are not resumable; a bridge killed without its shutdown leaves them
        looking open until this.
        """
        try:
            state = json.loads(message.payload)
        except ValueError:
            return
        if not isinstance(state, dict) or state.get("instance") != self.instance:
            return
        if state.get("state") == "closed":
            return
        parts = message.topic.split("/")
        if (parts[-3], parts[-2]) in self.sessions:
            return
        body = {
            **state,
            "state": "closed",
            "reason": "bridge_restarted",
            "detail": "the bridge stopped without closing this session; open a new one",
        }
        self.publisher.publish(message.topic, json.dumps(body).encode("utf-8"), retain=True)

    async def close_all(self) -> None:
        """Close every session with reason `shutdown` and wait for their `closed` states."""
        self.accepting = False
        for session in list(self.sessions.values()):
            session.end("shutdown", "the bridge is stopping")
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=5.0)
        for task in list(self._tasks):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
