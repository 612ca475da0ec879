"""docs/small-devices.md, run: every example's topics and payloads, read from the page itself.

A private Mosquitto, the bridge with the real "openai" prefix, and the stand-in. The Arduino
example runs through a client with PubSubClient's 256-byte buffer rules, the MicroPython example
is executed as written (on umqtt.simple's API), the Tasmota rules are interpreted as far as they go
(Subscribe, Publish, `=` and `$<` triggers), and the ESPHome YAML is read with its own tags.
"""

from __future__ import annotations

import ast
import contextlib
import io
import json
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from support.bridge_runner import TEST_API_KEY, BridgeThread, make_config
from support.broker import MosquittoBroker, MosquittoNotInstalled
from support.fakes import random_binary
from support.mqtt_client import MQTTv311, TestClient
from support.small_device import (
    PubSubClientLike,
    micropython_json,
    packet_size,
    real_umqtt_simple,
    tasmota_fire,
    tasmota_rules,
    umqtt_simple_module,
)
from support.standin import Reply, Standin

DOC = (Path(__file__).resolve().parents[2] / "docs" / "small-devices.md").read_text()
BROKER_NAME = "192.168.1.10"


def code_block(language: str, after: str) -> str:
    """The first ```language block after the heading `after`."""
    start = DOC.index(after)
    match = re.compile(rf"```{language}\n(.*?)```", re.S).search(DOC, start)
    assert match is not None, (language, after)
    return match.group(1)


def chat(content: str) -> dict[str, Any]:
    """A chat.completion as api.openai.com shapes it."""
    return {
        "id": "chatcmpl-BfX2kQz0a9sYb3LrT7uV1wE5xNcM4",
        "object": "chat.completion",
        "created": 1764512345,
        "model": "gpt-4o-mini-2024-07-18",
        "choices": [
            {
                "index": 0,
                "message": {
                    "role": "assistant",
                    "content": content,
                    "refusal": None,
                    "annotations": [],
                },
                "logprobs": None,
                "finish_reason": "stop",
            }
        ],
        "usage": {
            "prompt_tokens": 19,
            "completion_tokens": 34,
            "total_tokens": 53,
            "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
            "completion_tokens_details": {
                "reasoning_tokens": 0,
                "audio_tokens": 0,
                "accepted_prediction_tokens": 0,
                "rejected_prediction_tokens": 0,
            },
        },
        "service_tier": "default",
        "system_fingerprint": "fp_560af6e559",
    }


def chat_reply(content: str) -> Reply:
    """The stand-in's answer: the chat completion pretty-printed, as the API sends it."""
    body = json.dumps(chat(content), indent=2, ensure_ascii=False).encode()
    return Reply(body=body, content_type="application/json")


TIP_150 = (
    "Start the day with five slow breaths, keep one task at a time, and step outside for ten "
    "minutes at lunch; small pauses add up to a calm day. Be happy."
)
TIP_LONG = TIP_150 + " " + "Put the phone in another room during meals. " * 4
KITCHEN_100 = (
    "Keep a damp towel under your cutting board so that it never slides while you chop the "
    "onions finely."
)
BASIL_400 = (
    "Water basil when the top 2 cm of soil feel dry, usually every 2 to 3 days indoors and daily "
    "in summer heat outdoors. Water at the base in the morning, never on the leaves, and let the "
    "pot drain fully: basil hates wet feet. A pot with drainage holes and a saucer you empty after "
    "ten minutes keeps the roots healthy. Pinch off flower buds to keep the leaves coming. Harvest "
    "leaves from the top, weekly."
)
assert (len(TIP_150), len(KITCHEN_100), len(BASIL_400)) == (150, 100, 400)


@dataclass
class Env:
    broker: MosquittoBroker
    standin: Standin
    client: TestClient
    """An MQTT 3.1.1 client, for the examples whose libraries speak 3.1.1."""


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    """A Mosquitto of its own: the examples use the real "openai" prefix."""
    try:
        broker = MosquittoBroker(tmp_path_factory.mktemp("small-mosquitto"))
    except MosquittoNotInstalled as exc:
        pytest.fail(str(exc), pytrace=False)
    broker.start()
    standin = Standin().start()
    path, environ = make_config(
        tmp_path_factory.mktemp("small-bridge"),
        broker_port=broker.port,
        api_base=standin.url,
        prefix="openai",
    )
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


# --- Arduino -------------------------------------------------------------------------------------


def c_constants(code: str) -> dict[str, str]:
    """`const char* NAME = "..." "...";` definitions, adjacent literals joined, escapes undone."""
    constants: dict[str, str] = {}
    for name, literals in re.findall(r'const char\* (\w+) =\s*((?:"(?:[^"\\]|\\.)*"\s*)+);', code):
        pieces = re.findall(r'"((?:[^"\\]|\\.)*)"', literals)
        constants[name] = "".join(re.sub(r"\\(.)", r"\1", piece) for piece in pieces)
    return constants


ARDUINO = c_constants(code_block("cpp", "## Arduino"))


def pubsubclient(env: Env, name: str) -> PubSubClientLike:
    return PubSubClientLike(env.broker.host, env.broker.port, name)


def arduino_request(transaction: int) -> bytes:
    """What the sketch's ask() builds: `{"transaction":<n>,` in front of QUESTION."""
    return f'{{"transaction":{transaction},{ARDUINO["QUESTION"]}'.encode()


def test_arduino_example_gets_its_answer_within_256_bytes(fresh: Env) -> None:
    code = code_block("cpp", "## Arduino")
    assert "mqtt.subscribe(ANSWER_TOPIC, 1);" in code
    assert 'snprintf(request, sizeof request, "{\\"transaction\\":%lu,%s"' in code
    assert "mqtt.publish(ASK_TOPIC, request);" in code
    ask, answer = ARDUINO["ASK_TOPIC"], ARDUINO["ANSWER_TOPIC"]
    options = json.loads(arduino_request(1))["_bridge"]
    assert options["max_bytes"] <= 249 - len(answer)  # the page's own rule for QoS 1
    # The largest transaction the sketch makes still fits PubSubClient's 249 bytes.
    assert len(ask) + len(arduino_request(2**32 - 1)) <= 249
    fresh.standin.script("POST", "/chat/completions", chat_reply(TIP_LONG), chat_reply(TIP_150))
    device = pubsubclient(fresh, "desk-esp32")
    try:
        assert device.subscribe(answer, 1)
        assert device.publish(ask, arduino_request(2**32 - 1))  # fits PubSubClient's check
        [(topic, payload)] = device.wait_for(lambda got: len(got) >= 1)
        assert topic == answer
        assert payload == TIP_LONG.encode()[: options["max_bytes"] - 3] + b"..."
        assert device.dropped == []
        assert packet_size(answer, len(payload), 1) <= 256
        # The next question (a new transaction): a short answer arrives whole.
        assert device.publish(ask, arduino_request(7))
        got = device.wait_for(lambda got: len(got) >= 2)
        assert got[1] == (answer, TIP_150.encode())
    finally:
        device.close()
    [seen, _] = fresh.standin.requests
    assert "_bridge" not in seen.json()


def test_arduino_resends_are_answered_without_asking_again(fresh: Env) -> None:
    """The sketch resends an unanswered question with the same transaction: one upstream call,
    every resend answered (the one whose answer was lost included)."""
    ask, answer = ARDUINO["ASK_TOPIC"], ARDUINO["ANSWER_TOPIC"]
    fresh.standin.script("POST", "/chat/completions", chat_reply(TIP_150))
    device = pubsubclient(fresh, "desk-esp32-r")
    try:
        assert device.subscribe(answer, 1)
        for _ in range(3):
            assert device.publish(ask, arduino_request(123456))
        got = device.wait_for(lambda got: len(got) >= 3)
    finally:
        device.close()
    assert got == [(answer, TIP_150.encode())] * 3
    assert len(fresh.standin.requests) == 1


def test_arduino_device_drops_the_envelope_and_gets_errors_in_plain(fresh: Env) -> None:
    ask, answer, question = ARDUINO["ASK_TOPIC"], ARDUINO["ANSWER_TOPIC"], arduino_request(5)
    fresh.standin.script("POST", "/chat/completions", chat_reply(TIP_150))
    without = json.dumps({k: v for k, v in json.loads(question).items() if k != "_bridge"})
    device = pubsubclient(fresh, "desk-esp32-b")
    try:
        assert device.subscribe(answer, 1)
        assert device.publish(ask, without.encode())
        # The envelope is published, but PubSubClient drops it: the sketch never sees it.
        [(topic, size)] = device.wait_dropped(1)
        assert topic == answer and size > 256
        fresh.standin.script(
            "POST",
            "/chat/completions",
            Reply.error(429, "Rate limit reached for gpt-4o-mini", code="rate_limit_exceeded"),
        )
        assert device.publish(ask, question)
        [(topic, payload)] = device.wait_for(lambda got: len(got) >= 1, timeout=30)
        assert topic == answer
        assert payload.startswith(b"ERROR upstream_error: service host answered HTTP 429")
        assert len(payload) <= 200
        assert len(device.dropped) == 1
    finally:
        device.close()


# --- Tasmota --------------------------------------------------------------------------------------


def test_tasmota_rule_switches_the_fan_on_the_plain_answer(fresh: Env) -> None:
    rules = tasmota_rules(code_block("console", "## Tasmota"))
    [subscribe] = tasmota_fire(rules, "mqtt#connected", "")
    event, topic = re.fullmatch(r"Subscribe (\w+), (\S+)", subscribe).groups()  # type: ignore[union-attr]
    device = fresh.client
    device.subscribe(topic + "/#")  # Tasmota's Subscribe adds /#

    def telemetry(temperature: str) -> list[str]:
        [publish] = tasmota_fire(rules, "Tele-AM2301#Temperature", temperature)
        _, request_topic, payload = publish.split(" ", 2)
        mark = device.mark()
        device.publish(request_topic, payload.encode(), qos=0)
        [reply] = device.wait_for(topic + "/#", after=mark)
        assert len(reply.payload) <= 256  # Tasmota's RULE_MAX_MQTT_EVENTSZ
        return tasmota_fire(rules, f"Event#{event}", reply.payload.decode())

    fresh.standin.script("POST", "/chat/completions", chat_reply("ON"))
    assert telemetry("29.5") == ["Power1 1"]
    assert "Room temperature: 29.5 C" in fresh.standin.last.body.decode()
    fresh.standin.script("POST", "/chat/completions", chat_reply("OFF"))
    assert telemetry("19.0") == ["Power1 0"]
    fresh.standin.script(
        "POST", "/chat/completions", Reply.error(401, "Incorrect API key provided")
    )
    [command] = telemetry("21.0")
    assert command.startswith("Publish stat/fan/ai_error ERROR upstream_error: ")
    assert all("_bridge" not in r.json() for r in fresh.standin.requests)


# --- ESPHome --------------------------------------------------------------------------------------


class EsphomeLoader(yaml.SafeLoader):  # type: ignore[misc]  # PyYAML ships no types
    """YAML with ESPHome's `!lambda` tag (read as its C++ text)."""


EsphomeLoader.add_constructor("!lambda", lambda loader, node: loader.construct_scalar(node))
ESPHOME = yaml.load(code_block("yaml", "## ESPHome"), Loader=EsphomeLoader)


def esphome_publish(button: str) -> dict[str, Any]:
    """The `mqtt.publish` action of the button called `button`."""
    [action] = next(b for b in ESPHOME["button"] if b["name"] == button)["on_press"]
    publish: dict[str, Any] = action["mqtt.publish"]
    return publish


def esphome_handlers() -> dict[str, dict[str, Any]]:
    return {entry["topic"]: entry for entry in ESPHOME["mqtt"]["on_message"]}


def test_esphome_display_shows_the_plain_answer(fresh: Env) -> None:
    publish = esphome_publish("Ask for a tip")
    handlers = esphome_handlers()
    reply_topic = publish["topic"].replace("/request/", "/response/")
    handler = handlers[reply_topic]
    assert handler["then"][0] == {"lambda": "id(answer) = x;"}
    fresh.standin.script("POST", "/chat/completions", chat_reply(KITCHEN_100))
    device = fresh.client
    device.subscribe(reply_topic, handler["qos"])
    mark = device.mark()
    device.publish(publish["topic"], publish["payload"].encode(), qos=publish["qos"])
    [reply] = device.wait_for(reply_topic, after=mark)
    assert reply.payload == KITCHEN_100.encode()  # what id(answer) shows


def test_esphome_speaker_gets_the_speech_in_4_kib_chunks(fresh: Env) -> None:
    publish = esphome_publish("Call for dinner")
    handlers = esphome_handlers()
    base = publish["topic"].replace("/request/", "/response/")
    chunk_filter = f"{base}/+"
    assert "speaker.play" in handlers[chunk_filter]["then"][0]
    assert base in handlers  # the end message's handler
    pcm = random_binary(300_000)
    fresh.standin.script("POST", "/audio/speech", Reply(body=pcm, content_type="audio/pcm"))
    device = fresh.client
    device.subscribe(chunk_filter, handlers[chunk_filter]["qos"])
    device.subscribe(base, handlers[base]["qos"])
    mark = device.mark()
    device.publish(publish["topic"], publish["payload"].encode(), qos=publish["qos"])
    [end] = device.wait_for(base, after=mark, timeout=30)
    chunks = [m for m in device.messages(chunk_filter, after=mark) if m.index < end.index]
    assert [m.topic for m in chunks] == [f"{base}/{n}" for n in range(len(chunks))]
    assert all(len(m.payload) <= 4096 for m in chunks)
    assert b"".join(m.payload for m in chunks) == pcm
    assert end.json() == {"chunks": 74, "size": 300_000, "content_type": "audio/pcm"}
    assert json.loads(fresh.standin.last.body)["response_format"] == "pcm"


# --- MicroPython ----------------------------------------------------------------------------------


MICROPYTHON_CODE = code_block("python", "## MicroPython")
MICROPYTHON: dict[str, Any] = {
    node.targets[0].id: node.value.value
    for node in ast.parse(MICROPYTHON_CODE).body
    if isinstance(node, ast.Assign)
    and isinstance(node.targets[0], ast.Name)
    and isinstance(node.value, ast.Constant)
}
QUESTION_MARK = re.search(r'print\(ask\("(.*)"\)\)', MICROPYTHON_CODE)


def micropython_request() -> dict[str, Any]:
    """The `request` dict the example's ask() publishes, for the example's own question."""
    assert QUESTION_MARK is not None
    [ask] = [n for n in ast.parse(MICROPYTHON_CODE).body if isinstance(n, ast.FunctionDef)]
    [node] = [
        n
        for n in ask.body
        if isinstance(n, ast.Assign) and getattr(n.targets[0], "id", None) == "request"
    ]
    source = ast.unparse(node.value).replace("question", repr(QUESTION_MARK.group(1)))
    request: dict[str, Any] = ast.literal_eval(source)
    return request


def test_micropython_example_runs_as_written(fresh: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    code = MICROPYTHON_CODE
    shim = umqtt_simple_module({BROKER_NAME: (fresh.broker.host, fresh.broker.port)})
    package = type(sys)("umqtt")
    package.simple = shim  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "umqtt", package)
    monkeypatch.setitem(sys.modules, "umqtt.simple", shim)
    long_answer = BASIL_400 + " Also: " + "repot it in spring when the roots fill the pot. " * 3
    fresh.standin.script("POST", "/chat/completions", chat_reply(long_answer))
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, "small-devices.md", "exec"), {"__name__": "__main__"})
    max_bytes = micropython_request()["_bridge"]["max_bytes"]
    assert len(long_answer.encode()) > max_bytes
    assert out.getvalue() == long_answer[: max_bytes - 3] + "...\n"
    sent = fresh.standin.last.json()
    assert sent["messages"] == [
        {"role": "user", "content": "How often should I water a basil plant?"}
    ]
    assert "_bridge" not in sent


# --- the sizes the page states ---------------------------------------------------------------


def test_the_documented_sizes(fresh: Env) -> None:
    """Each example without and with its `_bridge` options; the table on the page must agree."""
    device = fresh.client
    rows: list[str] = []

    def measure(topic: str, payload: dict[str, Any], reply: Reply) -> tuple[int, int]:
        reply_topic = topic.replace("/request/", "/response/")
        device.subscribe(reply_topic)
        sizes = []
        for body in ({k: v for k, v in payload.items() if k != "_bridge"}, payload):
            fresh.standin.script("*", re.compile(".*"), reply)
            mark = device.mark()
            device.publish(topic, json.dumps(body).encode())
            [got] = device.wait_for(reply_topic, after=mark, timeout=30)
            sizes.append(len(got.payload))
        return sizes[0], sizes[1]

    arduino = measure(ARDUINO["ASK_TOPIC"], json.loads(arduino_request(1)), chat_reply(TIP_150))
    rows.append(
        f"| Arduino: a 150-character chat answer | {arduino[0]:,} bytes (dropped by PubSubClient) "
        f"| {arduino[1]:,} bytes |"
    )
    rules = tasmota_rules(code_block("console", "## Tasmota"))
    [publish] = tasmota_fire(rules, "Tele-AM2301#Temperature", "29.5")
    _, topic, text = publish.split(" ", 2)
    tasmota = measure(topic, json.loads(text), chat_reply("ON"))
    rows.append(
        f"| Tasmota: a one-word chat answer | {tasmota[0]:,} bytes (over Tasmota's 256-byte rule "
        f"limit) | {tasmota[1]:,} bytes |"
    )
    tip = esphome_publish("Ask for a tip")
    kitchen = measure(tip["topic"], json.loads(tip["payload"]), chat_reply(KITCHEN_100))
    rows.append(
        f"| ESPHome: a 100-character chat answer for the display | {kitchen[0]:,} bytes "
        f"| {kitchen[1]:,} bytes |"
    )
    speech = esphome_publish("Call for dinner")
    audio = random_binary(1 << 20)
    fresh.standin.script("*", re.compile(".*"), Reply(body=audio, content_type="audio/pcm"))
    base = speech["topic"].replace("/request/", "/response/")
    device.subscribe(f"{base}/#")
    mark = device.mark()
    body = {k: v for k, v in json.loads(speech["payload"]).items() if k != "_bridge"}
    device.publish(speech["topic"], json.dumps(body).encode())
    [whole] = device.wait_for(base, after=mark, timeout=30)
    mark = device.mark()
    device.publish(speech["topic"], speech["payload"].encode())
    [end] = device.wait_for(base, after=mark, timeout=30)
    chunks = {len(m.payload) for m in device.messages(f"{base}/+", after=mark)}
    assert chunks == {4096}
    rows.append(
        f"| ESPHome: 1 MiB of speech | one message of {len(whole.payload):,} bytes "
        f"| {end.json()['chunks']} messages of 4,096 bytes and a {len(end.payload)}-byte end "
        "message |"
    )
    pico = measure(MICROPYTHON["ASK"], micropython_request(), chat_reply(BASIL_400))
    rows.append(
        f"| MicroPython: a 400-character chat answer | {pico[0]:,} bytes | {pico[1]:,} bytes |"
    )
    table = DOC.split("<!-- sizes -->\n", 1)[1].split("<!-- /sizes -->", 1)[0]
    documented = table.strip().splitlines()[2:]
    assert documented == rows, "\n".join(rows)


def test_micropython_example_asks_a_non_ascii_question(
    fresh: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    """umqtt.simple sizes a PUBLISH with len(): the example must hand it bytes (issue 23)."""
    question = "Is 30 °C too warm for basil? Ünd what about 35 °C in the sun, über mittags?"
    code = re.sub(r'print\(ask\(".*"\)\)', f"print(ask({question!r}))", MICROPYTHON_CODE)
    assert code.startswith("import json\n")
    code = code.removeprefix("import json\n")  # MicroPython's json instead, bound below
    shim = umqtt_simple_module({BROKER_NAME: (fresh.broker.host, fresh.broker.port)})
    package = type(sys)("umqtt")
    package.simple = shim  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "umqtt", package)
    monkeypatch.setitem(sys.modules, "umqtt.simple", shim)
    fresh.standin.script("POST", "/chat/completions", chat_reply("Fine below 32 °C."))
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(
            compile(code, "small-devices.md", "exec"),
            {"__name__": "__main__", "json": micropython_json()},
        )
    assert out.getvalue() == "Fine below 32 °C.\n"
    assert fresh.standin.last.json()["messages"] == [{"role": "user", "content": question}]


def run_micropython(
    fresh: Env, monkeypatch: pytest.MonkeyPatch, code: str, reply: str, question: str
) -> str:
    """Run MicroPython code with umqtt.simple's own code (fetched by test.sh) on CPython
    sockets and MicroPython's json; what it printed."""
    for name, module in real_umqtt_simple(
        {BROKER_NAME: (fresh.broker.host, fresh.broker.port)}
    ).items():
        monkeypatch.setitem(sys.modules, name, module)
    code = re.sub(r'print\(ask\(".*"\)\)', f"print(ask({question!r}))", code)
    fresh.standin.script("POST", "/chat/completions", chat_reply(reply))
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(
            compile(code.removeprefix("import json\n"), "small-devices.md", "exec"),
            {"__name__": "__main__", "json": micropython_json()},
        )
    return out.getvalue()


NON_ASCII = "Is 30 °C too warm for basil? Ünd what about 35 °C in the sun, über mittags?"


def test_the_micropython_example_runs_on_umqtt_simples_own_code(
    fresh: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The real umqtt.simple sizes a PUBLISH with len(): the example's bytes keep it whole."""
    printed = run_micropython(fresh, monkeypatch, MICROPYTHON_CODE, "Fine below 32 °C.", NON_ASCII)
    assert printed == "Fine below 32 °C.\n"
    assert fresh.standin.last.json()["messages"] == [{"role": "user", "content": NON_ASCII}]


def test_a_str_payload_breaks_on_umqtt_simples_own_code(
    fresh: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What the example avoids: handed a str, umqtt.simple counts characters and writes UTF-8
    bytes, so the bridge never gets the question (the packet is cut short or garbled)."""
    old = MICROPYTHON_CODE.replace("json.dumps(request).encode()", "json.dumps(request)")
    assert old != MICROPYTHON_CODE
    fresh.standin.clear()
    with contextlib.suppress(OSError, IndexError, ValueError):
        run_micropython(fresh, monkeypatch, old, "never asked", NON_ASCII)
    asked = [r.json() for r in fresh.standin.requests]
    assert {"role": "user", "content": NON_ASCII} not in [m for r in asked for m in r["messages"]]
