"""The `_bridge` reply options over real MQTT and HTTP: every option against every kind of answer.

One bridge (MQTT 5 to Mosquitto) and two clients, one MQTT 5 and one MQTT 3.1.1; every
byte of every reply is compared, and the stand-in shows that `_bridge` never leaves the bridge.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from typing import Any

import pytest
from support.bridges import module_bridge
from support.broker import MosquittoBroker
from support.fakes import random_binary
from support.mqtt_client import MQTTv311, Received, TestClient
from support.standin import RecordedRequest, Reply, Standin
from test_files_streams import RESPONSE_EVENTS, sse

from bridge.methods.catalog import default_table
from bridge.methods.describe import example_payload

PREFIX = "small"
ANSWER = "Grüße aus Köln: 20 °C, leichter Regen 🌧, am Abend klar."
CHAT = {
    "id": "chatcmpl-9",
    "object": "chat.completion",
    "created": 1700000000,
    "model": "gpt-4o-mini",
    "choices": [
        {
            "index": 0,
            "message": {"role": "assistant", "content": ANSWER, "refusal": None},
            "logprobs": None,
            "finish_reason": "stop",
        }
    ],
    "usage": {"prompt_tokens": 12, "completion_tokens": 20, "total_tokens": 32},
    "system_fingerprint": "fp_1",
}
CHAT_BODY = json.dumps(CHAT).encode()  # what the stand-in sends: spaces, \u escapes
QUESTION = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Wetter?"}]}
TRANSCRIPT = "Grüße — 你好, world"
WAV = b"RIFF\x24\x00\x00\x00WAVEfmt " + bytes(range(64))
AUDIO = random_binary(5000)
PLAIN = "text/plain; charset=utf-8"
SELECT_CONTENT = "choices[0].message.content"


def compact(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()


@pytest.fixture(scope="module")
def env(
    tmp_path_factory: pytest.TempPathFactory, mosquitto: MosquittoBroker
) -> Iterator[tuple[dict[str, TestClient], Standin]]:
    with module_bridge(tmp_path_factory, mosquitto, PREFIX) as (_, v5, standin):
        v311 = TestClient.for_broker(mosquitto, prefix=PREFIX, protocol=MQTTv311).connect()
        try:
            yield {"5": v5, "3.1.1": v311}, standin
        finally:
            v311.disconnect()


@pytest.fixture(params=["5", "3.1.1"])
def dev(
    request: pytest.FixtureRequest, env: tuple[dict[str, TestClient], Standin]
) -> tuple[TestClient, Standin]:
    clients, standin = env
    standin.reset()
    return clients[request.param], standin


def ask(
    client: TestClient,
    method: str,
    payload: dict[str, Any],
    suffix: str,
    options: dict[str, Any] | None = None,
    **kwargs: Any,
) -> Received:
    body = {**payload, "_bridge": options} if options is not None else payload
    return client.request_raw(method, body, suffix=f"{suffix}-{client.protocol}", **kwargs)


def assert_clean(seen: RecordedRequest, sent: dict[str, Any]) -> None:
    """The stand-in got the payload without `transaction` and without `_bridge`."""
    assert b"_bridge" not in seen.body and "_bridge" not in seen.query_string
    if seen.json() is not None:
        assert seen.json() == {k: v for k, v in sent.items() if k not in ("transaction",)}


def content_type(client: TestClient, message: Received, expected: str | None) -> None:
    """MQTT 5 clients see the Content Type property; 3.1.1 clients get no properties."""
    assert message.content_type == (expected if client.v5 else None)


def chunks_of(client: TestClient, reply_topic: str, end: Received) -> list[Received]:
    """The chunk messages before the end message on `<reply_topic>/<n>`, in arrival order."""
    return [m for m in client.messages(f"{reply_topic}/+") if m.index < end.index and m.qos == 1]


# --- every option against a JSON answer -----------------------------------------------------------


JSON_CASES: list[tuple[str, dict[str, Any] | None, bytes, str | None]] = [
    (
        "envelope",
        None,
        b'{"status":"ok","method":"createChatCompletion","transaction":1,"data":'
        + CHAT_BODY
        + b"}",
        None,
    ),
    (
        "select",
        {"select": SELECT_CONTENT},
        b'{"status":"ok","method":"createChatCompletion","transaction":1,"data":'
        + compact(ANSWER)
        + b"}",
        None,
    ),
    ("plain", {"format": "plain"}, compact(CHAT), PLAIN),
    ("plain-select", {"format": "plain", "select": SELECT_CONTENT}, ANSWER.encode(), PLAIN),
    (
        "plain-cut",
        {"format": "plain", "select": SELECT_CONTENT, "max_bytes": 40},
        "Grüße aus Köln: 20 °C, leichter R...".encode(),
        PLAIN,
    ),
    (
        "plain-number",
        {"format": "plain", "select": "usage.total_tokens"},
        b"32",
        PLAIN,
    ),
    ("plain-nothing", {"format": "plain", "select": "choices[3].message"}, b"null", PLAIN),
    ("raw", {"format": "raw"}, CHAT_BODY, "application/json"),
    ("raw-select", {"format": "raw", "select": SELECT_CONTENT}, ANSWER.encode(), PLAIN),
]


@pytest.mark.parametrize(("case", "options", "expected", "ctype"), JSON_CASES, ids=lambda x: "")
def test_json_answer_in_every_format(
    dev: tuple[TestClient, Standin],
    case: str,
    options: dict[str, Any] | None,
    expected: bytes,
    ctype: str | None,
) -> None:
    client, standin = dev
    standin.script("POST", "/chat/completions", Reply(json=CHAT))
    payload = {"transaction": 1, **QUESTION}
    reply = ask(client, "createChatCompletion", payload, case, options)
    assert reply.payload == expected
    assert len(reply.payload) <= 40 or case != "plain-cut"
    content_type(client, reply, ctype)
    [seen] = standin.requests
    assert_clean(seen, payload)


def test_raw_json_in_chunks(dev: tuple[TestClient, Standin]) -> None:
    client, standin = dev
    standin.script("POST", "/chat/completions", Reply(json=CHAT))
    reply_topic = client.topic("response", "createChatCompletion", f"chunks-{client.protocol}")
    client.subscribe(f"{reply_topic}/#")
    options = {"format": "raw", "chunk_bytes": 128}
    end = ask(client, "createChatCompletion", {"transaction": "c", **QUESTION}, "chunks", options)
    assert end.json() == {
        "transaction": "c",
        "chunks": -(-len(CHAT_BODY) // 128),
        "size": len(CHAT_BODY),
        "content_type": "application/json",
    }
    chunks = chunks_of(client, reply_topic, end)
    assert [m.topic for m in chunks] == [f"{reply_topic}/{n}" for n in range(len(chunks))]
    assert b"".join(m.payload for m in chunks) == CHAT_BODY
    content_type(client, end, "application/json")


# --- text and binary answers ----------------------------------------------------------------------


TEXT_CASES: list[tuple[str, dict[str, Any] | None, bytes, str | None]] = [
    (
        "select",
        {"select": "text"},
        b'{"status":"ok","method":"createTranscription","data":' + compact(TRANSCRIPT) + b"}",
        None,
    ),
    (
        "plain",
        {"format": "plain"},
        compact({"text": TRANSCRIPT, "content_type": "text/plain"}),
        PLAIN,
    ),
    ("plain-select", {"format": "plain", "select": "text"}, TRANSCRIPT.encode(), PLAIN),
    ("raw", {"format": "raw"}, TRANSCRIPT.encode(), PLAIN),
    ("raw-select", {"format": "raw", "select": "content_type"}, b"text/plain", PLAIN),
]


@pytest.mark.parametrize(("case", "options", "expected", "ctype"), TEXT_CASES, ids=lambda x: "")
def test_text_answer_in_every_format(
    dev: tuple[TestClient, Standin],
    case: str,
    options: dict[str, Any] | None,
    expected: bytes,
    ctype: str | None,
) -> None:
    client, standin = dev
    standin.script("POST", "/audio/transcriptions", Reply(text=TRANSCRIPT, content_type=PLAIN))
    payload = {
        "model": "whisper-1",
        "response_format": "text",
        "file": {"base64": base64.b64encode(WAV).decode(), "filename": "door.wav"},
    }
    reply = ask(client, "createTranscription", payload, f"t-{case}", options)
    assert reply.payload == expected
    content_type(client, reply, ctype)
    [seen] = standin.requests
    assert seen.parts is not None
    assert "_bridge" not in [part.name for part in seen.parts]
    assert b"_bridge" not in seen.body


BINARY_CASES: list[tuple[str, dict[str, Any], bytes, str | None]] = [
    (
        "select",
        {"select": "[content_type, size]"},
        b'{"status":"ok","method":"createSpeech","data":["audio/mpeg",5000]}',
        None,
    ),
    ("plain-select", {"format": "plain", "select": "size"}, b"5000", PLAIN),
    ("raw", {"format": "raw"}, AUDIO, "audio/mpeg"),
]


@pytest.mark.parametrize(("case", "options", "expected", "ctype"), BINARY_CASES, ids=lambda x: "")
def test_binary_answer_in_every_format(
    dev: tuple[TestClient, Standin],
    case: str,
    options: dict[str, Any],
    expected: bytes,
    ctype: str | None,
) -> None:
    client, standin = dev
    standin.script("POST", "/audio/speech", Reply(body=AUDIO, content_type="audio/mpeg"))
    payload = {"model": "gpt-4o-mini-tts", "voice": "alloy", "input": "Jemand ist an der Tür."}
    reply = ask(client, "createSpeech", payload, f"b-{case}", options)
    assert reply.payload == expected
    content_type(client, reply, ctype)
    [seen] = standin.requests
    assert_clean(seen, payload)


def test_one_mib_of_audio_in_4_kib_chunks(dev: tuple[TestClient, Standin]) -> None:
    client, standin = dev
    audio = random_binary(1 << 20)
    standin.script("POST", "/audio/speech", Reply(body=audio, content_type="audio/mpeg"))
    payload = {"transaction": 5, "model": "tts-1", "voice": "alloy", "input": "long story"}
    options = {"format": "raw", "chunk_bytes": 4096}
    kwargs: dict[str, Any] = {}
    if client.v5:
        # A Response Topic below the request's own reply topic (the bridge refuses others).
        reply_topic = client.topic("response", "createSpeech", f"speaker-{client.protocol}/inbox")
        kwargs = {"response_topic": reply_topic, "correlation_data": b"\x00\x07"}
    else:
        reply_topic = client.topic("response", "createSpeech", f"speaker-{client.protocol}")
    client.subscribe(f"{reply_topic}/#")
    end = ask(client, "createSpeech", payload, "speaker", options, timeout=30, **kwargs)
    assert end.topic == reply_topic
    assert end.json() == {
        "transaction": 5,
        "chunks": 256,
        "size": 1 << 20,
        "content_type": "audio/mpeg",
    }
    chunks = chunks_of(client, reply_topic, end)
    assert [m.topic for m in chunks] == [f"{reply_topic}/{n}" for n in range(256)]
    assert all(len(m.payload) == 4096 for m in chunks)
    assert b"".join(m.payload for m in chunks) == audio
    if client.v5:
        assert all(m.correlation_data == b"\x00\x07" for m in [*chunks, end])
        assert all(m.content_type == "audio/mpeg" for m in chunks)
        assert end.content_type == "application/json"
    else:
        assert all(m.properties is None or not m.content_type for m in [*chunks, end])


# --- streaming ------------------------------------------------------------------------------------


def chat_chunk(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
    return {
        "id": "chatcmpl-s",
        "object": "chat.completion.chunk",
        "created": 1,
        "model": "gpt-4o-mini",
        "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
    }


LONG_DELTA = "Übermorgen " * 7  # 84 bytes: split for max_bytes 32
STREAM = [
    chat_chunk({"role": "assistant", "content": ""}),
    chat_chunk({"content": "Hel"}),
    chat_chunk({"content": "lo, wörld! "}),
    chat_chunk({"content": LONG_DELTA}),
    chat_chunk({}, "stop"),
]
STREAM_TEXT = "Hello, wörld! " + LONG_DELTA


def stream_ask(
    client: TestClient, method: str, payload: dict[str, Any], suffix: str, options: dict[str, Any]
) -> tuple[list[Received], Received]:
    suffix = f"{suffix}-{client.protocol}"
    stream_topic = client.topic("stream", method, suffix)
    client.subscribe(stream_topic)
    start = client.mark()
    reply = client.request_raw(method, {**payload, "_bridge": options}, suffix=suffix)
    events = client.messages(stream_topic, after=start)
    assert all(event.index < reply.index for event in events)
    return events, reply


def test_streamed_chat_in_plain_text(dev: tuple[TestClient, Standin]) -> None:
    client, standin = dev
    standin.script("POST", "/chat/completions", Reply(sse=sse([(None, c) for c in STREAM])))
    payload = {**QUESTION, "stream": True}
    options = {"format": "plain", "select": SELECT_CONTENT}
    events, reply = stream_ask(client, "createChatCompletion", payload, "scroll", options)
    assert [e.payload for e in events] == [b"Hel", "lo, wörld! ".encode(), LONG_DELTA.encode()]
    assert reply.payload == STREAM_TEXT.encode()
    for message in [*events, reply]:
        content_type(client, message, PLAIN)

    limited = {**options, "max_bytes": 32}
    events, reply = stream_ask(client, "createChatCompletion", payload, "scroll32", limited)
    assert b"".join(e.payload for e in events) == STREAM_TEXT.encode()
    assert all(len(e.payload) <= 32 for e in events)
    assert len(events) == 2 + 3  # the long delta in three pieces
    assert reply.payload == STREAM_TEXT.encode()[:29] + b"..."
    assert all(
        e.topic == client.topic("stream", "createChatCompletion", f"scroll32-{client.protocol}")
        for e in events
    )
    assert_clean(standin.requests[0], payload)


def test_streamed_responses_in_plain_text_and_json_select(dev: tuple[TestClient, Standin]) -> None:
    client, standin = dev
    standin.script("POST", "/responses", Reply(sse=sse(RESPONSE_EVENTS), sse_done=False))
    payload = {"model": "gpt-4.1", "input": "Hi", "stream": True}
    deltas = [d["delta"] for n, d in RESPONSE_EVENTS if n == "response.output_text.delta"]
    events, reply = stream_ask(
        client, "createResponse", payload, "desk", {"format": "plain", "select": "status"}
    )
    assert [e.payload for e in events] == [d.encode() for d in deltas]
    assert reply.payload == b"completed"

    # The JSON format keeps the JSON stream events; select shapes the final reply only.
    events, reply = stream_ask(client, "createResponse", payload, "desk-json", {"select": "status"})
    assert [e.json()["event"] for e in events] == [n for n, _ in RESPONSE_EVENTS]
    assert reply.json() == {"status": "ok", "method": "createResponse", "data": "completed"}


# --- errors ---------------------------------------------------------------------------------------


MISSING_MODEL = "service host answered HTTP 404 Not Found: The model 'x' does not exist"


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        ({"format": "plain"}, f"ERROR upstream_error: {MISSING_MODEL}".encode()),
        (
            {"format": "plain", "select": "x", "max_bytes": 48},
            b"ERROR upstream_error: service host answered H...",
        ),
        ({"format": "raw", "chunk_bytes": 4096}, f"ERROR upstream_error: {MISSING_MODEL}".encode()),
    ],
    ids=["plain", "plain-cut", "raw"],
)
def test_upstream_error_in_each_format(
    dev: tuple[TestClient, Standin], options: dict[str, Any], expected: bytes
) -> None:
    client, standin = dev
    standin.script(
        "POST",
        "/chat/completions",
        Reply.error(404, "The model 'x' does not exist", code="model_not_found"),
    )
    reply = ask(client, "createChatCompletion", QUESTION, f"err-{options['format']}", options)
    assert reply.payload == expected
    content_type(client, reply, PLAIN)
    assert len(standin.requests) == 1
    # The JSON format is the usual envelope.
    reply = ask(client, "createChatCompletion", QUESTION, "err-json", {"select": "x"})
    assert reply.json()["error"]["code"] == "upstream_error"
    assert reply.json()["error"]["message"] == MISSING_MODEL


def test_local_errors_in_plain_format(dev: tuple[TestClient, Standin]) -> None:
    client, _ = dev
    reply = ask(client, "noSuchMethod", {}, "unknown", {"format": "plain"})
    assert (
        reply.payload
        == b"ERROR unknown_method: unknown method 'noSuchMethod'; see `openai-mqtt-bridge methods`"
    )
    reply = ask(client, "retrieveModel", {}, "missing", {"format": "raw"})
    assert reply.payload == b"ERROR missing_parameter: missing required parameter 'model'"


BAD_OPTIONS: list[tuple[Any, bytes]] = [
    ({"select": "choices[0"}, b"_bridge.select is not a JMESPath expression"),
    ({"select": "nope(@)", "format": "plain"}, b"unknown JMESPath function(s) nope"),
    ({"select": 7}, b"_bridge.select must be a JMESPath expression string"),
    ({"format": "text"}, b'_bridge.format must be \\"json\\", \\"plain\\" or \\"raw\\"'),
    ({"format": "plain", "max_bytes": 8}, b"_bridge.max_bytes must be from 32"),
    ({"format": "plain", "max_bytes": "200"}, b"_bridge.max_bytes must be an integer"),
    ({"format": "raw", "chunk_bytes": 0}, b"_bridge.chunk_bytes must be from 128"),
    ({"chunk_bytes": 4096}, b'_bridge.chunk_bytes applies to \\"format\\": \\"raw\\" only'),
    ({"max_bytes": 200}, b"_bridge.max_bytes applies to"),
    (
        {"wait": True, "colour": 1},
        b"unknown option(s) 'colour'; known: allow_dangerous, chunk_bytes, dry_run, format, "
        b"max_bytes, select, tools, wait",
    ),
    ("plain", b"_bridge must be a JSON object, got a string"),
]


@pytest.mark.parametrize(("options", "fragment"), BAD_OPTIONS, ids=lambda x: "")
def test_bad_options_are_refused_before_any_http_request(
    dev: tuple[TestClient, Standin], options: Any, fragment: bytes
) -> None:
    client, standin = dev
    standin.script("POST", "/chat/completions", Reply(json=CHAT))
    reply = ask(client, "createChatCompletion", {"transaction": 2, **QUESTION}, "bad", options)
    plain = isinstance(options, dict) and options.get("format") in ("plain", "raw")
    if plain:
        assert reply.payload.startswith(b"ERROR invalid_parameter: _bridge")
        assert fragment.replace(b"\\", b"") in reply.payload
    else:
        error = reply.json()["error"]
        assert error["code"] == "invalid_parameter"
        assert fragment in reply.payload
        assert reply.json()["transaction"] == 2
    assert standin.requests == []


# --- every operation ------------------------------------------------------------------------------


def test_every_operation_takes_the_options_and_never_sends_them(
    env: tuple[dict[str, TestClient], Standin],
) -> None:
    clients, standin = env
    client = clients["3.1.1"]
    standin.reset()
    standin.set_default(Reply(json={"object": "stand-in"}))
    failures: list[str] = []
    table = default_table()
    for op in table.operations:
        payload = example_payload(op)
        for field in op.file_fields:
            if isinstance(payload.get(field), dict):
                payload[field] = {**payload[field], "base64": base64.b64encode(WAV).decode()}
        standin.clear()
        options = {"format": "plain", "select": "object || content_type", "max_bytes": 64}
        reply = client.request_raw(op.name, {**payload, "_bridge": options}, suffix="every")
        expected = b"application/json" if op.response_kind == "binary" else b"stand-in"
        if reply.payload != expected:
            failures.append(f"{op.name}: {reply.payload[:200]!r}")
            continue
        [seen] = standin.requests
        if b"_bridge" in seen.body or "_bridge" in seen.query_string:
            failures.append(f"{op.name}: _bridge reached the service host")
    assert failures == [], "\n".join(failures)


def test_call_endpoint_takes_the_options_too(dev: tuple[TestClient, Standin]) -> None:
    client, standin = dev
    standin.script("GET", "/models/gpt-x", Reply(json={"id": "gpt-x", "object": "model"}))
    payload = {"method": "GET", "path": "/models/gpt-x"}
    reply = ask(client, "callEndpoint", payload, "ep", {"format": "plain", "select": "id"})
    assert reply.payload == b"gpt-x"
    content_type(client, reply, PLAIN)
    standin.script("GET", "/files/f1/content", Reply(body=AUDIO, content_type="audio/mpeg"))
    raw = ask(
        client,
        "callEndpoint",
        {"method": "GET", "path": "/files/f1/content"},
        "ep-raw",
        {"format": "raw"},
    )
    assert raw.payload == AUDIO
    content_type(client, raw, "audio/mpeg")
    assert [r.query_string for r in standin.requests] == ["", ""]
    assert all(b"_bridge" not in r.body for r in standin.requests)


def test_streamed_chat_in_raw_format_and_chunks(dev: tuple[TestClient, Standin]) -> None:
    client, standin = dev
    standin.script("POST", "/chat/completions", Reply(sse=sse([(None, c) for c in STREAM])))
    payload = {**QUESTION, "stream": True}
    events, reply = stream_ask(
        client, "createChatCompletion", payload, "rawstream", {"format": "raw"}
    )
    assert [e.json()["data"] for e in events] == STREAM  # raw leaves the events as JSON
    assembled = reply.json()
    assert assembled["choices"][0]["message"]["content"] == STREAM_TEXT
    assert reply.payload == compact(assembled)
    content_type(client, reply, "application/json")

    suffix = f"rawchunks-{client.protocol}"
    reply_topic = client.topic("response", "createChatCompletion", suffix)
    client.subscribe(f"{reply_topic}/#")
    options = {"format": "raw", "chunk_bytes": 128}
    _, end = stream_ask(client, "createChatCompletion", payload, "rawchunks", options)
    chunks = chunks_of(client, reply_topic, end)
    assert b"".join(m.payload for m in chunks) == reply.payload
    assert end.json() == {
        "chunks": len(chunks),
        "size": len(reply.payload),
        "content_type": "application/json",
    }


def test_a_repeated_plain_request_is_answered_from_memory_alike(
    dev: tuple[TestClient, Standin],
) -> None:
    client, standin = dev
    standin.script("POST", "/chat/completions", Reply(json=CHAT))
    payload = {"transaction": "same", **QUESTION}
    options = {"format": "plain", "select": SELECT_CONTENT}
    first = ask(client, "createChatCompletion", payload, "again", options)
    second = ask(client, "createChatCompletion", payload, "again", options)
    assert first.payload == second.payload == ANSWER.encode()
    content_type(client, second, PLAIN)
    assert len(standin.requests) == 1
