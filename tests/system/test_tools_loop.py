"""The model acts on the house: tools over real Mosquitto, a scripted model in the spec's shapes.

The stand-in answers as the vendored spec says: chat `tool_calls` (parallel), Responses
`function_call` items, then a final answer built from the tool outputs it was sent back. The
"house" (tests/support/house.py) acts on its set topics and publishes retained state.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from support.bridge_runner import BridgeProcess, BridgeThread, make_config
from support.broker import MosquittoBroker
from support.house import House
from support.mqtt_client import TestClient
from support.standin import RecordedRequest, Reply, Standin


def tools_toml(root: str) -> str:
    """Tools on zigbee2mqtt-, Tasmota- and Home Assistant-style topics under `root`."""
    z2m = f"{root}/zigbee2mqtt"
    return f'''
[tools.kitchen_light]
description = "Switch the kitchen light on or off; answers its new state"
kind = "request"
topic = "{z2m}/kitchen_light/set"
reply_topic = "{z2m}/kitchen_light"
payload = {{ state = "${{state}}" }}
select = "state"
parameters.type = "object"
parameters.required = ["state"]
parameters.properties.state = {{ type = "string", enum = ["ON", "OFF"] }}

[tools.sensor]
description = "Read a sensor's last state"
kind = "read"
topic = "{z2m}/${{device}}"
parameters.type = "object"
parameters.required = ["device"]
parameters.properties.device = {{ type = "string", enum = ["hall_sensor", "kitchen_light"] }}

[tools.garage]
description = "Switch the garage socket (Tasmota)"
kind = "publish"
topic = "{root}/tasmota/cmnd/garage/POWER"
payload = "${{state}}"
rate_limit = 1
rate_window = 3600
parameters.type = "object"
parameters.required = ["state"]
parameters.properties.state = {{ type = "string", enum = ["ON", "OFF"] }}

[tools.front_door]
description = "Lock or unlock the front door"
kind = "request"
dangerous = true
topic = "{z2m}/silent_lock/set"
reply_topic = "{z2m}/silent_lock"
timeout = 0.5
payload = {{ state = "${{state}}" }}
parameters.type = "object"
parameters.required = ["state"]
parameters.properties.state = {{ type = "string", enum = ["LOCK", "UNLOCK"] }}

[tools.dim]
description = "Dim the kitchen light"
kind = "publish"
topic = "{z2m}/kitchen_light/set"
payload = {{ brightness = "${{level}}" }}
parameters.type = "object"
parameters.required = ["level"]
parameters.properties.level = {{ type = "integer", minimum = 0, maximum = 254 }}

[tools.hall_only]
description = "Only the hall panel may use this"
kind = "read"
topic = "{z2m}/hall_sensor"

[access.tools]
hall_only = ["hall/*"]
'''


@pytest.fixture
def house(mosquitto: MosquittoBroker, topic_prefix: str) -> Iterator[House]:
    with House(mosquitto, f"{topic_prefix}/house") as fake_house:
        yield fake_house


def config_with_tools(
    tmp_path: Path, broker: MosquittoBroker, standin: Standin, prefix: str, **loop: Any
) -> tuple[Path, dict[str, str]]:
    path, env = make_config(
        tmp_path,
        broker_port=broker.port,
        api_base=standin.url,
        prefix=prefix,
        mqtt={"session_expiry": 600},
        extra={"tool_loop": {"max_steps": 4, **loop}},
    )
    text = path.read_text(encoding="utf-8").replace("[access]", "[access_unused]")
    path.write_text(text + tools_toml(f"{prefix}/house"), encoding="utf-8")
    return path, env


@pytest.fixture
def tool_bridge(
    tmp_path: Path, mosquitto: MosquittoBroker, standin: Standin, topic_prefix: str
) -> Iterator[BridgeThread]:
    path, env = config_with_tools(tmp_path, mosquitto, standin, topic_prefix)
    with BridgeThread.from_file(path, env) as running:
        yield running


def chat_call(*calls: tuple[str, str, dict[str, Any]]) -> dict[str, Any]:
    """A chat completion whose message asks for `calls` (id, name, arguments), in parallel."""
    tool_calls = [
        {"id": cid, "type": "function", "function": {"name": name, "arguments": json.dumps(args)}}
        for cid, name, args in calls
    ]
    message = {"role": "assistant", "content": None, "refusal": None, "tool_calls": tool_calls}
    return chat_answer(message, "tool_calls")


def chat_answer(message: dict[str, Any], finish: str = "stop") -> dict[str, Any]:
    choice = {"index": 0, "message": message, "finish_reason": finish, "logprobs": None}
    return {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "created": 1,
        "model": "gpt-test",
        "choices": [choice],
    }


def tool_outputs(record: RecordedRequest) -> dict[str, Any]:
    """The outputs the bridge fed back in a chat request, by tool_call_id."""
    return {
        m["tool_call_id"]: json.loads(m["content"])
        for m in record.json()["messages"]
        if m.get("role") == "tool"
    }


def final_from_outputs(record: RecordedRequest) -> Reply:
    """The model's final answer: it repeats what the tools returned."""
    outputs = tool_outputs(record)
    text = "Done: " + json.dumps(outputs, sort_keys=True)
    return Reply(json=chat_answer({"role": "assistant", "content": text, "refusal": None}))


def ask(
    client: TestClient, text: str, tools: list[str], suffix: str = "kitchen/panel", **bridge: Any
) -> Any:
    payload = {
        "model": "gpt-test",
        "messages": [{"role": "user", "content": text}],
        "_bridge": {"tools": tools, **bridge},
    }
    return client.request("createChatCompletion", payload, suffix=suffix, timeout=20)


def test_turn_off_the_kitchen_light_once_with_state_and_audit(
    tool_bridge: BridgeThread, house: House, client: TestClient, standin: Standin, topic_prefix: str
) -> None:
    standin.script(
        "POST",
        "/chat/completions",
        Reply(json=chat_call(("call_1", "kitchen_light", {"state": "OFF"}))),
        final_from_outputs,
    )
    client.subscribe(f"{topic_prefix}/stream/#")
    client.subscribe(f"{topic_prefix}/bridge/+/audit")
    reply = ask(client, "turn off the kitchen light", ["kitchen_light"])

    set_topic = f"{house.z2m('kitchen_light')}/set"
    assert house.payloads(set_topic) == [b'{"state":"OFF"}']
    content = reply["data"]["choices"][0]["message"]["content"]
    assert content == 'Done: {"call_1": {"ok": true, "reply": "OFF"}}'
    first = standin.requests[0].json()
    assert first["tools"][0]["function"]["name"] == "kitchen_light"
    assert "_bridge" not in first
    events = [m.json() for m in client.wait_for(f"{topic_prefix}/stream/#", 2)]
    assert [e["type"] for e in events] == ["tool_call", "tool_result"]
    audit = client.wait_for(f"{topic_prefix}/bridge/+/audit", 1)[0].json()
    assert audit["tool"] == "kitchen_light" and audit["payload"] == '{"state":"OFF"}'
    assert audit["topic"] == set_topic and audit["call_id"] == "call_1"


def test_responses_parallel_calls_read_retained_and_plain_reply(
    tool_bridge: BridgeThread, house: House, client: TestClient, standin: Standin
) -> None:
    calls = [
        {
            "type": "function_call",
            "id": "fc_1",
            "call_id": "c1",
            "name": "sensor",
            "arguments": '{"device": "hall_sensor"}',
            "status": "completed",
        },
        {
            "type": "function_call",
            "id": "fc_2",
            "call_id": "c2",
            "name": "garage",
            "arguments": '{"state": "ON"}',
            "status": "completed",
        },
    ]

    def final(record: RecordedRequest) -> Reply:
        items = record.json()["input"]
        outputs = {
            i["call_id"]: json.loads(i["output"])
            for i in items
            if i.get("type") == "function_call_output"
        }
        temp = outputs["c1"]["value"]["temperature"]
        text = f"It is {temp} degrees; the garage is {'on' if outputs['c2']['ok'] else 'off'}."
        message = {
            "type": "message",
            "id": "msg_1",
            "role": "assistant",
            "status": "completed",
            "content": [{"type": "output_text", "text": text, "annotations": []}],
        }
        return Reply(
            json={
                "id": "resp_2",
                "object": "response",
                "status": "completed",
                "output": [message],
                "output_text": text,
            }
        )

    standin.script(
        "POST",
        "/responses",
        Reply(json={"id": "resp_1", "object": "response", "status": "completed", "output": calls}),
        final,
    )
    payload = {
        "model": "gpt-test",
        "input": "how warm is the hall? and switch on the garage",
        "_bridge": {"tools": ["sensor", "garage"], "select": "output_text", "format": "plain"},
    }
    reply = client.request_raw("createResponse", payload, suffix="kitchen/panel", timeout=20)
    assert reply.text() == "It is 21.5 degrees; the garage is on."
    assert house.payloads(f"{house.root}/tasmota/cmnd/garage/POWER") == [b"ON"]
    second = standin.requests[1].json()
    assert second["input"][0] == {
        "role": "user",
        "content": "how warm is the hall? and switch on the garage",
    }
    assert [i["type"] for i in second["input"][1:]] == [
        "function_call",
        "function_call",
        "function_call_output",
        "function_call_output",
    ]
    assert {t["name"] for t in second["tools"]} == {"sensor", "garage"}


def test_request_tool_times_out_cleanly_and_dangerous_needs_allowance(
    tool_bridge: BridgeThread, house: House, client: TestClient, standin: Standin
) -> None:
    standin.script(
        "POST",
        "/chat/completions",
        Reply(json=chat_call(("c1", "front_door", {"state": "UNLOCK"}))),
        final_from_outputs,
        Reply(json=chat_call(("c2", "front_door", {"state": "UNLOCK"}))),
        final_from_outputs,
    )
    lock_set = f"{house.z2m('silent_lock')}/set"
    refused = ask(client, "open the door", ["front_door"])
    content = refused["data"]["choices"][0]["message"]["content"]
    assert '"code": "dangerous_tool"' in content
    assert house.payloads(lock_set) == []
    allowed = ask(client, "open the door", ["front_door"], allow_dangerous=["front_door"])
    content = allowed["data"]["choices"][0]["message"]["content"]
    assert '"code": "tool_timeout"' in content
    assert house.payloads(lock_set) == [b'{"state":"UNLOCK"}']


def test_each_call_refusal_has_its_code(
    tool_bridge: BridgeThread, house: House, client: TestClient, standin: Standin
) -> None:
    standin.script(
        "POST",
        "/chat/completions",
        Reply(
            json=chat_call(
                ("a", "sensor", {"device": "#"}),
                ("b", "dim", {"level": 999}),
                ("c", "lights_everywhere", {}),
                ("d", "garage", {"state": "OFF"}),
                ("e", "garage", {"state": "ON"}),
            )
        ),
        final_from_outputs,
    )
    reply = ask(client, "do it all", ["sensor", "dim", "garage"])
    outputs = tool_outputs(standin.requests[1])
    codes = {cid: out.get("error", {}).get("code") for cid, out in outputs.items()}
    assert codes["a"] == "tool_topic_refused"
    assert codes["b"] == "bad_tool_arguments"
    assert codes["c"] == "unknown_tool"
    # Two garage calls against a limit of one per hour: exactly one went out.
    assert sorted([codes["d"], codes["e"]], key=str) == [None, "tool_rate_limited"]
    assert len(house.payloads(f"{house.root}/tasmota/cmnd/garage/POWER")) == 1
    assert house.payloads(f"{house.z2m('kitchen_light')}/set") == []
    assert reply["data"]["choices"][0]["message"]["content"].startswith("Done:")


def test_request_refusals_and_step_limit(
    tool_bridge: BridgeThread, house: House, client: TestClient, standin: Standin
) -> None:
    unknown = ask(client, "x", ["no_such_tool"])
    assert unknown["error"]["code"] == "unknown_tool"
    not_allowed = ask(client, "x", ["hall_only"], suffix="kitchen/panel")
    assert not_allowed["error"]["code"] == "tool_not_allowed"
    assert len(standin.requests) == 0
    standin.script(
        "POST",
        "/chat/completions",
        Reply(json=chat_call(("loop", "sensor", {"device": "hall_sensor"}))),
    )
    looping = ask(client, "read forever", ["sensor"])
    assert looping["error"]["code"] == "tool_loop_limit"
    assert len(standin.requests) == 4


def test_dry_run_publishes_nothing(
    tool_bridge: BridgeThread, house: House, client: TestClient, standin: Standin
) -> None:
    standin.script(
        "POST",
        "/chat/completions",
        Reply(json=chat_call(("c1", "garage", {"state": "OFF"}))),
        final_from_outputs,
    )
    reply = ask(client, "garage off", ["garage"], dry_run=True)
    content = reply["data"]["choices"][0]["message"]["content"]
    assert '"dry_run": true' in content and '"payload": "OFF"' in content
    assert house.payloads(f"{house.root}/tasmota/cmnd/garage/POWER") == []


def test_kill_9_mid_loop_never_repeats_an_executed_call(
    tmp_path: Path,
    mosquitto: MosquittoBroker,
    standin: Standin,
    house: House,
    topic_prefix: str,
    processes: list[BridgeProcess],
) -> None:
    standin.script(
        "POST",
        "/chat/completions",
        Reply(json=chat_call(("c1", "kitchen_light", {"state": "OFF"}))),
        Reply(hang=True),  # the model's second answer never comes: the bridge is killed here
        final_from_outputs,
    )
    path, env = config_with_tools(tmp_path, mosquitto, standin, topic_prefix)
    first = BridgeProcess(path, env, tmp_path / "bridge.log")
    processes.append(first)
    first.start()
    with TestClient.for_broker(mosquitto, prefix=topic_prefix) as device:
        reply_topic = device.topic("response", "createChatCompletion", "kitchen/panel")
        device.subscribe(reply_topic)
        device.publish(
            device.topic("request", "createChatCompletion", "kitchen/panel"),
            {
                "model": "gpt-test",
                "messages": [{"role": "user", "content": "turn off the kitchen light"}],
                "_bridge": {"tools": ["kitchen_light"]},
            },
        )
        standin.wait_for_requests(2, timeout=20)
        set_topic = f"{house.z2m('kitchen_light')}/set"
        assert house.payloads(set_topic) == [b'{"state":"OFF"}']
        first.kill()
        second = BridgeProcess(path, env, tmp_path / "bridge.log")
        processes.append(second)
        second.start()
        reply = device.wait_for(reply_topic, 1, timeout=30)[0].json()
    assert reply["data"]["choices"][0]["message"]["content"] == (
        'Done: {"c1": {"ok": true, "reply": "OFF"}}'
    )
    assert house.payloads(set_topic) == [b'{"state":"OFF"}']
    # The first model answer came from the journal: the model was asked 3 times in all, not 4.
    assert len(standin.requests) == 3


def test_the_same_request_again_switches_again(
    tool_bridge: BridgeThread, house: House, client: TestClient, standin: Standin
) -> None:
    """Only a redelivery replays the journaled steps: the same bytes sent again (no transaction,
    "turn off the light" tomorrow) ask the model and switch the device anew."""
    for n in (1, 2):
        standin.script(
            "POST",
            "/chat/completions",
            Reply(json=chat_call((f"call_{n}", "kitchen_light", {"state": "OFF"}))),
            final_from_outputs,
        )
        reply = ask(client, "turn off the kitchen light", ["kitchen_light"])
        content = reply["data"]["choices"][0]["message"]["content"]
        assert content == f'Done: {{"call_{n}": {{"ok": true, "reply": "OFF"}}}}'
    set_topic = f"{house.z2m('kitchen_light')}/set"
    assert house.payloads(set_topic) == [b'{"state":"OFF"}', b'{"state":"OFF"}']
    assert len(standin.requests) == 4
