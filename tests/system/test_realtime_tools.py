"""Tools in realtime sessions: a real Mosquitto, the bridge, the realtime stand-in, the house.

The stand-in's model calls a function (in the spec's events: `response.function_call_arguments
.done`, `response.output_item.done`, `response.done` with the item) and, once it got the
`function_call_output` items and a `response.create`, answers with a transcript quoting them.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from support.bridge_runner import BridgeThread, make_config
from support.broker import MosquittoBroker
from support.house import House
from support.mqtt_client import TestClient
from support.realtime_standin import Connection, RealtimeStandin
from test_realtime_sessions import Device
from test_tools_loop import tools_toml

from bridge.tools.runner import call_key

OFF = json.dumps({"ok": True, "reply": "OFF"})
"""What the kitchen_light tool returns once the house switched the light off."""


@pytest.fixture
def upstream() -> Iterator[RealtimeStandin]:
    with RealtimeStandin() as server:
        yield server


@pytest.fixture
def house(mosquitto: MosquittoBroker, topic_prefix: str) -> Iterator[House]:
    with House(mosquitto, f"{topic_prefix}/house") as fake_house:
        yield fake_house


@pytest.fixture
def tool_bridge(
    tmp_path: Path, mosquitto: MosquittoBroker, upstream: RealtimeStandin, topic_prefix: str
) -> Iterator[BridgeThread]:
    path, env = make_config(
        tmp_path,
        broker_port=mosquitto.port,
        api_base=upstream.url,
        prefix=topic_prefix,
        extra={"tool_loop": {"max_steps": 3}},
    )
    path.write_text(path.read_text(encoding="utf-8") + tools_toml(f"{topic_prefix}/house"))
    with BridgeThread.from_file(path, env) as running:
        yield running


def types(conn: Connection) -> list[str]:
    return [str(e["type"]) for e in conn.events]


def outputs(conn: Connection) -> list[dict[str, Any]]:
    """The `function_call_output` items the bridge sent upstream, in order."""
    return [
        e["item"]
        for e in conn.events
        if e["type"] == "conversation.item.create" and e["item"]["type"] == "function_call_output"
    ]


def answered(device: Device, n: int) -> None:
    """Wait until `n` responses are done (their `done` outputs reached the device)."""
    device.client.wait_for(f"{device.out}/done", n, 20)


def test_a_function_call_turns_off_the_kitchen_light_once_and_the_model_answers(
    tool_bridge: BridgeThread,
    house: House,
    client: TestClient,
    topic_prefix: str,
    upstream: RealtimeStandin,
) -> None:
    upstream.function_call = ("kitchen_light", '{"state":"OFF"}')
    client.subscribe(f"{topic_prefix}/bridge/+/audit")
    device = Device(client, topic_prefix, "kitchen")
    declared = [
        # The device's own function is kept; its "kitchen_light" never reaches upstream.
        {"type": "function", "name": "beep", "parameters": {"type": "object"}},
        {"type": "function", "name": "kitchen_light", "description": "mine", "parameters": {}},
    ]
    device.open(session={"type": "realtime", "tools": declared}, tools=["kitchen_light"])
    device.state("open")
    device.event({"type": "response.create"})
    answered(device, 2)

    set_topic = f"{house.z2m('kitchen_light')}/set"
    assert house.payloads(set_topic) == [b'{"state":"OFF"}']
    conn = upstream.connections[0]
    assert conn.invalid == [] and conn.sent_invalid == []
    session = conn.events[0]["session"]
    assert [t["name"] for t in session["tools"]] == ["beep", "kitchen_light"]
    light = session["tools"][1]
    assert light["description"] == "Switch the kitchen light on or off; answers its new state"
    assert light["parameters"]["properties"]["state"]["enum"] == ["ON", "OFF"]
    # Named by three events (arguments done, item done, response done), run once; then the
    # output, then one response.create.
    assert types(conn) == [
        "session.update",
        "response.create",
        "conversation.item.create",
        "response.create",
    ]
    assert outputs(conn) == [{"type": "function_call_output", "call_id": "call_1", "output": OFF}]
    text = "".join(m.text() for m in device.received("text"))
    assert text.endswith(f"call_1 said {OFF}")

    progress = [m.json() for m in device.received("event") if m.json()["type"].startswith("tool_")]
    assert progress == [
        {
            "type": "tool_call",
            "call_id": "call_1",
            "name": "kitchen_light",
            "arguments": '{"state":"OFF"}',
        },
        {"type": "tool_result", "call_id": "call_1", "output": OFF},
    ]
    audit = client.wait_for(f"{topic_prefix}/bridge/+/audit", 1)[0].json()
    assert audit["call_id"] == "call_1" and audit["caller"] == "kitchen"
    assert audit["topic"] == set_topic and audit["payload"] == '{"state":"OFF"}'
    assert audit["output"] == OFF

    # The result is journaled under the session and the call id, like a request's.
    bridge = tool_bridge.bridge
    assert bridge.realtime is not None and bridge.tool_runner is not None
    tools = bridge.realtime.sessions[("realtime", "kitchen")].tools
    assert tools is not None
    journal = bridge.tool_runner.journal
    assert journal is not None
    entry = tool_bridge.wait(journal.lookup(call_key(tools.context.key, "call_1") or b""))
    assert entry is not None and entry.answer == OFF.encode()
    assert entry.reply_topic == "tool:kitchen_light"
    device.close()
    device.state("closed")


def test_a_device_function_is_left_to_the_device_and_its_tools_are_merged(
    tool_bridge: BridgeThread,
    house: House,
    client: TestClient,
    topic_prefix: str,
    upstream: RealtimeStandin,
) -> None:
    device = Device(client, topic_prefix, "desk")
    device.open(tools=["kitchen_light"])
    device.state("open")
    # Later `tools` of the device are merged too: no function named like a configured tool
    # (offered or not) gets through, and the offered ones stay.
    beep = {"type": "function", "name": "beep", "parameters": {"type": "object"}}
    fake = {"type": "function", "name": "front_door", "parameters": {"type": "object"}}
    device.event({"type": "session.update", "session": {"type": "realtime", "tools": [fake, beep]}})
    # The stand-in's model calls "lights_on", a function of the device's own, not a tool.
    device.event({"type": "response.create", "response": {"tools": [beep, fake]}})
    answered(device, 1)
    # Whatever the bridge would have sent after response.done is queued before this event.
    device.event({"type": "input_audio_buffer.clear"})
    upstream.wait_for(lambda conns: types(conns[0])[-1:] == ["input_audio_buffer.clear"])
    conn = upstream.connections[0]
    assert types(conn) == [
        "session.update",
        "session.update",
        "response.create",
        "input_audio_buffer.clear",
    ]
    assert [t["name"] for t in conn.events[0]["session"]["tools"]] == ["kitchen_light"]
    assert [t["name"] for t in conn.events[1]["session"]["tools"]] == ["beep", "kitchen_light"]
    assert [t["name"] for t in conn.events[2]["response"]["tools"]] == ["beep", "kitchen_light"]
    assert conn.invalid == [] and conn.sent_invalid == []
    assert house.received == {}


def test_refusals_at_open_and_per_call(
    tool_bridge: BridgeThread,
    house: House,
    client: TestClient,
    topic_prefix: str,
    upstream: RealtimeStandin,
) -> None:
    # Refused at open, as a request naming them is: no upstream socket.
    kitchen = Device(client, topic_prefix, "kitchen")
    kitchen.open(tools=["hall_only"])
    assert "hall_only" in kitchen.error("tool_not_allowed")["message"]
    kitchen.open(tools=["no_such_tool"])
    kitchen.error("unknown_tool")
    captions = Device(client, topic_prefix, "captions", kind="realtimeTranscription")
    captions.open(tools=["kitchen_light"])
    captions.error("bad_open")
    kitchen.open(allow_dangerous=["front_door"])
    assert "allow_dangerous" in kitchen.error("bad_open")["message"]
    assert upstream.connections == [] and kitchen.received("state") == []

    # A dangerous tool without the allowance: the model gets `dangerous_tool` and answers.
    upstream.function_call = ("front_door", '{"state":"UNLOCK"}')
    kitchen.open(tools=["front_door", "kitchen_light"])
    kitchen.state("open")
    kitchen.event({"type": "response.create"})
    answered(kitchen, 2)
    conn = upstream.connections[0]
    [output] = outputs(conn)
    assert json.loads(output["output"])["error"]["code"] == "dangerous_tool"
    assert types(conn)[-2:] == ["conversation.item.create", "response.create"]
    assert house.payloads(f"{house.z2m('silent_lock')}/set") == []
    results = [m.json() for m in kitchen.received("event") if m.json()["type"] == "tool_result"]
    assert '"dangerous_tool"' in results[0]["output"]
    kitchen.close()
    kitchen.state("closed")

    # A configured tool the open did not name: `unknown_tool` to the model, nothing published.
    upstream.function_call = ("garage", '{"state":"ON"}')
    hall = Device(client, topic_prefix, "hall")
    hall.open(tools=["kitchen_light"])
    hall.state("open")
    hall.event({"type": "response.create"})
    answered(hall, 2)
    [output] = outputs(upstream.connections[1])
    assert json.loads(output["output"])["error"]["code"] == "unknown_tool"
    assert house.payloads(f"{house.root}/tasmota/cmnd/garage/POWER") == []
    assert all(not c.invalid and not c.sent_invalid for c in upstream.connections)


def test_a_model_that_keeps_calling_stops_at_max_steps_in_a_dry_run(
    tool_bridge: BridgeThread,
    house: House,
    client: TestClient,
    topic_prefix: str,
    upstream: RealtimeStandin,
) -> None:
    upstream.behaviour = "calls"
    upstream.function_call = ("kitchen_light", '{"state":"OFF"}')
    device = Device(client, topic_prefix, "loop")
    device.open(tools=["kitchen_light"], dry_run=True)
    device.state("open")
    device.event({"type": "response.create"})
    error = device.error("tool_loop_limit")
    assert "3 responses" in error["message"]
    upstream.wait_for(lambda conns: len(outputs(conns[0])) == 3)
    conn = upstream.connections[0]
    # [tool_loop] max_steps = 3: three responses with calls, the device's response.create and
    # two of the bridge's, each call answered once.
    assert types(conn).count("response.create") == 3
    assert [o["call_id"] for o in outputs(conn)] == ["call_1", "call_2", "call_3"]
    for output in outputs(conn):
        result = json.loads(output["output"])
        assert result["dry_run"] is True and result["payload"] == '{"state":"OFF"}'
    assert house.payloads(f"{house.z2m('kitchen_light')}/set") == []
    assert conn.invalid == [] and conn.sent_invalid == []


def test_the_rate_limit_holds_across_a_sessions_calls(
    tool_bridge: BridgeThread,
    house: House,
    client: TestClient,
    topic_prefix: str,
    upstream: RealtimeStandin,
) -> None:
    # garage: rate_limit = 1 per hour; the model calls it in each of three responses.
    upstream.behaviour = "calls"
    upstream.function_call = ("garage", '{"state":"ON"}')
    device = Device(client, topic_prefix, "garage-panel")
    device.open(tools=["garage"])
    device.state("open")
    device.event({"type": "response.create"})
    device.error("tool_loop_limit")
    upstream.wait_for(lambda conns: len(outputs(conns[0])) == 3)
    results = [json.loads(o["output"]) for o in outputs(upstream.connections[0])]
    assert results[0] == {
        "ok": True,
        "published": {"topic": f"{house.root}/tasmota/cmnd/garage/POWER"},
    }
    assert [r["error"]["code"] for r in results[1:]] == ["tool_rate_limited", "tool_rate_limited"]
    assert house.payloads(f"{house.root}/tasmota/cmnd/garage/POWER") == [b"ON"]
