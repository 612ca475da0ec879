"""docs/tools.md's recipes, run as the page shows them.

Every block marked `<!-- recipe: ... -->` is loaded from the page itself: the TOML blocks become
the bridge's config (on the real "openai" prefix, a Mosquitto of its own), the shell, C++ and
Tasmota blocks give the topics and payloads the devices send, byte for byte. The devices are fakes
that keep zigbee2mqtt's, Tasmota's and Home Assistant's topic and payload conventions
(tests/support/firmware.py); the model is the stand-in answering with chat `tool_calls` as the
spec shapes them. Home Assistant's own side of the light is run in a real Home Assistant by
tools/ha_real/run.py.
"""

from __future__ import annotations

import itertools
import json
import re
import shlex
import tomllib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import yaml
from support.bridge_runner import TEST_API_KEY, BridgeThread, make_config
from support.broker import MosquittoBroker, MosquittoNotInstalled
from support.doc_blocks import DOCS, marked_block, markers
from support.firmware import HaMqttDevice, TasmotaPlug, Zigbee2mqttDevice
from support.mqtt_client import MQTTv311, TestClient
from support.small_device import PubSubClientLike, packet_size, tasmota_fire, tasmota_rules
from support.standin import RecordedRequest, Reply, Standin

PAGE = "tools.md"
CONFIG_BLOCKS = ["zigbee2mqtt", "tasmota", "ha-light", "ha-lock", "preset"]
OTHER_BLOCKS = ["ha-light-yaml", "request", "preset-shell", "pubsubclient", "tasmota-rule"]
TASMOTA_BUFFER = 1200  # Tasmota's PubSubClient: MQTT_MAX_PACKET_SIZE 1200 (since 8.1.0.8)
TASMOTA_RULE_EVENT = 256  # the most of a message a Tasmota rule sees
PUBSUBCLIENT_BUFFER = 256  # PubSubClient's default MQTT_MAX_PACKET_SIZE


def block(name: str) -> str:
    return marked_block(PAGE, name)


def recipe_config() -> str:
    """The bridge config the page's TOML recipes make together."""
    return "\n".join(block(name) for name in CONFIG_BLOCKS)


# --- the model ------------------------------------------------------------------------------------


def chat(message: dict[str, Any], finish: str) -> Reply:
    choice = {"index": 0, "message": message, "finish_reason": finish, "logprobs": None}
    body = {
        "id": "chatcmpl-recipe",
        "object": "chat.completion",
        "created": 1764512345,
        "model": "gpt-4o-mini-2024-07-18",
        "choices": [choice],
    }
    return Reply(json=body)


_CALL_IDS = itertools.count(1)


def calls(*wanted: tuple[str, dict[str, Any]]) -> Reply:
    """The model asks for these function calls (in parallel when several)."""
    tool_calls = [
        {
            "id": f"call_{next(_CALL_IDS)}",  # unique, as the API's are
            "type": "function",
            "function": {"name": name, "arguments": json.dumps(args)},
        }
        for name, args in wanted
    ]
    message = {"role": "assistant", "content": None, "refusal": None, "tool_calls": tool_calls}
    return chat(message, "tool_calls")


def outputs(record: RecordedRequest) -> list[Any]:
    """The tool outputs the bridge fed back to the model, in order."""
    messages = record.json()["messages"]
    return [json.loads(m["content"]) for m in messages if m.get("role") == "tool"]


def answer(build: Callable[[list[Any]], str]) -> Callable[[RecordedRequest], Reply]:
    """The model's final answer, made by `build` from the tool outputs it was sent."""

    def reply(record: RecordedRequest) -> Reply:
        message = {"role": "assistant", "content": build(outputs(record)), "refusal": None}
        return chat(message, "stop")

    return reply


# --- the house ------------------------------------------------------------------------------------


@dataclass
class Env:
    broker: MosquittoBroker
    standin: Standin
    client: TestClient
    """An MQTT 3.1.1 client, as mosquitto_pub and the devices speak."""


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    """A Mosquitto of its own (the recipes' topics are absolute) and the bridge on the recipes."""
    try:
        broker = MosquittoBroker(tmp_path_factory.mktemp("recipes-mosquitto"))
    except MosquittoNotInstalled as exc:
        pytest.fail(str(exc), pytrace=False)
    broker.start()
    standin = Standin().start()
    path, environ = make_config(
        tmp_path_factory.mktemp("recipes-bridge"),
        broker_port=broker.port,
        api_base=standin.url,
        prefix="openai",
    )
    path.write_text(path.read_text(encoding="utf-8") + "\n" + recipe_config(), encoding="utf-8")
    bridge = BridgeThread.from_file(path, environ).start()
    client = TestClient.for_broker(broker, protocol=MQTTv311).connect()
    try:
        yield Env(broker, standin, client)
    finally:
        client.disconnect()
        bridge.stop()
        standin.stop()
        broker.close()
    assert TEST_API_KEY not in bridge.log_text()


@pytest.fixture
def fresh(env: Env) -> Env:
    env.standin.reset()
    return env


@pytest.fixture
def kitchen_light(env: Env) -> Iterator[Zigbee2mqttDevice]:
    """A zigbee2mqtt light with zigbee2mqtt's default `retain: false`."""
    state = {"brightness": 200, "color_mode": "color_temp", "linkquality": 87, "state": "ON"}
    with Zigbee2mqttDevice(env.broker.host, env.broker.port, "kitchen_light", state) as device:
        yield device


@pytest.fixture
def hall_sensor(env: Env) -> Iterator[Zigbee2mqttDevice]:
    """A zigbee2mqtt sensor with `retain: true`, as the page says a read needs."""
    state = {"battery": 97, "humidity": 40.5, "linkquality": 120, "temperature": 21.5}
    with Zigbee2mqttDevice(
        env.broker.host, env.broker.port, "hall_sensor", state, retain=True
    ) as device:
        yield device


def ask_json(env: Env, suffix: str, text: str, tools: list[str], **bridge: Any) -> str:
    """A chat request with `tools`, answered in plain text; the answer."""
    payload = {
        "model": "gpt-4o-mini",
        "messages": [{"role": "user", "content": text}],
        "_bridge": {
            "tools": tools,
            "select": "choices[0].message.content",
            "format": "plain",
            **bridge,
        },
    }
    reply_topic = f"openai/response/createChatCompletion/{suffix}"
    env.client.subscribe(reply_topic)
    mark = env.client.mark()
    env.client.publish(f"openai/request/createChatCompletion/{suffix}", payload, qos=1)
    return env.client.wait_for(reply_topic, after=mark, timeout=20)[0].text()


# --- the tests ------------------------------------------------------------------------------------


def test_every_recipe_is_marked_and_the_config_blocks_load_together() -> None:
    assert sorted(markers(PAGE)) == sorted(CONFIG_BLOCKS + OTHER_BLOCKS)
    config = tomllib.loads(recipe_config())
    assert sorted(config["tools"]) == [
        "front_door",
        "garage_socket",
        "garage_socket_state",
        "hall_light",
        "kitchen_light",
        "sensor",
    ]
    assert list(config["presets"]) == ["house"]


def test_zigbee2mqtt_light_switched_once_by_the_documented_request(
    fresh: Env, kitchen_light: Zigbee2mqttDevice
) -> None:
    argv = shlex.split(block("request"))
    assert argv[:2] == ["mosquitto_pub", "-t"] and argv[3:6] == ["-q", "1", "-m"]
    topic, payload = argv[2], argv[6]
    reply_topic = topic.replace("/request/", "/response/")
    said = re.search(rf"`{re.escape(reply_topic)}` gets `(.+?)`", (DOCS / PAGE).read_text())
    assert said is not None
    fresh.standin.script(
        "POST",
        "/chat/completions",
        calls(("kitchen_light", {"state": "OFF"})),
        answer(lambda out: f"The kitchen light is now {out[0]['reply'].lower()}."),
    )
    client = fresh.client
    client.subscribe(reply_topic)
    client.subscribe("openai/stream/createChatCompletion/kitchen/panel")
    client.subscribe("openai/bridge/+/audit")
    mark = client.mark()
    client.publish(topic, payload.encode(), qos=1)  # mosquitto_pub speaks MQTT 3.1.1
    [reply] = client.wait_for(reply_topic, after=mark, timeout=20)

    assert reply.text() == said.group(1) == "The kitchen light is now off."
    assert kitchen_light.commands("zigbee2mqtt/kitchen_light/set") == [b'{"state":"OFF"}']
    assert kitchen_light.state["state"] == "OFF"
    assert outputs(fresh.standin.requests[1]) == [{"ok": True, "reply": "OFF"}]
    first = fresh.standin.requests[0].json()
    assert [t["function"]["name"] for t in first["tools"]] == ["kitchen_light", "sensor"]
    events = client.wait_for("openai/stream/createChatCompletion/kitchen/panel", 2, after=mark)
    assert [e.json()["type"] for e in events] == ["tool_call", "tool_result"]
    [audit] = client.wait_for("openai/bridge/+/audit", after=mark)
    assert audit.json()["topic"] == "zigbee2mqtt/kitchen_light/set"
    assert audit.json()["payload"] == '{"state":"OFF"}'


def test_tasmota_plug_switched_once_and_its_retained_power_read(fresh: Env) -> None:
    """`PowerRetain 1`: the plug's retained `OFF` is not taken for the answer to `ON`."""
    with TasmotaPlug(fresh.broker.host, fresh.broker.port, "garage", power_retain=True) as plug:
        fresh.standin.script(
            "POST",
            "/chat/completions",
            calls(("garage_socket", {"state": "ON"})),
            calls(("garage_socket_state", {})),
            answer(lambda out: f"The garage socket is {out[1]['value']}."),
        )
        fresh.client.subscribe("stat/garage/#")
        mark = fresh.client.mark()
        text = ask_json(
            fresh, "garage", "switch on the garage", ["garage_socket", "garage_socket_state"]
        )
        assert text == "The garage socket is ON."
        assert plug.commands("cmnd/garage/POWER") == [b"ON"]
        assert outputs(fresh.standin.requests[2]) == [
            {"ok": True, "reply": "ON"},
            {"ok": True, "value": "ON"},
        ]
        live = fresh.client.wait_for("stat/garage/#", 2, after=mark, where=lambda m: not m.retain)
        assert [(m.topic, m.payload) for m in live] == [
            ("stat/garage/RESULT", b'{"POWER":"ON"}'),
            ("stat/garage/POWER", b"ON"),
        ]


def test_home_assistant_light_gets_home_assistants_own_payload(fresh: Env) -> None:
    """The tool sends what Home Assistant's `mqtt` light (default schema) sends for on/off;
    the device's report on the state topic is what the entity shows."""
    [light] = yaml.safe_load(block("ha-light-yaml"))["mqtt"]["light"]
    tool = tomllib.loads(block("ha-light"))["tools"]["hall_light"]
    assert tool["topic"] == light["command_topic"]
    assert tool["reply_topic"] == light["state_topic"]
    # No payload_on/payload_off/state_on/state_off: Home Assistant's defaults, ON and OFF.
    assert not {"payload_on", "payload_off", "state_on", "state_off", "schema"} & set(light)
    assert tool["parameters"]["properties"]["state"]["enum"] == ["ON", "OFF"]
    with HaMqttDevice(
        fresh.broker.host,
        fresh.broker.port,
        light["command_topic"],
        light["state_topic"],
        {b"ON": b"ON", b"OFF": b"OFF"},
        b"OFF",
    ) as device:
        fresh.standin.script(
            "POST",
            "/chat/completions",
            calls(("hall_light", {"state": "ON"})),
            answer(lambda out: f"The hall light is {out[0]['reply']}."),
        )
        text = ask_json(fresh, "hall/panel", "light the hall", ["hall_light"])
        assert text == "The hall light is ON."
        assert device.commands(light["command_topic"]) == [b"ON"]
        assert device.state == b"ON"


def test_home_assistant_lock_only_from_the_hall_and_only_with_the_allowance(fresh: Env) -> None:
    with HaMqttDevice(
        fresh.broker.host,
        fresh.broker.port,
        "home/front_door/set",
        "home/front_door/state",
        {b"LOCK": b"LOCKED", b"UNLOCK": b"UNLOCKED"},
        b"LOCKED",
    ) as lock:
        kitchen = ask_json(fresh, "kitchen/panel", "open the door", ["front_door"])
        assert kitchen.startswith("ERROR tool_not_allowed: ")
        assert fresh.standin.requests == []
        fresh.standin.script(
            "POST",
            "/chat/completions",
            calls(("front_door", {"action": "UNLOCK"})),
            answer(lambda out: json.dumps(out[0])),
            calls(("front_door", {"action": "UNLOCK"})),
            answer(lambda out: f"The door is {out[0]['reply']}."),
        )
        refused = json.loads(ask_json(fresh, "hall/panel", "open the door", ["front_door"]))
        assert refused["error"]["code"] == "dangerous_tool"
        assert lock.commands("home/front_door/set") == []
        allowed = ask_json(
            fresh, "hall/panel", "open the door", ["front_door"], allow_dangerous=["front_door"]
        )
        assert allowed == "The door is UNLOCKED."
        assert lock.commands("home/front_door/set") == [b"UNLOCK"]


def preset_messages() -> list[dict[str, str]]:
    request: dict[str, Any] = tomllib.loads(block("preset"))["presets"]["house"]["request"]
    messages: list[dict[str, str]] = request["messages"]
    return messages


def test_preset_from_the_shell_lines_switches_each_time_it_is_asked(
    fresh: Env, kitchen_light: Zigbee2mqttDevice
) -> None:
    """The same question twice (a QoS 0 preset question carries no transaction) is two turns of
    the loop: the light is switched twice, never answered from an earlier run's journal."""
    pub, sub = [shlex.split(line, comments=False) for line in block("preset-shell").splitlines()]
    assert pub[:2] == ["mosquitto_pub", "-t"] and pub[3] == "-m" and len(pub) == 5
    assert sub[:2] == ["mosquitto_sub", "-t"] and sub[3] == "#"
    said = " ".join(sub[4:])
    light_off: list[Reply | Callable[[RecordedRequest], Reply]] = [
        calls(("kitchen_light", {"state": "OFF"})),
        answer(lambda out: f"The kitchen light is {out[0]['reply'].lower()}."),
    ]
    fresh.standin.script("POST", "/chat/completions", *light_off, *light_off)
    fresh.client.subscribe(sub[2], qos=0)
    for n in (1, 2):
        mark = fresh.client.mark()
        fresh.client.publish(pub[2], pub[4].encode(), qos=0)  # mosquitto_pub's default QoS
        [reply] = fresh.client.wait_for(sub[2], after=mark, timeout=20)
        assert reply.text() == said == "The kitchen light is off."
        assert kitchen_light.commands("zigbee2mqtt/kitchen_light/set") == [b'{"state":"OFF"}'] * n
    assert len(fresh.standin.requests) == 4
    sent = fresh.standin.requests[0].json()
    assert sent["messages"] == [*preset_messages(), {"role": "user", "content": pub[4]}]


def test_pubsubclient_two_lines_get_an_answer_that_fits_its_buffer(
    fresh: Env, kitchen_light: Zigbee2mqttDevice
) -> None:
    code = block("pubsubclient")
    [answer_topic] = re.findall(r'client\.subscribe\("([^"]+)"\);', code)
    [(ask_topic, question)] = re.findall(r'client\.publish\("([^"]+)", "([^"]+)"\);', code)
    max_bytes = tomllib.loads(block("preset"))["presets"]["house"]["max_bytes"]
    # The page's rule: at QoS 1 the answer packet is 7 bytes besides its topic and payload.
    assert packet_size(answer_topic, max_bytes, 1) == 7 + len(answer_topic) + max_bytes == 154
    long_answer = "The kitchen light is now off. " + "It was on for three hours before. " * 8
    assert packet_size(answer_topic, len(long_answer.encode()), 0) > PUBSUBCLIENT_BUFFER
    fresh.standin.script(
        "POST",
        "/chat/completions",
        calls(("kitchen_light", {"state": "OFF"})),
        answer(lambda out: long_answer),
    )
    device = PubSubClientLike(fresh.broker.host, fresh.broker.port, "kitchen-esp32")
    try:
        assert device.subscribe(answer_topic)  # PubSubClient's subscribe(topic): QoS 0
        assert device.publish(ask_topic, question.encode())
        [(topic, payload)] = device.wait_for(lambda got: len(got) >= 1, timeout=20)
    finally:
        device.close()
    assert topic == answer_topic and device.dropped == []
    assert payload == long_answer.encode()[: max_bytes - 3] + b"..."
    assert packet_size(answer_topic, len(payload), 0) <= PUBSUBCLIENT_BUFFER
    assert kitchen_light.commands("zigbee2mqtt/kitchen_light/set") == [b'{"state":"OFF"}']
    sent = fresh.standin.requests[0].json()
    assert sent["messages"][-1] == {"role": "user", "content": question}


def test_tasmota_rule_asks_and_shows_the_answer(fresh: Env, hall_sensor: Zigbee2mqttDevice) -> None:
    rules = tasmota_rules(block("tasmota-rule"))
    [subscribe] = tasmota_fire(rules, "mqtt#connected", "")
    event, topic = re.fullmatch(r"Subscribe (\w+), (\S+)", subscribe).groups()  # type: ignore[union-attr]
    [publish] = tasmota_fire(rules, "Button1#State", "2")
    command, ask_topic, question = publish.split(" ", 2)
    assert command == "Publish" and ask_topic == "openai/ask/house/hall"
    fresh.standin.script(
        "POST",
        "/chat/completions",
        calls(("sensor", {"device": "hall_sensor"})),
        answer(lambda out: f"It is {out[0]['value']['temperature']} °C in the hall."),
    )
    # Tasmota's MQTT client is a PubSubClient with a 1200-byte buffer, publishing at QoS 0.
    device = PubSubClientLike(
        fresh.broker.host, fresh.broker.port, "tasmota-hall", buffer_size=TASMOTA_BUFFER
    )
    try:
        assert device.subscribe(topic + "/#")  # Tasmota's Subscribe adds /#
        assert device.publish(ask_topic, question.encode())
        [(got_topic, payload)] = device.wait_for(lambda got: len(got) >= 1, timeout=20)
    finally:
        device.close()
    assert got_topic == topic == "openai/answer/house/hall"
    assert len(payload) <= TASMOTA_RULE_EVENT and device.dropped == []
    shown = tasmota_fire(rules, f"Event#{event}", payload.decode())
    assert shown == ["DisplayText It is 21.5 °C in the hall."]
    assert outputs(fresh.standin.requests[1]) == [{"ok": True, "value": hall_sensor.state}]
    sent = fresh.standin.requests[0].json()
    assert sent["messages"] == [*preset_messages(), {"role": "user", "content": question}]
