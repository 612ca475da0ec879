"""Presets a two-line device calls with plain text, and conversations that remember.

Real Mosquitto, the bridge in a thread, the stand-in answering in the spec's shapes; an MQTT
3.1.1 client and a PubSubClient-like 256-byte-buffer client ask on `<prefix>/ask/<preset>/...`.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from paho.mqtt.client import MQTTv311
from support.bridge_runner import BridgeThread, make_config
from support.broker import MosquittoBroker
from support.house import House
from support.mqtt_client import TestClient
from support.small_device import PubSubClientLike
from support.standin import RecordedRequest, Reply, Standin
from test_journal_pg import pg_url, postgres  # noqa: F401  (a private PostgreSQL database)
from test_tools_loop import chat_answer, chat_call, tools_toml


def presets_toml(prefix: str) -> str:
    return """
[presets.house]
method = "createChatCompletion"
request = { model = "gpt-test", messages = [{ role = "system", content = "You run the house." }] }
tools = ["kitchen_light"]
max_bytes = 120

[presets.chat]
method = "createChatCompletion"
request = { model = "gpt-test" }
conversation = true
max_turns = 10

[presets.assistant]
method = "createResponse"
request = { model = "gpt-test", instructions = "Be brief.", store = true }
conversation = true
""" + tools_toml(f"{prefix}/house")


@pytest.fixture
def house(mosquitto: MosquittoBroker, topic_prefix: str) -> Iterator[House]:
    with House(mosquitto, f"{topic_prefix}/house") as fake_house:
        yield fake_house


def preset_config(
    tmp_path: Path, broker: MosquittoBroker, standin: Standin, prefix: str
) -> tuple[Path, dict[str, str]]:
    path, env = make_config(tmp_path, broker_port=broker.port, api_base=standin.url, prefix=prefix)
    path.write_text(path.read_text(encoding="utf-8") + presets_toml(prefix), encoding="utf-8")
    return path, env


@pytest.fixture
def preset_bridge(
    tmp_path: Path, mosquitto: MosquittoBroker, standin: Standin, topic_prefix: str
) -> Iterator[BridgeThread]:
    path, env = preset_config(tmp_path, mosquitto, standin, topic_prefix)
    with BridgeThread.from_file(path, env) as running:
        yield running


def ask(client: TestClient, preset: str, suffix: str, text: str) -> str:
    prefix = client.prefix
    answer_topic = f"{prefix}/answer/{preset}/{suffix}"
    if not client.subscribed(answer_topic):
        client.subscribe(answer_topic)
    mark = client.mark()
    client.publish(f"{prefix}/ask/{preset}/{suffix}", text.encode())
    return client.wait_for(answer_topic, 1, 20, after=mark)[0].text()


def echo_history(record: RecordedRequest) -> Reply:
    """A chat model answering with the user turns it was sent, in order."""
    users = [m["content"] for m in record.json()["messages"] if m["role"] == "user"]
    return Reply(json=chat_answer({"role": "assistant", "content": " | ".join(users)}))


def script_light_off(standin: Standin, final: str) -> None:
    """The model switches the kitchen light off, then answers `final`."""
    standin.script(
        "POST",
        "/chat/completions",
        Reply(json=chat_call(("c1", "kitchen_light", {"state": "OFF"}))),
        Reply(json=chat_answer({"role": "assistant", "content": final})),
    )


def test_a_311_client_turns_off_the_light_with_plain_text(
    preset_bridge: BridgeThread,
    house: House,
    mosquitto: MosquittoBroker,
    standin: Standin,
    topic_prefix: str,
) -> None:
    script_light_off(standin, "The kitchen light is off.")
    with TestClient.for_broker(mosquitto, prefix=topic_prefix, protocol=MQTTv311) as device:
        assert ask(device, "house", "kitchen", "turn off the light") == "The kitchen light is off."
    assert house.payloads(f"{house.z2m('kitchen_light')}/set") == [b'{"state":"OFF"}']
    first = standin.requests[0].json()
    assert first["messages"] == [
        {"role": "system", "content": "You run the house."},
        {"role": "user", "content": "turn off the light"},
    ]


def test_a_256_byte_pubsubclient_asks_in_two_lines(
    preset_bridge: BridgeThread,
    house: House,
    mosquitto: MosquittoBroker,
    standin: Standin,
    topic_prefix: str,
) -> None:
    script_light_off(standin, "Off. " + "x" * 500)
    device = PubSubClientLike("127.0.0.1", mosquitto.port, "pubsub-preset")
    answer_topic = f"{topic_prefix}/answer/house/kitchen"
    try:
        assert device.subscribe(answer_topic)
        assert device.publish(f"{topic_prefix}/ask/house/kitchen", b"turn off the light")
        received = device.wait_for(lambda got: len(got) >= 1)
    finally:
        device.close()
    topic, payload = received[0]
    assert topic == answer_topic and payload.startswith(b"Off. xxx") and payload.endswith(b"...")
    assert len(payload) <= 120 and device.dropped == []
    assert house.payloads(f"{house.z2m('kitchen_light')}/set") == [b'{"state":"OFF"}']


def test_unknown_preset_and_empty_question_are_plain_errors(
    preset_bridge: BridgeThread, client: TestClient, standin: Standin
) -> None:
    assert ask(client, "nope", "x", "hi").startswith("ERROR unknown_preset: ")
    assert ask(client, "chat", "x", "  ").startswith("ERROR invalid_parameter: ")
    assert standin.requests == []


def test_a_chat_conversation_remembers_across_turns_and_a_restart_and_forgets_on_reset(
    tmp_path: Path,
    mosquitto: MosquittoBroker,
    standin: Standin,
    topic_prefix: str,
    client: TestClient,
) -> None:
    standin.script("POST", "/chat/completions", echo_history)
    path, env = preset_config(tmp_path, mosquitto, standin, topic_prefix)
    with BridgeThread.from_file(path, env):
        assert ask(client, "chat", "desk", "one") == "one"
        assert ask(client, "chat", "desk", "two") == "one | two"
        assert ask(client, "chat", "desk", "three") == "one | two | three"
        # Another caller has its own conversation.
        assert ask(client, "chat", "sofa", "hello") == "hello"
    with BridgeThread.from_file(path, env):
        assert ask(client, "chat", "desk", "three") == "one | two | three | three"
        assert ask(client, "chat", "desk", "/reset") == "conversation reset"
        assert ask(client, "chat", "desk", "again") == "again"
    sent = standin.requests[1].json()["messages"]
    assert sent == [
        {"role": "user", "content": "one"},
        {"role": "assistant", "content": "one"},
        {"role": "user", "content": "two"},
    ]


def test_a_responses_conversation_chains_previous_response_id(
    preset_bridge: BridgeThread, client: TestClient, standin: Standin
) -> None:
    def answer(record: RecordedRequest) -> Reply:
        text = f"answer {record.index}"
        message = {
            "type": "message",
            "id": f"msg_{record.index}",
            "role": "assistant",
            "status": "completed",
            "content": [{"type": "output_text", "text": text, "annotations": []}],
        }
        return Reply(
            json={
                "id": f"resp_{record.index}",
                "object": "response",
                "status": "completed",
                "output": [message],
            }
        )

    standin.script("POST", "/responses", answer)
    assert ask(client, "assistant", "car", "first") == "answer 1"
    assert ask(client, "assistant", "car", "second") == "answer 2"
    assert ask(client, "assistant", "car", "third") == "answer 3"
    bodies: list[dict[str, Any]] = [r.json() for r in standin.requests]
    assert "previous_response_id" not in bodies[0]
    assert [b.get("previous_response_id") for b in bodies[1:]] == ["resp_1", "resp_2"]
    assert bodies[2]["input"] == "third" and bodies[2]["instructions"] == "Be brief."
    assert json.loads(json.dumps(bodies[0]))["store"] is True


def test_a_conversation_is_shared_by_a_share_group_on_postgresql(
    tmp_path: Path,
    mosquitto: MosquittoBroker,
    standin: Standin,
    topic_prefix: str,
    client: TestClient,
    request: pytest.FixtureRequest,
) -> None:
    url = request.getfixturevalue("pg_url")
    standin.script("POST", "/chat/completions", echo_history)
    members = []
    for name in ("alpha", "beta"):
        folder = tmp_path / name
        folder.mkdir()
        path, env = make_config(
            folder,
            broker_port=mosquitto.port,
            api_base=standin.url,
            prefix=topic_prefix,
            mqtt={"shared_group": "house", "instance": name, "client_id": f"omb-{name}"},
            extra={"journal": {"url": url}},
        )
        path.write_text(path.read_text(encoding="utf-8") + presets_toml(topic_prefix))
        members.append(BridgeThread.from_file(path, env).start())
    try:
        answers = [ask(client, "chat", "desk", q) for q in ("one", "two", "three", "four")]
    finally:
        for member in members:
            member.stop()
    assert answers == ["one", "one | two", "one | two | three", "one | two | three | four"]
    # Mosquitto hands a $share group's messages round: both bridges answered turns.
    ask_topic = f"{topic_prefix}/ask/chat/desk"
    assert all(ask_topic in member.log_text() for member in members)
