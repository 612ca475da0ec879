"""The sessions of one bridge process: intake of realtime messages, limits, shutdown, restart."""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import time
from typing import Any

from structlog.typing import FilteringBoundLogger

from bridge import errors
from bridge.config import BridgeConfig
from bridge.errors import BadJson, BadOpen, BridgeError, MethodNotAllowed, NotAnObject, UnknownTool
from bridge.messages import InboundMessage, Publisher
from bridge.pipeline.access import AccessRules
from bridge.pipeline.build import RequestBuilder
from bridge.realtime import group as grouping
from bridge.realtime import model
from bridge.realtime.session import Connector, Session
from bridge.realtime.tools import SessionTools, session_key
from bridge.redact import Redactor
from bridge.tools.config import Tool
from bridge.tools.runner import CallContext, ToolRunner

CLOSED_DETAIL = {
    "bridge_restarted": "the bridge stopped without closing this session; open a new one",
    "bridge_lost": "the bridge process holding this session is gone; open a new one",
    "shutdown": "the bridge is stopping",
}


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
        member: str | None = None,
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
        self.group = (
            grouping.Group(self.prefix, member, self.instance) if member is not None else None
        )
        """This process's view of its group (None: a bridge on its own, outside any group)."""
        self._pending: dict[
            str, tuple[model.RealtimeTopic, model.OpenOptions, dict[str, Tool]]
        ] = {}
        """In a group: opens claimed by this member whose claim has not come back, by nonce."""

    def takes(self, topic: str) -> bool:
        """Whether `topic` is a realtime request topic, one of its sessions' states, or (in a
        group) a claim, one of this member's input topics or another bridge's liveness."""
        if not topic.startswith(f"{self.prefix}/"):
            return False
        if self.group is not None and self.group.kind_of(topic):
            return True
        level, _, rest = topic[len(self.prefix) + 1 :].partition("/")
        return level in ("request", "response") and rest.partition("/")[0] in model.KINDS

    def submit(self, message: InboundMessage) -> None:
        """Handle one realtime message (acknowledged at once: sessions are not resumable)."""
        self.publisher.ack(message)
        topic = message.topic
        what = self.group.kind_of(topic) if self.group is not None else ""
        if what in ("claim", "instance", "worker"):
            self._coordinate(what, message)
            return
        if topic.startswith(f"{self.prefix}/response/"):
            if self.group is None:
                self._restarted(message)
            else:
                self._state_seen(message)
            return
        if message.retain or not self.accepting:
            return
        try:
            self._handle(message, pinned=what == "pinned")
        except errors.RealtimeError as exc:
            self._reject(message.topic, exc)
        except BridgeError as exc:
            self._reject(message.topic, exc)

    def _handle(self, message: InboundMessage, *, pinned: bool) -> None:
        if pinned:
            assert self.group is not None
            parsed: model.RealtimeTopic | None = self.group.parse_pinned(message.topic)
        else:
            parsed = model.parse_topic(self.prefix, message.topic)
        if parsed is None:
            return
        if not self.serving:
            raise errors.RealtimeUnavailable(
                "this bridge serves no realtime sessions ([realtime] enabled is off)"
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
            if self.group is not None:
                self._claim(parsed, message.payload)
                return
            if session is not None:
                raise errors.SessionExists(f"session {parsed.session!r} is already open")
            options = self._options(message.payload)
            self._reserve()
            self._start(parsed, options, self._offer(parsed, options))
            return
        if self.group is not None and not pinned:
            owner = self.group.owners.get(key)
            if owner is not None:
                where = grouping.pinned_input(self.prefix, owner.member, *key)
                raise errors.UseInputTopic(
                    f"session {parsed.session!r} is served by {owner.member}: publish its "
                    f"{parsed.verb} to {where}/{parsed.verb} (the input in its state)"
                )
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

    def _options(self, payload: bytes) -> model.OpenOptions:
        """The open options in `payload`; raises BadJson or BadOpen."""
        try:
            data: Any = json.loads(payload) if payload.strip() else None
        except ValueError:
            raise BadJson("an open payload is empty or a UTF-8 JSON object") from None
        return model.parse_open(data, self.limits.model)

    def _reserve(self) -> None:
        """Raise TooManySessions when no session (open or being claimed) more fits."""
        if len(self.sessions) + len(self._pending) >= self.limits.max_sessions:
            raise errors.TooManySessions(
                f"{self.limits.max_sessions} sessions are open on this bridge: try later"
            )

    def _start(
        self, parsed: model.RealtimeTopic, options: model.OpenOptions, offered: dict[str, Tool]
    ) -> None:
        """Open the session: its upstream socket and its life, in a task of its own."""
        key = (parsed.kind, parsed.session)
        if self.group is None:
            labels = {"input": grouping.classic_input(self.prefix, *key)}
        else:
            labels = {"member": self.group.member, "input": self.group.input_topic(*key)}
        session = Session(
            prefix=self.prefix,
            kind=parsed.kind,
            name=parsed.session,
            options=options,
            limits=self.limits,
            publisher=self.publisher,
            redactor=self.redactor,
            instance=self.instance,
            labels=labels,
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
            if self.group is not None and self.group.kind_of(topic) == "pinned":
                parsed = self.group.parse_pinned(topic)
            else:
                parsed = model.parse_topic(self.prefix, topic)
        body = {**exc.to_dict(), "topic": topic[:200]}
        if parsed is not None:
            target = model.output_topic(self.prefix, parsed.kind, parsed.session, "error")
        else:
            head = f"{self.prefix}/request/"
            kind = topic[len(head) :].partition("/")[0] if topic.startswith(head) else ""
            if self.group is not None:
                kind = self.group.kind_in(topic)
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
            "detail": CLOSED_DETAIL["bridge_restarted"],
        }
        self.publisher.publish(message.topic, json.dumps(body).encode("utf-8"), retain=True)

    # --- in a group (bridge/realtime/group.py) ------------------------------------------------

    def _claim(self, parsed: model.RealtimeTopic, payload: bytes) -> None:
        """An open that reached this member: claim the name for it unless it is held."""
        assert self.group is not None
        key = (parsed.kind, parsed.session)
        owner = self.group.owners.get(key)
        if owner is not None or any(
            (p.kind, p.session) == key for p, _, _ in self._pending.values()
        ):
            held = f" by {owner.member}" if owner is not None else ""
            raise errors.SessionExists(f"session {parsed.session!r} is already open{held}")
        options = self._options(payload)
        self._reserve()
        offered = self._offer(parsed, options)
        nonce = secrets.token_hex(8)
        self._pending[nonce] = (parsed, options, offered)
        claim = grouping.Claim(self.group.member, self.instance, nonce=nonce)
        self.publisher.publish(self.group.claim_topic(*key), claim.encode(), qos=1)

    def _coordinate(self, what: str, message: InboundMessage) -> None:
        """A claim, a bridge's state or a worker's last will."""
        assert self.group is not None
        group = self.group
        if what == "claim":
            key = group.parse_claim_topic(message.topic)
            claim = grouping.Claim.decode(message.payload)
            if key is not None and claim is not None and not message.retain:
                self._claimed(key, claim)
            return
        try:
            body = json.loads(message.payload) if message.payload else {}
        except ValueError:
            return
        if not isinstance(body, dict):
            return
        instance = message.topic[len(self.prefix) + len("/bridge/") :].partition("/")[0]
        if what == "instance" and instance != self.instance:
            if body.get("state") == "offline":
                group.dead_instances.add(instance)
                for key, owner in group.owned_by(instance=instance):
                    self._reap(key, owner, "bridge_lost")
            else:
                group.dead_instances.discard(instance)
        elif what == "worker" and body.get("state") == "offline":
            member = body.get("member")
            if isinstance(member, str) and member != group.member:
                group.dead_members.add(member)
                for key, owner in group.owned_by(member=member):
                    self._reap(key, owner, "bridge_lost")

    def _claimed(self, key: tuple[str, str], claim: grouping.Claim) -> None:
        """Apply one claim, in the order every member sees them."""
        assert self.group is not None
        group = self.group
        owner = group.owners.get(key)
        if claim.reap:
            if owner is None or owner.member != claim.reap:
                return  # already reaped, or held by a newer owner
            del group.owners[key]
            if claim.member == group.member and key not in self.sessions:
                self._publish_closed(key, owner, claim.reason)
            return
        group.dead_members.discard(claim.member)
        won = owner is None
        if won:
            group.own(key, grouping.Owner(claim.member, claim.instance))
        if claim.member != group.member:
            return
        pending = self._pending.pop(claim.nonce, None)
        if pending is None:
            if won:  # a claim of an earlier run of this member: let it go at once
                self._reap(key, group.owners[key], "bridge_restarted")
            return
        parsed, options, offered = pending
        if not won:
            assert owner is not None
            self._reject(
                f"{self.prefix}/request/{key[0]}/{key[1]}/open",
                errors.SessionExists(f"session {key[1]!r} is already open by {owner.member}"),
            )
        elif not self.accepting:
            self._reap(key, group.owners[key], "shutdown")
        else:
            self._start(parsed, options, offered)

    def _state_seen(self, message: InboundMessage) -> None:
        """A session's state: who holds it; a leftover of this member or a dead one is reaped."""
        assert self.group is not None
        group = self.group
        parts = message.topic.split("/")
        key = (parts[-3], parts[-2])
        if key[0] not in model.KINDS or not model.valid_session(key[1]):
            return
        try:
            body = json.loads(message.payload)
        except ValueError:
            return
        if not isinstance(body, dict) or not isinstance(body.get("member"), str):
            return
        member, instance = body["member"], str(body.get("instance", ""))
        current = group.owners.get(key)
        if body.get("state") == "closed":
            if current is not None and current.member == member:
                del group.owners[key]
            return
        owner = grouping.Owner(member, instance, body)
        group.own(key, owner)
        if not message.retain:
            group.dead_members.discard(member)
            return
        # A retained state read at (re)connect: its owner may be gone.
        if member == group.member and key not in self.sessions:
            self._reap(key, owner, "bridge_restarted")
        elif member in group.dead_members or (
            instance in group.dead_instances and instance != self.instance
        ):
            self._reap(key, owner, "bridge_lost")

    def _reap(self, key: tuple[str, str], owner: grouping.Owner, reason: str) -> None:
        """Ask the group to end a session whose owner is gone (the first such claim wins)."""
        assert self.group is not None
        claim = grouping.Claim(self.group.member, self.instance, reap=owner.member, reason=reason)
        self.publisher.publish(self.group.claim_topic(*key), claim.encode(), qos=1)

    def _publish_closed(self, key: tuple[str, str], owner: grouping.Owner, reason: str) -> None:
        """Publish `closed` for a session whose owner is gone."""
        base = owner.state or {"kind": key[0], "instance": owner.instance, "member": owner.member}
        body = {**base, "state": "closed", "reason": reason, "detail": CLOSED_DETAIL[reason]}
        self.log.info("realtime session closed", kind=key[0], session=key[1], reason=reason)
        topic = model.output_topic(self.prefix, key[0], key[1], "state")
        self.publisher.publish(topic, json.dumps(body).encode("utf-8"), retain=True)

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
