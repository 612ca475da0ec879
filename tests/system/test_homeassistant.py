"""Home Assistant discovery and stats: the payload builders, then the real bridge on Mosquitto."""

from __future__ import annotations

import json
import re
from typing import Any

import pytest
from jinja2 import StrictUndefined
from jinja2.sandbox import ImmutableSandboxedEnvironment
from pydantic import SecretStr
from support.bridge_runner import TEST_API_KEY, BridgeThread
from support.bridges import StartBridge
from support.broker import MosquittoBroker
from support.mqtt_client import TestClient
from support.standin import Reply, Standin

from bridge import __version__
from bridge.config import BridgeConfig, load_config
from bridge.ha import discovery as homeassistant
from bridge.ha.status import OFFLINE, ONLINE
from bridge.pipeline.stats import Stats
from bridge.topics import Topics

# What Home Assistant's discovery accepts (homeassistant/components/mqtt: discovery.py,
# schemas.py, abbreviations.py, and the sensor / binary_sensor platform schemas).
DISCOVERY_TOPIC = re.compile(
    r"(?P<component>\w+)/(?:(?P<node_id>[a-zA-Z0-9_-]+)/)?(?P<object_id>[a-zA-Z0-9_-]+)/config"
)
DEVICE_KEYS = {"ids", "name", "mf", "mdl", "sw", "hw", "sn", "sa", "cu", "cns", "via_device"}
ORIGIN_KEYS = {"name", "sw", "url"}
ENTITY_KEYS = {
    "p",
    "name",
    "unique_id",
    "state_topic",
    "value_template",
    "availability",
    "device_class",
    "entity_category",
    "icon",
    "json_attributes_topic",
    "json_attributes_template",
}
PLATFORM_KEYS = {
    "sensor": ENTITY_KEYS | {"state_class", "unit_of_measurement"},
    "binary_sensor": ENTITY_KEYS | {"payload_on", "payload_off"},
}
AVAILABILITY_KEYS = {"topic", "value_template", "payload_available", "payload_not_available"}
STATE_CLASSES = {"measurement", "total", "total_increasing"}


def config_for(instance: str = "pi", prefix: str = "openai", **ha: Any) -> BridgeConfig:
    """A config with an API key and an MQTT password set, as a deployment would have."""
    env = {
        "OMB_MQTT__INSTANCE": instance,
        "OMB_MQTT__TOPIC_PREFIX": prefix,
        "OPENAI_API_KEY": TEST_API_KEY,
        "MQTT_PASSWORD": "mqtt-pass-SECRET",
    }
    env.update({f"OMB_HOMEASSISTANT__{k.upper()}": str(v) for k, v in ha.items()})
    return load_config(None, environ=env)


def topics_of(config: BridgeConfig) -> Topics:
    """The bridge's topics for `config`."""
    return Topics(config.mqtt.topic_prefix, config.mqtt.instance_name)


def document(config: BridgeConfig) -> tuple[str, dict[str, Any]]:
    """The discovery message, its payload parsed."""
    topic, payload = homeassistant.discovery_message(config, topics_of(config), __version__)
    return topic, json.loads(payload)


def check_device_discovery(topic: str, doc: dict[str, Any], discovery_prefix: str) -> None:
    """Fail unless `doc` on `topic` passes Home Assistant's device discovery checks."""
    assert topic.startswith(f"{discovery_prefix}/")
    match = DISCOVERY_TOPIC.fullmatch(topic.removeprefix(f"{discovery_prefix}/"))
    assert match and match["component"] == "device" and match["node_id"] is None
    assert set(doc) == {"dev", "o", "cmps"}
    assert set(doc["dev"]) <= DEVICE_KEYS
    assert doc["dev"]["ids"] and all(isinstance(i, str) for i in doc["dev"]["ids"])
    assert set(doc["o"]) <= ORIGIN_KEYS and doc["o"]["name"]
    unique_ids = []
    for component_id, component in doc["cmps"].items():
        assert re.fullmatch(r"[a-zA-Z0-9_-]+", component_id)
        platform = component["p"]
        assert set(component) <= PLATFORM_KEYS[platform], component_id
        unique_ids.append(component["unique_id"])
        assert "+" not in component["state_topic"] and "#" not in component["state_topic"]
        assert component.get("state_class", "measurement") in STATE_CLASSES
        assert component.get("entity_category", "diagnostic") == "diagnostic"
        for availability in component.get("availability", []):
            assert set(availability) <= AVAILABILITY_KEYS and availability["topic"]
    assert len(set(unique_ids)) == len(unique_ids)


# ------------------------------------------------------------------------------ pure builders


def test_discovery_message_passes_home_assistants_checks() -> None:
    config = config_for()
    topic, doc = document(config)
    check_device_discovery(topic, doc, "homeassistant")
    node = doc["dev"]["ids"][0]
    assert topic == f"homeassistant/device/{node}/config"
    assert doc["dev"]["sw"] == doc["o"]["sw"] == __version__
    assert set(doc["cmps"]) == {
        "connection",
        "requests",
        "errors",
        "in_flight",
        "latency",
        "last_error",
    }
    assert {c["unique_id"] for c in doc["cmps"].values()} == {
        f"{node}_{key}" for key in doc["cmps"]
    }


def test_topics_and_availability() -> None:
    config = config_for()
    _, doc = document(config)
    topics = topics_of(config)
    connection = doc["cmps"].pop("connection")
    assert connection["p"] == "binary_sensor" and connection["device_class"] == "connectivity"
    assert connection["state_topic"] == topics.state
    assert connection["json_attributes_topic"] == topics.info
    assert "availability" not in connection  # offline must read "disconnected", not unknown
    for component in doc["cmps"].values():
        assert component["p"] == "sensor"
        assert component["state_topic"] == topics.stats
        [availability] = component["availability"]
        assert availability["topic"] == topics.state
    assert doc["cmps"]["latency"]["unit_of_measurement"] == "ms"
    assert doc["cmps"]["last_error"]["json_attributes_topic"] == topics.stats


def test_unique_ids_are_stable_and_distinct_per_instance() -> None:
    _, first = document(config_for())
    _, again = document(config_for())
    assert first == again
    others = [config_for("kitchen"), config_for(prefix="ollama"), config_for("pi", "openai_pi")]
    ids = {first["dev"]["ids"][0]} | {document(c)[1]["dev"]["ids"][0] for c in others}
    assert len(ids) == 4
    assert document(config_for(prefix="ollama"))[1]["dev"]["name"].endswith("(ollama)")


@pytest.mark.parametrize("instance", ["Küche 1", "pi.local", "a" * 300, "---", "x-y_z"])
def test_any_instance_name_gives_a_valid_object_id(instance: str) -> None:
    config = config_for(instance)
    topic, doc = document(config)
    check_device_discovery(topic, doc, "homeassistant")
    assert doc["dev"]["name"] == f"OpenAI MQTT bridge {instance}"


def test_discovery_prefix_and_status_topic() -> None:
    config = config_for(discovery_prefix="ha-test")
    topic, doc = document(config)
    check_device_discovery(topic, doc, "ha-test")
    assert homeassistant.status_topic(config) == "ha-test/status"


def test_removal_is_an_empty_payload_on_the_same_topic() -> None:
    config = config_for()
    assert homeassistant.removal_message(config) == (homeassistant.discovery_topic(config), b"")
    assert homeassistant.removal_message(config)[0] == document(config)[0]


def test_no_secret_in_discovery() -> None:
    config = config_for()
    assert config.service.api_key == SecretStr(TEST_API_KEY)
    _, payload = homeassistant.discovery_message(config, topics_of(config), __version__)
    for secret in config.secrets():
        assert secret.encode() not in payload


def test_stats_payload() -> None:
    stats = Stats(requests_total=3, errors_total=1, in_flight=2, last_latency_ms=12.5)
    stats.last_error = {"code": "upstream_error", "message": "boom", "retryable": False}
    stats.by_code["upstream_error"] = 1
    doc = json.loads(homeassistant.stats_payload(stats))
    assert doc == {
        "requests_total": 3,
        "errors_total": 1,
        "in_flight": 2,
        "last_latency_ms": 12.5,
        "last_error": {"code": "upstream_error", "message": "boom", "retryable": False},
        "last_error_text": "upstream_error: boom",
        "by_code": {"upstream_error": 1},
    }
    empty = json.loads(homeassistant.stats_payload(Stats()))
    assert empty["last_error"] is None and empty["last_error_text"] is None


def test_stats_payload_redacts_secrets_even_in_the_shortened_text() -> None:
    stats = Stats(errors_total=1)
    message = "x" * 240 + f" key {TEST_API_KEY} rejected"
    stats.last_error = {"code": "auth", "message": message, "upstream": {"error": TEST_API_KEY}}
    payload = homeassistant.stats_payload(stats, [TEST_API_KEY])
    assert TEST_API_KEY.encode() not in payload
    assert TEST_API_KEY[:12].encode() not in payload
    doc = json.loads(payload)
    assert doc["last_error"]["upstream"] == {"error": "**********"}
    assert len(doc["last_error_text"]) == homeassistant.STATE_MAX


def test_error_text_is_one_short_line() -> None:
    assert homeassistant.error_text(None) is None
    assert homeassistant.error_text({"code": "bad", "message": "a\nb  c"}) == "bad: a b c"
    text = homeassistant.error_text({"code": "c", "message": "m" * 1000})
    assert text is not None and len(text) == 255 and text.endswith("…")


def mqtt_value(template: str, payload: bytes) -> str:
    """An MQTT entity template on a payload, as Home Assistant renders it: sandboxed Jinja,
    `value` and `value_json`, its `to_json` filter, the text result not parsed."""
    env = ImmutableSandboxedEnvironment(undefined=StrictUndefined)
    env.filters["to_json"] = lambda value: json.dumps(value, separators=(",", ":"))
    text = payload.decode()
    return env.from_string(template).render(value=text, value_json=json.loads(text)).strip()


def test_entity_templates_render_the_stats_and_state_documents() -> None:
    config = config_for()
    _, doc = document(config)
    components = doc["cmps"]
    render = mqtt_value
    stats = Stats(requests_total=5, errors_total=2, in_flight=1, last_latency_ms=812.25)
    stats.last_error = {"code": "rate_limited", "message": "slow down", "retryable": True}
    payload = homeassistant.stats_payload(stats)
    expected = {
        "requests": "5",
        "errors": "2",
        "in_flight": "1",
        "latency": "812.25",
        "last_error": "rate_limited: slow down",
    }
    for key, value in expected.items():
        assert render(components[key]["value_template"], payload) == value, key
    attributes = render(components["last_error"]["json_attributes_template"], payload)
    assert json.loads(attributes) == stats.last_error

    # Nothing yet: "None" is what makes Home Assistant show unknown; attributes cleared.
    fresh = homeassistant.stats_payload(Stats())
    assert render(components["latency"]["value_template"], fresh) == "None"
    assert render(components["last_error"]["value_template"], fresh) == "None"
    assert render(components["last_error"]["json_attributes_template"], fresh) == "{}"

    connection = components["connection"]
    assert render(connection["value_template"], ONLINE) == connection["payload_on"]
    assert render(connection["value_template"], OFFLINE) == connection["payload_off"]
    [availability] = components["requests"]["availability"]
    assert render(availability["value_template"], ONLINE) == availability["payload_available"]
    assert render(availability["value_template"], OFFLINE) == availability["payload_not_available"]


# --------------------------------------------------------------------- the running bridge


@pytest.fixture
def start_bridge(start_bridge: StartBridge) -> StartBridge:
    """Like conftest's, but keyword arguments are `[homeassistant]` options."""

    def start(**homeassistant_options: Any) -> BridgeThread:
        return start_bridge(extra={"homeassistant": homeassistant_options})

    return start


@pytest.fixture
def discovery_prefix(topic_prefix: str) -> str:
    """A discovery prefix of this test alone (the session broker is shared)."""
    return f"{topic_prefix}-ha"


def discovery_of(bridge: BridgeThread) -> tuple[str, bytes]:
    """The discovery message this bridge should publish."""
    config = bridge.config
    return homeassistant.discovery_message(config, topics_of(config), __version__)


def assert_nothing_retained(broker: MosquittoBroker, topic: str) -> None:
    """A new subscriber gets no retained message on `topic` (checked against a marker)."""
    with TestClient.for_broker(broker) as fresh:
        fresh.subscribe(topic)
        marker = f"{topic}-marker"
        fresh.subscribe(marker)
        fresh.publish(marker, "m")
        fresh.wait_for_one(marker)
        assert fresh.messages(topic) == []


def after_everything_before(ha: TestClient) -> None:
    """Return once the bridge has handled, and answered, every message `ha` published so far."""
    # The bridge handles inbound messages in order and publishes in order: once the reply to a
    # request sent now is in, so is every discovery message it published before.
    assert ha.request("listModels", {})["status"] == "ok"


def test_discovery_is_retained_and_republished_when_home_assistant_starts(
    start_bridge: StartBridge,
    mosquitto: MosquittoBroker,
    discovery_prefix: str,
    topic_prefix: str,
) -> None:
    bridge = start_bridge(discovery=True, discovery_prefix=discovery_prefix)
    topic, payload = discovery_of(bridge)
    with TestClient.for_broker(mosquitto, prefix=topic_prefix) as ha:
        ha.subscribe(f"{discovery_prefix}/device/+/config")
        first = ha.wait_for_one(f"{discovery_prefix}/device/+/config")
        assert (first.topic, first.payload, first.retain) == (topic, payload, True)
        check_device_discovery(topic, json.loads(first.payload), discovery_prefix)

        mark = ha.mark()
        ha.publish(f"{discovery_prefix}/status", "offline")  # HA's last will: ignored
        ha.publish(f"{discovery_prefix}/status", "online")
        after_everything_before(ha)
        [again] = ha.messages(topic, after=mark)
        assert (again.payload, again.retain) == (payload, False)
    log = bridge.log_text()
    assert log.count("home assistant is online") == 1
    assert "outside the request topics" not in log


def test_a_retained_birth_message_does_not_double_the_discovery(
    start_bridge: StartBridge,
    mosquitto: MosquittoBroker,
    discovery_prefix: str,
    topic_prefix: str,
) -> None:
    status = f"{discovery_prefix}/status"
    with TestClient.for_broker(mosquitto, prefix=topic_prefix) as ha:
        ha.publish(status, "online", retain=True)
        ha.subscribe(f"{discovery_prefix}/device/+/config")
        bridge = start_bridge(discovery=True, discovery_prefix=discovery_prefix)
        topic, _ = discovery_of(bridge)
        ha.publish(status, "online")
        after_everything_before(ha)
        assert len(ha.messages(topic)) == 2  # on connect, and for the live "online"
        ha.publish(status, b"", retain=True)


def test_stats_topic_counts_requests_and_errors(
    start_bridge: StartBridge, client: TestClient, standin: Standin, topic_prefix: str
) -> None:
    start_bridge(stats_interval=0.2)
    stats_topic = f"{topic_prefix}/bridge/test/stats"
    client.subscribe(stats_topic)
    standin.set_default(Reply(json={"object": "list", "data": []}))
    assert client.request("listModels", {})["status"] == "ok"
    assert client.request("noSuchMethod", {})["status"] == "error"
    standin.set_default(Reply.error(401, f"Incorrect API key provided: {TEST_API_KEY}"))
    assert client.request("listModels", {})["status"] == "error"

    def counted(message: Any) -> bool:
        return bool(json.loads(message.payload)["requests_total"] == 3)

    message = client.wait_for_one(stats_topic, where=counted)
    assert TEST_API_KEY.encode() not in message.payload
    doc = json.loads(message.payload)
    assert doc["errors_total"] == 2 and doc["in_flight"] == 0
    assert set(doc["by_code"]) == {"unknown_method", doc["last_error"]["code"]}
    assert doc["last_error"]["http_status"] == 401
    assert "**********" in doc["last_error"]["message"]
    assert doc["last_error_text"].startswith(doc["last_error"]["code"] + ": ")
    assert isinstance(doc["last_latency_ms"], float | int) and doc["last_latency_ms"] >= 0


def test_fresh_stats_are_retained_on_connect_not_after_the_first_interval(
    start_bridge: StartBridge, mosquitto: MosquittoBroker, topic_prefix: str
) -> None:
    stats_topic = f"{topic_prefix}/bridge/test/stats"
    # An hour's interval: the only stats message this test can see is the one sent on connect.
    start_bridge(stats_interval=3600.0)
    # A Home Assistant that starts later (a new subscriber) gets it at once: it is retained.
    with TestClient.for_broker(mosquitto) as later:
        later.subscribe(stats_topic)
        message = later.wait_for_one(stats_topic)
    doc = json.loads(message.payload)
    assert (doc["requests_total"], doc["errors_total"], doc["in_flight"]) == (0, 0, 0)
    assert message.retain


def test_discovery_off_removes_the_device(
    start_bridge: StartBridge, mosquitto: MosquittoBroker, discovery_prefix: str
) -> None:
    first = start_bridge(discovery=True, discovery_prefix=discovery_prefix)
    topic, payload = discovery_of(first)
    first.stop()
    with TestClient.for_broker(mosquitto) as ha:
        ha.subscribe(topic)
        assert ha.wait_for_one(topic).payload == payload  # still retained from the first run
        mark = ha.mark()
        start_bridge(discovery=False, discovery_prefix=discovery_prefix)
        removal = ha.wait_for_one(topic, after=mark)
        assert removal.payload == b""
    assert_nothing_retained(mosquitto, topic)
