"""A device gets its own answer and nothing more: Response Topics against the documented ACL.

The broker is a real Mosquitto with the password file and the ACL of docs/security.md (read from
the document itself); the bridge runs as its `bridge-edge` user on the `edge` prefix, and the
devices `kitchen` and `hall` are confined to their suffixes as the ACL says.
"""

from __future__ import annotations

import json
import re
import subprocess
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from support.bridge_runner import TEST_MQTT_PASSWORD, BridgeThread, make_config
from support.broker import MosquittoBroker, free_port
from support.mqtt_client import TestClient
from support.standin import Reply, Standin

REPO = Path(__file__).resolve().parents[2]
DEVICE_PASSWORD = "device-pass-51c7"
FORGED = {"format": "plain", "select": "choices[0].message.content"}
CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "_bridge": FORGED}


def documented_acl() -> str:
    """The ACL block that docs/security.md tells users to save as /etc/mosquitto/acl."""
    text = (REPO / "docs" / "security.md").read_text(encoding="utf-8")
    after = text.split("Save the ACL as `/etc/mosquitto/acl`", 1)[1]
    match = re.search(r"```\n(.*?)```", after, re.S)
    assert match is not None
    return match.group(1)


@pytest.fixture
def acl_broker(tmp_path: Path) -> Iterator[MosquittoBroker]:
    passwd, acl = tmp_path / "passwd", tmp_path / "acl"
    passwd.touch()
    for user, password in (
        ("bridge", TEST_MQTT_PASSWORD),
        ("bridge-edge", TEST_MQTT_PASSWORD),
        ("kitchen", DEVICE_PASSWORD),
    ):
        subprocess.run(["mosquitto_passwd", "-b", str(passwd), user, password], check=True)
    subprocess.run(["mosquitto_passwd", "-b", str(passwd), "hall", DEVICE_PASSWORD], check=True)
    acl.write_text(documented_acl())
    for path in (passwd, acl):
        path.chmod(0o644)  # read after Mosquitto drops privileges
    broker = MosquittoBroker(
        tmp_path / "mosquitto", extra_config=[f"password_file {passwd}", f"acl_file {acl}"]
    )
    broker.start()
    try:
        yield broker
    finally:
        broker.close()


def device(broker: MosquittoBroker, name: str) -> TestClient:
    client = TestClient(broker.host, broker.port, prefix="edge")
    client.paho.username_pw_set(name, DEVICE_PASSWORD)
    return client


@pytest.fixture
def edge_bridge(
    tmp_path: Path, acl_broker: MosquittoBroker, standin: Standin
) -> Iterator[BridgeThread]:
    path, env = make_config(
        tmp_path,
        broker_port=acl_broker.port,
        api_base=standin.url,
        prefix="edge",
        mqtt={"username": "bridge-edge"},
        access={"allow_methods": ["createChatCompletion"]},
    )
    env["OMB_MQTT__PASSWORD"] = TEST_MQTT_PASSWORD
    standin.set_default(
        Reply(json={"object": "chat.completion", "choices": [{"message": {"content": "OK"}}]})
    )
    with BridgeThread.from_file(path, env) as bridge:
        yield bridge


@pytest.mark.parametrize(
    "response_topic",
    [
        "edge/response/createChatCompletion/hall",  # another device's answer
        "openai/response/createChatCompletion/ha",  # the other bridge's (Home Assistant's)
        "edge/bridge/test/state",  # the bridge's own retained state
        "homeassistant/lock/front_door/config",  # a discovery config (a new lock entity)
        "edge/request/createChatCompletion/kitchen",  # a request topic: one call becomes many
    ],
)
def test_a_device_cannot_have_the_bridge_publish_outside_its_own_reply_topics(
    edge_bridge: BridgeThread, acl_broker: MosquittoBroker, standin: Standin, response_topic: str
) -> None:
    with device(acl_broker, "hall") as hall, device(acl_broker, "kitchen") as kitchen:
        hall.subscribe("edge/response/+/hall/#")
        hall.subscribe("edge/bridge/test/state")
        hall.wait_for_one("edge/bridge/test/state", where=lambda m: m.json()["state"] == "online")
        own = "edge/response/createChatCompletion/kitchen"
        kitchen.subscribe(own)
        kitchen.publish(
            "edge/request/createChatCompletion/kitchen",
            {"transaction": 5, **CHAT},
            response_topic=response_topic,
        )
        # Answered on its own default reply topic, as an error that names the problem.
        reply = kitchen.wait_for_one(own)
        assert reply.text().startswith("ERROR reply_topic_refused: ")
        assert standin.requests == []  # nothing was bought
        # The bridge published nowhere else: hall saw only the bridge's own `online`.
        mark = len(hall.messages())
        kitchen.request_raw("createChatCompletion", {"transaction": 6, **CHAT}, suffix="kitchen")
        assert [m.topic for m in hall.messages(after=mark)] == []
        states: list[Any] = [m.json() for m in hall.messages("edge/bridge/test/state")]
        assert states == [{"state": "online"}]


def test_a_device_may_name_a_reply_topic_below_its_own(
    edge_bridge: BridgeThread, acl_broker: MosquittoBroker
) -> None:
    with device(acl_broker, "kitchen") as kitchen:
        own = "edge/response/createChatCompletion/kitchen/q7"
        reply = kitchen.request_raw(
            "createChatCompletion", CHAT, suffix="kitchen", response_topic=own
        )
        assert (reply.topic, reply.text()) == (own, "OK")


def refused(client: TestClient, topic: str) -> bool:
    """Whether the broker refuses a QoS 1 publish by `client` on `topic` (MQTT 5 PUBACK 135)."""
    try:
        client.publish(topic, b"x")
    except RuntimeError as exc:
        return "Not authorized" in str(exc)
    return False


def test_the_documented_acl_lets_each_bridge_user_write_only_where_its_replies_belong(
    acl_broker: MosquittoBroker,
) -> None:
    edge = TestClient(acl_broker.host, acl_broker.port, prefix="edge")
    edge.paho.username_pw_set("bridge-edge", TEST_MQTT_PASSWORD)
    main = TestClient(acl_broker.host, acl_broker.port, prefix="openai")
    main.paho.username_pw_set("bridge", TEST_MQTT_PASSWORD)
    with edge, main:
        for topic in (
            "openai/response/createChatCompletion/ha",  # the other bridge's answers
            "openai/bridge/ha/state",
            "edge/request/createChatCompletion/kitchen",  # a device's request
            "homeassistant/device/forged/config",
            "$SYS/forged",
        ):
            assert refused(edge, topic), topic
        for topic in ("edge/response/createChatCompletion/kitchen", "edge/bridge/test/state"):
            assert not refused(edge, topic), topic
        for topic in ("edge/response/createChatCompletion/kitchen", "edge/bridge/test/state"):
            assert refused(main, topic), topic
        assert not refused(main, "homeassistant/device/openai_bridge/config")


@contextmanager
def console_bridge(
    tmp_path: Path, broker: MosquittoBroker, standin: Standin, prefix: str, user: str
) -> Iterator[int]:
    """A bridge logged in as `user` on `prefix` with its console on; yields the console's port."""
    port = free_port()
    path, env = make_config(
        tmp_path,
        broker_port=broker.port,
        api_base=standin.url,
        prefix=prefix,
        mqtt={"username": user},
        extra={"console": {"enabled": True, "port": port}},
    )
    env["OMB_MQTT__PASSWORD"] = TEST_MQTT_PASSWORD
    with BridgeThread.from_file(path, env):
        yield port


def try_listmodels(port: int) -> urllib.request.Request:
    """The console's try of listModels, as the page sends it (own Origin, custom header)."""
    origin = f"http://127.0.0.1:{port}"
    return urllib.request.Request(
        origin + "/api/try",
        data=json.dumps({"method": "listModels", "payload": {}}).encode(),
        headers={
            "Host": f"127.0.0.1:{port}",
            "Origin": origin,
            "X-OMB-Console": "1",
            "Content-Type": "application/json",
        },
        method="POST",
    )


def test_the_consoles_try_page_works_under_the_documented_acl(
    tmp_path: Path, acl_broker: MosquittoBroker, standin: Standin
) -> None:
    """The ACL lets the bridge's user publish a try on `console/<n>` and read its answer back."""
    standin.set_default(Reply(json={"object": "list", "data": []}))
    with console_bridge(tmp_path, acl_broker, standin, "openai", "bridge") as port:
        response = urllib.request.urlopen(try_listmodels(port), timeout=30)
        with response:
            tried = json.loads(response.read())
    assert tried["code"] is None and tried["topic"] == "openai/request/listModels/console/1"
    assert json.loads(tried["reply"]["text"])["status"] == "ok"
    assert len(standin.requests) == 1


def test_a_try_the_broker_refuses_is_a_clear_502(
    tmp_path: Path, acl_broker: MosquittoBroker, standin: Standin
) -> None:
    """bridge-edge's ACL has no console lines: the try is refused by the broker, said plainly."""
    with console_bridge(tmp_path, acl_broker, standin, "edge", "bridge-edge") as port:
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(try_listmodels(port), timeout=30)
        body = json.loads(refused.value.read())
    assert refused.value.code == 502
    assert "did not take the try on edge/request/listModels/console/1" in body["error"]
    assert "request/+/console/#" in body["error"]
    assert standin.requests == []
