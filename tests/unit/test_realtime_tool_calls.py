"""A realtime session's tool loop on server events (in-process, the real ToolRunner)."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from support.fakes import FakeLog, FakePublisher

from bridge.config import BridgeConfig
from bridge.errors import BridgeError
from bridge.realtime.tools import SessionTools
from bridge.tools.config import build_tools
from bridge.tools.runner import CallContext, ToolRunner

LAMP = {
    "description": "Switch the lamp",
    "kind": "publish",
    "topic": "z2m/lamp/set",
    "payload": "${state}",
    "parameters": {
        "type": "object",
        "required": ["state"],
        "properties": {"state": {"type": "string", "enum": ["ON", "OFF"]}},
    },
}


class Upstream:
    """What the session tools send upstream, and a wait for the n-th of it."""

    def __init__(self) -> None:
        self.sent: list[dict[str, Any]] = []
        self.refused: list[BridgeError] = []
        self._changed = asyncio.Event()

    def send(self, text: str) -> None:
        self.sent.append(json.loads(text))
        self._changed.set()

    async def wait(self, n: int) -> None:
        while len(self.sent) < n:
            self._changed.clear()
            await asyncio.wait_for(self._changed.wait(), 5)

    def types(self) -> list[str]:
        return [str(e["type"]) for e in self.sent]


def session_tools(upstream: Upstream, publisher: FakePublisher, **loop: Any) -> SessionTools:
    config = BridgeConfig.model_validate({"tools": {"lamp": LAMP}, "tool_loop": loop})
    tools, problems = build_tools(config)
    assert problems == []
    runner = ToolRunner(tools, publisher, None, FakeLog().bound)
    context = CallContext(key=None, caller="desk", tools=runner.offer(("lamp",), "desk"))
    return SessionTools(
        runner,
        context,
        config.tool_loop,
        send=upstream.send,
        note=lambda event: None,
        refuse=upstream.refused.append,
    )


def call(response_id: str, call_id: str, name: str = "lamp") -> dict[str, Any]:
    return {
        "type": "response.function_call_arguments.done",
        "event_id": "e",
        "response_id": response_id,
        "item_id": f"item_{call_id}",
        "output_index": 0,
        "call_id": call_id,
        "name": name,
        "arguments": '{"state":"OFF"}',
    }


def done(response_id: str, status: str = "completed") -> dict[str, Any]:
    return {
        "type": "response.done",
        "event_id": "d",
        "response": {"id": response_id, "status": status},
    }


async def test_a_done_response_whose_calls_are_answered_is_continued_once() -> None:
    upstream, publisher = Upstream(), FakePublisher()
    tools = session_tools(upstream, publisher)
    tools.server_event(call("r1", "c1"))
    tools.server_event(call("r1", "c1"))  # named again: runs once
    tools.server_event(done("r1"))
    await upstream.wait(2)
    assert upstream.types() == ["conversation.item.create", "response.create"]
    assert [p[:2] for p in publisher.published] == [("z2m/lamp/set", b"OFF")]


async def test_no_response_create_after_a_cancelled_response_or_a_device_call() -> None:
    upstream, publisher = Upstream(), FakePublisher()
    tools = session_tools(upstream, publisher)
    tools.server_event(call("r1", "c1"))
    await upstream.wait(1)
    tools.server_event(done("r1", "cancelled"))  # the user spoke: the server answers that
    tools.server_event(call("r2", "c2"))
    tools.server_event(call("r2", "c3", name="beep"))  # the device's own function
    await upstream.wait(2)
    tools.server_event(done("r2"))
    assert upstream.types() == ["conversation.item.create", "conversation.item.create"]
    assert [e["item"]["call_id"] for e in upstream.sent] == ["c1", "c2"]
    assert upstream.refused == []


async def test_calls_past_max_calls_per_step_are_refused_and_not_run() -> None:
    upstream, publisher = Upstream(), FakePublisher()
    tools = session_tools(upstream, publisher, max_calls_per_step=1)
    tools.server_event(call("r1", "c1"))
    tools.server_event(call("r1", "c2"))
    tools.server_event(done("r1"))
    await upstream.wait(3)
    outputs = {e["item"]["call_id"]: e["item"]["output"] for e in upstream.sent[:2]}
    assert json.loads(outputs["c2"])["error"]["code"] == "tool_loop_limit"
    assert json.loads(outputs["c1"])["ok"] is True
    assert upstream.types()[2] == "response.create"
    assert len(publisher.published) == 1
    await tools.close()
