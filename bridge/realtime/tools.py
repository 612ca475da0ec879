"""The tool loop of a realtime session: the tools its open names, run by the bridge.

The bridge adds the offered tools' function definitions to the upstream session, runs each
function call of the model to one of its configured tools through the request loop's
`ToolRunner` (the same refusals, rate limits, dry run, audit and journal), sends the result as a
`function_call_output` item and, once the response is done and every call of it has its output,
asks for the next response with `response.create` (docs/tools.md#realtime-sessions). Calls to
functions of the device's own are the device's: the bridge leaves them alone.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from bridge.config import ToolLoopConfig
from bridge.errors import BridgeError, ToolLoopLimit
from bridge.tools.loop import response_calls
from bridge.tools.runner import CallContext, ToolRunner, error_output

CALL_EVENTS = frozenset(
    {"response.function_call_arguments.done", "response.output_item.done", "response.done"}
)
"""Server events that carry a finished function call; a call runs on the first that names it."""


@dataclass(slots=True)
class _Response:
    """The calls of one model response."""

    calls: int = 0
    """Bridge calls seen (at most `max_calls_per_step` run)."""
    running: int = 0
    """Bridge calls whose output is not sent yet."""
    device_calls: bool = False
    """The response also called a function of the device's own: the device continues it."""
    done: bool = False
    """`response.done` arrived; `status` is its status."""
    status: str = ""


def session_key(kind: str, session: str) -> bytes:
    """The journal key of one opened session (a fresh one per open: call ids may repeat)."""
    digest = hashlib.blake2b(b"realtime\0", digest_size=16)
    digest.update(f"{kind}\0{session}\0".encode())
    digest.update(os.urandom(16))
    return digest.digest()


class SessionTools:
    """One session's offered tools and the state of their calls."""

    def __init__(
        self,
        runner: ToolRunner,
        context: CallContext,
        limits: ToolLoopConfig,
        *,
        send: Callable[[str], None],
        note: Callable[[dict[str, Any]], None],
        refuse: Callable[[BridgeError], None],
    ) -> None:
        self.runner = runner
        self.context = dataclasses.replace(context, progress=note)
        self.limits = limits
        self._send = send
        self._refuse = refuse
        self.functions = [{"type": "function", **t.function()} for t in context.tools.values()]
        """The offered tools in the shape of the spec's `RealtimeFunctionTool`."""
        self._ours = frozenset(runner.tools)
        """Every configured tool's name: a call to one is the bridge's, offered or not."""
        self._seen: set[str] = set()
        """Call ids already run (or refused): a call named by several events runs once."""
        self._responses: dict[str, _Response] = {}
        self._chain = 0
        """Responses in a row whose calls the bridge answered (bounded by `max_steps`)."""
        self._tasks: set[asyncio.Task[None]] = set()

    # --- from the device ------------------------------------------------------------------------

    def session(self, session: dict[str, Any] | None) -> dict[str, Any]:
        """The session configuration to send upstream first: the device's, with the tools."""
        merged: dict[str, Any] = dict(session) if session is not None else {"type": "realtime"}
        merged["tools"] = self._merge(merged.get("tools"))
        return merged

    def client_event(self, text: str, event: dict[str, Any]) -> str:
        """A device's client event (`text`, parsed: `event`), its `tools` (session.update,
        response.create) merged."""
        field = {"session.update": "session", "response.create": "response"}.get(event["type"])
        body = event.get(field) if field else None
        if not isinstance(body, dict) or "tools" not in body:
            return text
        merged = {**body, "tools": self._merge(body["tools"])}
        return json.dumps({**event, field: merged})

    def _merge(self, device_tools: Any) -> list[Any]:
        """The device's tools without any named like a configured tool, then the offered ones."""
        own = device_tools if isinstance(device_tools, list) else []
        kept = [t for t in own if not (isinstance(t, dict) and t.get("name") in self._ours)]
        return [*kept, *self.functions]

    # --- from the service host ------------------------------------------------------------------

    def server_event(self, event: dict[str, Any]) -> None:
        """Run the calls a server event finishes; continue a response whose calls are answered."""
        kind = event.get("type")
        if kind not in CALL_EVENTS:
            return
        if kind == "response.function_call_arguments.done":
            self._call(
                _text(event.get("response_id")),
                _text(event.get("call_id")),
                _text(event.get("name")),
                _text(event.get("arguments")),
            )
            return
        if kind == "response.output_item.done":
            for call in response_calls({"output": [event.get("item")]}):
                self._call(_text(event.get("response_id")), *call)
            return
        response = event.get("response")
        if not isinstance(response, dict):
            return
        response_id = _text(response.get("id"))
        for call in response_calls(response):
            self._call(response_id, *call)
        state = self._responses.get(response_id)
        if state is None:  # no call of the bridge's: the model answered
            self._chain = 0
            return
        state.done, state.status = True, _text(response.get("status"))
        self._continue(response_id, state)

    def _call(self, response_id: str, call_id: str, name: str, arguments: str) -> None:
        if name not in self._ours:
            self._responses.setdefault(response_id, _Response()).device_calls = True
            return
        if not call_id or call_id in self._seen:
            return
        self._seen.add(call_id)
        state = self._responses.setdefault(response_id, _Response())
        state.calls += 1
        if state.calls > self.limits.max_calls_per_step:
            limit = self.limits.max_calls_per_step
            refused = error_output("tool_loop_limit", f"at most {limit} calls per response")
            self._output(call_id, refused)
            return
        state.running += 1
        task = asyncio.get_running_loop().create_task(
            self._run(response_id, state, call_id, name, arguments)
        )
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run(
        self, response_id: str, state: _Response, call_id: str, name: str, arguments: str
    ) -> None:
        try:
            output = await self.runner.execute(self.context, call_id, name, arguments)
        except Exception:  # a bug: the model still gets an output, the log the cause
            self.runner.log.exception("realtime tool call failed", tool=name)
            output = error_output("internal_error", "the bridge failed to run this call")
        self._output(call_id, output)
        state.running -= 1
        self._continue(response_id, state)

    def _output(self, call_id: str, output: str) -> None:
        item = {"type": "function_call_output", "call_id": call_id, "output": output}
        self._send(json.dumps({"type": "conversation.item.create", "item": item}))

    def _continue(self, response_id: str, state: _Response) -> None:
        """Ask for the next response once the response is done and its calls are answered."""
        if not state.done or state.running:
            return
        self._responses.pop(response_id, None)
        # A response the user interrupted is followed by the one for their words, and one with
        # calls of the device's own by the device's `response.create` after its outputs.
        if state.device_calls or state.status == "cancelled":
            return
        self._chain += 1
        if self._chain >= self.limits.max_steps:
            self._chain = 0
            self._refuse(
                ToolLoopLimit(
                    f"the model still called tools after {self.limits.max_steps} responses "
                    "([tool_loop] max_steps): no response.create was sent"
                )
            )
            return
        self._send('{"type":"response.create"}')

    async def close(self) -> None:
        """Cancel the calls still running (the session ended) and wait for them."""
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError):
                await task


def _text(value: Any) -> str:
    return value if isinstance(value, str) else ""
