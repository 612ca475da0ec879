"""Executing one tool call: refusals, the MQTT action, the audit trail, at most once per call.

`ToolRunner` is the part other front ends (a realtime session) call: `offer` checks the tools a
request names, `execute` runs one call of the model and returns the text that goes back to it.
Every call is journaled under the request's key and the call id before anything is published,
so a redelivered request (a restart mid-loop) gets the recorded result instead of switching a
device twice; a call caught between its intent and its result is reported, never repeated.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from bridge.errors import (
    DangerousToolRefused,
    InvalidToolArguments,
    ToolError,
    ToolNotAllowed,
    ToolRateLimited,
    ToolTimeout,
    ToolTopicRefused,
    UnknownTool,
)
from bridge.jsoncodec import loads
from bridge.messages import PublishFailed, StreamPublisher
from bridge.redact import Redactor
from bridge.tools.config import Tool
from bridge.tools.schema import argument_problems
from bridge.tools.template import fill_payload, fill_text, placeholders

if TYPE_CHECKING:
    from structlog.typing import FilteringBoundLogger

    from bridge.pipeline.model import JournalLike

PENDING = b'{"pending":true}'
"""The journal's record of a call about to act: found on a replay, the call is not repeated."""


class TopicReader(Protocol):
    """What read and request tools need from the broker besides publishing."""

    async def retained(self, topic: str, seconds: float) -> bytes | None:
        """The retained message of `topic`, None when there is none within `seconds`."""

    async def next_after(
        self, topic: str, seconds: float, action: Callable[[], asyncio.Future[None]]
    ) -> bytes | None:
        """Subscribe to `topic`, run `action`, return the next live message or None."""


@dataclass(frozen=True, slots=True)
class CallContext:
    """The request a tool call belongs to."""

    key: bytes | None
    """The request's journal key (None: no journal, no replay protection)."""
    caller: str
    """The request topic's suffix (`[access] tools` globs match it)."""
    tools: dict[str, Tool]
    """The tools this request offered the model."""
    allow_dangerous: frozenset[str] = frozenset()
    dry_run: bool = False
    progress: Callable[[dict[str, Any]], None] | None = None
    """Receives each call and result (the stream topic)."""
    replay: bool = False
    """A redelivery (DUP) of the request: its journaled steps and calls are replayed. A fresh
    request with the same bytes (the same question tomorrow) acts anew and records over them."""


@dataclass(slots=True)
class ToolRunner:
    """Runs the model's tool calls over a publisher and a topic reader."""

    tools: dict[str, Tool]
    publisher: StreamPublisher
    reader: TopicReader | None
    log: FilteringBoundLogger
    journal: JournalLike | None = None
    audit_topic: str | None = None
    redactor: Redactor = field(default_factory=lambda: Redactor([]))
    max_output_bytes: int = 4096
    clock: Callable[[], float] = time.monotonic
    _calls: dict[str, deque[float]] = field(default_factory=dict)

    def offer(self, names: tuple[str, ...], caller: str) -> dict[str, Tool]:
        """The tools a request names, checked; raise UnknownTool or ToolNotAllowed."""
        offered = {}
        for name in names:
            tool = self.tools.get(name)
            if tool is None:
                known = ", ".join(sorted(self.tools)) or "none configured"
                raise UnknownTool(f"no tool named {name[:64]!r} (known: {known})")
            if not tool.allows_caller(caller):
                raise ToolNotAllowed(
                    f"tool {name!r} is not allowed for {caller or '(no suffix)'!r}"
                )
            offered[name] = tool
        return offered

    async def execute(self, ctx: CallContext, call_id: str, name: str, arguments: str) -> str:
        """Run one call; the returned JSON text (a result or an error) goes back to the model."""
        key = call_key(ctx.key, call_id)
        if key is not None and self.journal is not None and ctx.replay:
            entry = await self.journal.lookup(key)
            if entry is not None and entry.answer is not None:
                if entry.answer == PENDING:
                    return error_output(
                        "tool_outcome_unknown",
                        "this call was started before a restart and is not repeated",
                    )
                self._progress(ctx, {"type": "tool_result", "call_id": call_id, "replayed": True})
                return entry.answer.decode()
        self._progress(
            ctx, {"type": "tool_call", "call_id": call_id, "name": name, "arguments": arguments}
        )
        record: dict[str, Any] = {"call_id": call_id, "tool": name, "caller": ctx.caller}
        try:
            tool, args = self._check(ctx, name, arguments)
            record["arguments"] = args
            output = await self._act(ctx, tool, args, key, record)
        except ToolError as exc:
            record["refused"] = exc.code
            output = error_output(exc.code, exc.message)
        output = self.redactor.text(output)
        if len(output.encode()) > self.max_output_bytes:
            output = output.encode()[: self.max_output_bytes].decode(errors="ignore")
        if key is not None and self.journal is not None:
            await self.journal.record_answer(key, f"tool:{name[:64]}", output.encode())
        record["output"] = output
        self._progress(ctx, {"type": "tool_result", "call_id": call_id, "output": output})
        self._audit(record)
        return output

    def _check(self, ctx: CallContext, name: str, arguments: str) -> tuple[Tool, dict[str, Any]]:
        tool = ctx.tools.get(name)
        if tool is None:
            raise UnknownTool(f"tool {name[:64]!r} was not offered to this request")
        if tool.config.dangerous and name not in ctx.allow_dangerous:
            raise DangerousToolRefused(
                f"tool {name!r} is marked dangerous: the request must name it in "
                "_bridge.allow_dangerous"
            )
        try:
            args = loads(arguments.encode()) if arguments.strip() else {}
        except ValueError:
            raise InvalidToolArguments("arguments are not JSON") from None
        properties = tool.config.parameters.get("properties", {})
        if isinstance(args, dict):
            for level in placeholders(f"{tool.config.topic}/{tool.config.reply_topic}"):
                value = args.get(level)
                allowed = properties[level]["enum"]
                if value is not None and value not in allowed:
                    raise ToolTopicRefused(
                        f"{level} must be one of {allowed}: a tool reaches only the topics "
                        "its config lists"
                    )
        problems = argument_problems(tool.config.parameters, args)
        if problems:
            raise InvalidToolArguments("; ".join(problems[:5]))
        self._take_rate(tool)
        return tool, args

    def _take_rate(self, tool: Tool) -> None:
        limit = tool.config.rate_limit
        if limit <= 0:
            return
        now = self.clock()
        calls = self._calls.setdefault(tool.name, deque())
        while calls and calls[0] <= now - tool.config.rate_window:
            calls.popleft()
        if len(calls) >= limit:
            raise ToolRateLimited(
                f"tool {tool.name!r} allows {limit} calls per {tool.config.rate_window:g} s"
            )
        calls.append(now)

    async def _act(
        self,
        ctx: CallContext,
        tool: Tool,
        args: dict[str, Any],
        key: bytes | None,
        record: dict[str, Any],
    ) -> str:
        config = tool.config
        topic = fill_text(config.topic, args)
        if topic not in tool.topics:  # the templates were checked; this is the last guard
            raise ToolTopicRefused(f"topic {topic!r} is not one of the tool's topics")
        record["topic"] = topic
        if config.kind == "read":
            if ctx.dry_run:
                record["dry_run"] = True
            return await self._read(tool, topic)
        payload = fill_payload(config.payload, args)
        record["payload"] = payload.decode(errors="replace")
        if ctx.dry_run:
            record["dry_run"] = True
            return json.dumps(
                {"ok": True, "dry_run": True, "topic": topic, "payload": record["payload"]}
            )
        if key is not None and self.journal is not None:
            await self.journal.record_answer(key, f"tool:{tool.name}", PENDING)

        def publish() -> asyncio.Future[None]:
            return self.publisher.publish(topic, payload, qos=config.qos, retain=config.retain)

        if config.kind == "publish":
            try:
                await publish()
            except PublishFailed as exc:
                return error_output("tool_publish_failed", str(exc))
            return json.dumps({"ok": True, "published": {"topic": topic}})
        reply_topic = fill_text(config.reply_topic, args)
        if self.reader is None:
            raise ToolTimeout("no topic reader on this bridge")
        message = await self.reader.next_after(reply_topic, config.timeout, publish)
        if message is None:
            raise ToolTimeout(f"no message on {reply_topic!r} within {config.timeout:g} s")
        return json.dumps({"ok": True, "reply": self._shown(tool, message)})

    async def _read(self, tool: Tool, topic: str) -> str:
        if self.reader is None:
            raise ToolTimeout("no topic reader on this bridge")
        message = await self.reader.retained(topic, tool.config.timeout)
        if message is None:
            raise ToolTimeout(f"no retained message on {topic!r} within {tool.config.timeout:g} s")
        return json.dumps({"ok": True, "value": self._shown(tool, message)})

    @staticmethod
    def _shown(tool: Tool, message: bytes) -> Any:
        """The message as the model sees it: JSON (selected when the tool says so) or text."""
        try:
            value: Any = loads(message)
        except ValueError:
            return message.decode(errors="replace")
        if tool.config.select:
            from bridge.pipeline.options import compile_select

            value = compile_select(tool.config.select).search(value)
        return value

    def _progress(self, ctx: CallContext, event: dict[str, Any]) -> None:
        if ctx.progress is not None:
            ctx.progress(event)

    def _audit(self, record: dict[str, Any]) -> None:
        self.log.info(
            "tool call",
            tool=record["tool"],
            call_id=record["call_id"][:64],
            topic=record.get("topic"),
            refused=record.get("refused"),
            dry_run=record.get("dry_run"),
        )
        if self.audit_topic is None:
            return
        data = self.redactor.text(json.dumps(record, default=str)).encode()
        try:
            self.publisher.publish(self.audit_topic, data, qos=1)
        except PublishFailed:
            self.log.warning("tool audit not published", tool=record["tool"])


def call_key(request_key: bytes | None, call_id: str) -> bytes | None:
    """The journal key of call `call_id` of a request's (or a realtime session's) loop."""
    if request_key is None:
        return None
    return hashlib.sha256(request_key + b"\0tool\0" + call_id.encode()).digest()[: len(request_key)]


def step_key(request_key: bytes | None, step: int) -> bytes | None:
    """The journal key of the model's answer at `step` of a request's loop."""
    if request_key is None:
        return None
    return hashlib.sha256(request_key + b"\0step\0%d" % step).digest()[: len(request_key)]


def error_output(code: str, message: str) -> str:
    """A refusal or failure as the model gets it: `{"ok": false, "error": {code, message}}`."""
    return json.dumps({"ok": False, "error": {"code": code, "message": message}})
