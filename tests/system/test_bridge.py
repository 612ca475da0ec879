"""The bridge end to end: real Mosquitto, real HTTP stand-in, the real daemon in a thread."""

from __future__ import annotations

import base64
import json
import time
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import pytest
from support.bridge_runner import TEST_API_KEY, BridgeThread, make_config
from support.bridges import StartBridge
from support.broker import MosquittoBroker, free_port
from support.mqtt_client import TestClient
from support.standin import Reply, Standin

from bridge.errors import ERROR_CODES
from bridge.methods.catalog import default_table
from bridge.pipeline.decide import LARGE_PAYLOAD


def assert_no_secret(client: TestClient) -> None:
    for message in client.messages("#"):
        assert TEST_API_KEY.encode() not in message.payload


# --- round trips ----------

SEED_JSON_CALLS: list[tuple[str, dict[str, Any], str, str]] = [
    # (method, payload, HTTP verb, raw path after /v1)
    ("createAssistant", {"model": "gpt-4o"}, "POST", "/assistants"),
    ("createSpeech", {"model": "tts-1", "input": "hi", "voice": "alloy"}, "POST", "/audio/speech"),
    (
        "createChatCompletion",
        {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]},
        "POST",
        "/chat/completions",
    ),
    ("createEmbedding", {"model": "text-embedding-3-small", "input": "hi"}, "POST", "/embeddings"),
    (
        "retrieveFineTuningJob",
        {"fine_tuning_job_id": "ftjob-1"},
        "GET",
        "/fine_tuning/jobs/ftjob-1",
    ),
    ("retrieveFile", {"file_id": "file-1"}, "GET", "/files/file-1"),
    ("createImage", {"prompt": "a cat"}, "POST", "/images/generations"),
    ("getMessage", {"thread_id": "t1", "message_id": "m1"}, "GET", "/threads/t1/messages/m1"),
    ("listModels", {}, "GET", "/models"),
    ("createModeration", {"input": "hi"}, "POST", "/moderations"),
    ("cancelRun", {"thread_id": "t1", "run_id": "r1"}, "POST", "/threads/t1/runs/r1/cancel"),
    ("deleteThread", {"thread_id": "t1"}, "DELETE", "/threads/t1"),
]


@pytest.mark.parametrize(
    ("method", "payload", "verb", "path"), SEED_JSON_CALLS, ids=[c[0] for c in SEED_JSON_CALLS]
)
def test_round_trip_one_method_of_each_seed_group(
    bridge: BridgeThread,
    client: TestClient,
    standin: Standin,
    method: str,
    payload: dict[str, Any],
    verb: str,
    path: str,
) -> None:
    answer = {"id": "x1", "object": "thing", "ok": True}
    standin.set_default(Reply(json=answer))
    reply = client.request(method, {"transaction": "t-1", **payload}, suffix="room")
    if method == "createSpeech":  # binary by contract: whatever body comes back as base64
        data = reply["data"]
        body = base64.b64decode(data["base64"])
        assert (data["content_type"], data["size"]) == ("application/json", len(body))
        assert json.loads(body) == answer
        reply["data"] = answer
    assert reply == {"status": "ok", "method": method, "transaction": "t-1", "data": answer}
    [seen] = standin.requests
    assert (seen.method, seen.path) == (verb, path)
    assert seen.headers["Authorization"] == f"Bearer {TEST_API_KEY}"
    body_keys = {k for k in payload if k not in ("thread_id", "message_id", "run_id", "file_id")}
    body_keys.discard("fine_tuning_job_id")
    if verb == "POST" and body_keys:
        assert seen.headers["Content-Type"] == "application/json"
        assert seen.json() == {k: payload[k] for k in body_keys}
    else:
        assert seen.body == b""
    if method in ("createAssistant", "getMessage", "cancelRun", "deleteThread"):
        assert seen.headers["OpenAI-Beta"] == "assistants=v2"
    else:
        assert "OpenAI-Beta" not in seen.headers
    assert_no_secret(client)


def test_suffix_levels_are_mirrored_and_method_case_is_free(
    bridge: BridgeThread, client: TestClient
) -> None:
    received = client.request_raw("LISTMODELS", {}, suffix="a/b/c")
    assert received.topic == f"{client.prefix}/response/LISTMODELS/a/b/c"
    assert received.json()["method"] == "listModels"
    assert not received.retain


def test_transaction_is_echoed_as_any_json_value_and_never_sent(
    bridge: BridgeThread, client: TestClient, standin: Standin
) -> None:
    for value in [None, 0, "abc", [1, {"x": 2}], {"nested": True}, 12345678901234567890123]:
        reply = client.request("createModeration", {"transaction": value, "input": "hi"})
        assert reply["transaction"] == value
    assert all("transaction" not in (r.json() or {}) for r in standin.requests)
    reply = client.request("createModeration", {"input": "hi"})
    assert "transaction" not in reply


def test_both_spellings_of_submit_tool_outputs(
    bridge: BridgeThread, client: TestClient, standin: Standin
) -> None:
    payload = {
        "thread_id": "t",
        "run_id": "r",
        "tool_outputs": [{"tool_call_id": "c", "output": "4"}],
    }
    for spelling in ("submitToolOuputsToRun", "submitToolOutputsToRun"):
        reply = client.request(spelling, payload)
        assert reply["status"] == "ok" and reply["method"] == "submitToolOuputsToRun"
    assert [r.path for r in standin.requests] == ["/threads/t/runs/r/submit_tool_outputs"] * 2


def test_mqtt5_response_topic_and_correlation_data(
    start_bridge: StartBridge, client: TestClient
) -> None:
    own = f"{client.prefix}-replies/me"
    start_bridge(access={"reply_topics": [f"{client.prefix}-replies/#"]})
    received = client.request_raw(
        "listModels", {}, response_topic=own, correlation_data=b"\x00corr\xff"
    )
    assert received.topic == own
    assert received.correlation_data == b"\x00corr\xff"
    assert received.json()["status"] == "ok"
    assert client.messages(f"{client.prefix}/response/#") == []


def test_mqtt311_client(
    bridge: BridgeThread, mosquitto: MosquittoBroker, topic_prefix: str
) -> None:
    with TestClient.for_broker(mosquitto, prefix=topic_prefix, protocol=paho.MQTTv311) as old:
        reply = old.request("listModels", {"transaction": 1})
    assert reply["status"] == "ok" and reply["transaction"] == 1


def test_bridge_speaking_mqtt311(start_bridge: StartBridge, client: TestClient) -> None:
    bridge = start_bridge(mqtt={"protocol": "3.1.1"})
    assert 'protocol": "3.1.1"' in bridge.log_text()
    assert client.request("listModels", {"transaction": 2})["status"] == "ok"


def test_retained_request_is_never_executed(
    start_bridge: StartBridge, client: TestClient, standin: Standin
) -> None:
    topic = client.topic("request", "listModels", "retained")
    client.publish(topic, {"transaction": "old"}, retain=True)
    try:
        bridge = start_bridge()
        # A live request after it proves the retained one had its chance to be delivered.
        assert client.request("listModels", {"transaction": "live"})["transaction"] == "live"
        assert "retained request ignored" in bridge.log_text()
        assert len(standin.requests) == 1
        assert client.messages(client.topic("response", "listModels", "retained")) == []
    finally:
        client.publish(topic, b"", retain=True)


def test_live_retained_request_is_not_executed_either(
    bridge: BridgeThread, client: TestClient, standin: Standin
) -> None:
    topic = client.topic("request", "listModels", "live-retained")
    client.publish(topic, {"transaction": "r"}, retain=True)
    try:
        assert client.request("listModels", {"transaction": "after"})["status"] == "ok"
        assert len(standin.requests) == 1
        assert client.messages(client.topic("response", "listModels", "live-retained")) == []
    finally:
        client.publish(topic, b"", retain=True)


def test_repeated_request_with_transaction_is_answered_from_the_cache(
    bridge: BridgeThread, client: TestClient, standin: Standin
) -> None:
    payload = {"transaction": "once", "input": "same"}
    first = client.request("createModeration", payload, suffix="d")
    second = client.request("createModeration", payload, suffix="d")
    assert first == second and len(standin.requests) == 1
    # Without a transaction the same payload is a new question: the API is called again.
    client.request("createModeration", {"input": "same"}, suffix="d")
    client.request("createModeration", {"input": "same"}, suffix="d")
    assert len(standin.requests) == 3


def test_availability_state_and_info(
    start_bridge: StartBridge, client: TestClient, topic_prefix: str
) -> None:
    state = f"{topic_prefix}/bridge/test/state"
    client.subscribe(state)
    client.subscribe(f"{topic_prefix}/bridge/test/info")
    bridge = start_bridge()
    client.wait_for_one(state, where=lambda m: m.json() == {"state": "online"})
    info = client.wait_for_one(f"{topic_prefix}/bridge/test/info")
    assert info.json()["methods"] == len(default_table())
    assert TEST_API_KEY not in info.text()
    mark = client.mark()
    bridge.stop()
    client.wait_for_one(state, after=mark, where=lambda m: m.json() == {"state": "offline"})
    # A clean DISCONNECT: the last will is not published on top of the explicit `offline`.
    probe = f"{topic_prefix}/probe"
    client.subscribe(probe)
    client.publish(probe, b"after")
    client.wait_for_one(probe, after=mark)
    assert len(client.messages(state, after=mark)) == 1
    with TestClient.for_broker(client_broker(client), prefix=topic_prefix) as fresh:
        fresh.subscribe(state)
        retained = fresh.wait_for_one(state)
        assert retained.retain and retained.json() == {"state": "offline"}


def client_broker(client: TestClient) -> Any:
    class _B:
        host = client.host
        port = client.port

    return _B()


# --- errors ----------


def test_every_request_error_code(
    bridge: BridgeThread, client: TestClient, standin: Standin
) -> None:
    cases: list[tuple[str, bytes | dict[str, Any], str, str]] = [
        ("listModels", b"{not json", "bad_json", ""),
        ("listModels", b"\xff\xfe\x00garbage", "bad_json", ""),
        ("listModels", b"", "bad_json", "empty"),
        ("listModels", b"[1, 2]", "not_an_object", "list"),
        ("listModels", b'"text"', "not_an_object", ""),
        ("noSuchMethod", {"transaction": 3}, "unknown_method", "noSuchMethod"),
        ("getThread", {"transaction": 4}, "missing_parameter", "thread_id"),
        ("createChatCompletion", {"model": "m"}, "missing_parameter", "messages"),
        ("getThread", {"thread_id": {"a": 1}}, "invalid_parameter", "thread_id"),
        ("listFiles", {"purpos": "x"}, "unknown_parameter", "purpos"),
    ]
    for method, payload, code, needle in cases:
        reply = client.request(method, payload, suffix=f"case-{code}")
        assert reply["status"] == "error", (method, payload, reply)
        assert reply["error"]["code"] == code, (method, payload, reply)
        assert needle in reply["error"]["message"]
        assert reply["error"]["retryable"] is False
        assert code in ERROR_CODES
    assert standin.requests == []
    transactioned = client.request("noSuchMethod", {"transaction": 9})
    assert transactioned["transaction"] == 9 and transactioned["method"] == "noSuchMethod"


def test_large_request_errors(bridge: BridgeThread, client: TestClient, standin: Standin) -> None:
    # From 1 MiB on the payload is parsed as text with its bytes dropped first
    # (bridge/pipeline/decide.py): the same refusals must hold on that path.
    filler = "A" * (LARGE_PAYLOAD + 10)
    cases: list[tuple[bytes, str, str]] = [
        (b'{"input": "' + filler.encode() + b'\xff"}', "bad_json", "UTF-8"),
        (b'{"input": "' + filler.encode() + b'"', "bad_json", ""),
        (b'["' + filler.encode() + b'"]', "not_an_object", "list"),
        (b'{"input": "' + filler.encode() + b'\\ud800"}', "bad_json", "surrogate"),
        (b'{"input": NaN, "pad": "' + filler.encode() + b'"}', "bad_json", "NaN"),
    ]
    for payload, code, needle in cases:
        reply = client.request("createModeration", payload, suffix=f"large-{code}")
        assert reply["status"] == "error", (payload[-40:], reply)
        assert reply["error"]["code"] == code, (payload[-40:], reply)
        assert needle in reply["error"]["message"], reply
    assert standin.requests == []
    big_id = 2**70 + 3  # exact on this path too
    standin.set_default(Reply(json={"results": []}))
    text = '{"input": "' + filler + '", "transaction": ' + str(big_id) + "}"
    reply = client.request("createModeration", text.encode(), suffix="large-ok")
    assert reply["status"] == "ok", bridge.log_text()[-5000:]
    assert reply["transaction"] == big_id
    assert standin.last.json() == {"input": filler}


def test_topic_without_method(bridge: BridgeThread, client: TestClient) -> None:
    client.subscribe(f"{client.prefix}/response")
    client.publish(f"{client.prefix}/request", {"transaction": 1})
    reply = client.wait_for_one(f"{client.prefix}/response").json()
    assert reply["error"]["code"] == "unknown_method"


def test_payload_too_large(start_bridge: StartBridge, client: TestClient, standin: Standin) -> None:
    start_bridge(limits={"max_request_bytes": 2048})
    reply = client.request("createModeration", {"input": "x" * 4096})
    assert reply["error"]["code"] == "payload_too_large"
    assert standin.requests == []


def test_method_not_allowed(
    start_bridge: StartBridge, client: TestClient, standin: Standin
) -> None:
    start_bridge(
        access={"allow_methods": ["createChat*", "createSpeech"], "deny_methods": ["*speech"]}
    )
    assert client.request("createSpeech", {})["error"]["code"] == "method_not_allowed"
    assert client.request("listModels", {})["error"]["code"] == "method_not_allowed"
    ok = client.request("createChatCompletion", {"model": "m", "messages": []})
    assert ok["status"] == "ok"
    assert len(standin.requests) == 1


def test_upstream_error_carries_status_and_the_api_error(
    bridge: BridgeThread, client: TestClient, standin: Standin
) -> None:
    standin.script("GET", "/models", Reply.error(404, "no such model", code="model_not_found"))
    reply = client.request("listModels", {"transaction": 1})
    error = reply["error"]
    assert error["code"] == "upstream_error"
    assert error["http_status"] == 404 and error["retryable"] is False
    assert error["upstream"]["code"] == "model_not_found"
    assert "no such model" in error["message"]


def test_upstream_unavailable(start_bridge: StartBridge, client: TestClient) -> None:
    start_bridge(api_base=f"http://127.0.0.1:{free_port()}/v1", service={"max_retries": 0})
    error = client.request("listModels", {})["error"]
    assert error["code"] == "upstream_unavailable" and error["retryable"] is True
    assert TEST_API_KEY not in error["message"]


def test_upstream_timeout(start_bridge: StartBridge, client: TestClient, standin: Standin) -> None:
    start_bridge(service={"read_timeout": 0.3, "total_timeout": 2.0, "max_retries": 0})
    standin.script("GET", "/models", Reply(hang=True))
    error = client.request("listModels", {})["error"]
    assert error["code"] == "upstream_timeout" and error["retryable"] is True


def test_upstream_broken_json(bridge: BridgeThread, client: TestClient, standin: Standin) -> None:
    standin.script("GET", "/models", Reply(body=b'{"broken": ', content_type="application/json"))
    error = client.request("listModels", {})["error"]
    assert error["code"] == "upstream_bad_response"


def test_key_in_query_never_leaks(
    start_bridge: StartBridge, client: TestClient, standin: Standin
) -> None:
    bridge = start_bridge(
        service={"api_key_name": "key", "api_key_in_query": True, "max_retries": 0}
    )
    standin.script("GET", "/models", Reply.error(401, f"bad key {TEST_API_KEY} in ?key="))
    reply = client.request_raw("listModels", {})
    assert TEST_API_KEY.encode() not in reply.payload
    assert "**********" in reply.text()
    [seen] = standin.requests
    assert seen.query == [("key", TEST_API_KEY)]
    assert "Authorization" not in seen.headers
    assert TEST_API_KEY not in bridge.log_text()


def test_custom_key_header_gets_no_bearer(
    start_bridge: StartBridge, client: TestClient, standin: Standin
) -> None:
    start_bridge(service={"api_key_name": "api-key", "organization": "org-9"})
    client.request("listModels", {})
    [seen] = standin.requests
    assert seen.headers["api-key"] == TEST_API_KEY
    assert "Authorization" not in seen.headers
    assert seen.headers["OpenAI-Organization"] == "org-9"


def test_keyless_local_server(
    start_bridge: StartBridge, client: TestClient, standin: Standin
) -> None:
    start_bridge(api_key="")
    assert client.request("listModels", {})["status"] == "ok"
    [seen] = standin.requests
    assert "Authorization" not in seen.headers and seen.query == []


def test_path_injection_stays_one_segment(
    bridge: BridgeThread, client: TestClient, standin: Standin
) -> None:
    for evil in ["../../admin", "%2F..", "x?y=1&z=2", "a#b", "a\r\nX-Evil: 1", ".."]:
        client.request("getThread", {"thread_id": evil})
    paths = [r.path for r in standin.requests]
    assert len(paths) == 6
    for seen in standin.requests:
        assert seen.path.startswith("/threads/") and seen.path.count("/") == 2
        assert seen.query == [] and "X-Evil" not in seen.headers


# --- concurrency ----------


def test_fifty_concurrent_requests_take_about_one_upstream_latency(
    bridge: BridgeThread, client: TestClient, standin: Standin
) -> None:
    latency = 0.5
    standin.set_latency(latency)
    reply_filter = f"{client.prefix}/response/createModeration/#"
    client.subscribe(reply_filter)
    start = time.monotonic()
    for i in range(50):
        client.publish(client.topic("request", "createModeration", str(i)), {"input": str(i)})
    replies = client.wait_for(reply_filter, 50, timeout=10)
    elapsed = time.monotonic() - start
    assert all(r.json()["status"] == "ok" for r in replies)
    assert {r.topic.rsplit("/", 1)[1] for r in replies} == {str(i) for i in range(50)}
    # Serialized would take 25 s; concurrent takes one latency plus overhead.
    assert elapsed < latency * 4, elapsed


def test_one_slow_call_does_not_block_others(
    bridge: BridgeThread, client: TestClient, standin: Standin
) -> None:
    standin.script("GET", "/models", Reply(json={"slow": True}, delay=3.0))
    client.subscribe(f"{client.prefix}/response/#")
    client.publish(client.topic("request", "listModels", "slow"), {})
    reply = client.request("createModeration", {"input": "fast"}, suffix="fast")
    assert reply["status"] == "ok"
    assert client.messages(f"{client.prefix}/response/listModels/slow") == []
    client.wait_for_one(f"{client.prefix}/response/listModels/slow", timeout=10)


# --- embedded broker ----------


def test_embedded_amqtt_round_trip(tmp_path: Path, standin: Standin) -> None:
    port = free_port()
    path, env = make_config(
        tmp_path, broker_port=port, api_base=standin.url, prefix="emb", mqtt={"host": ""}
    )
    with BridgeThread.from_file(path, env) as bridge:
        assert "embedded amqtt broker" in bridge.log_text()
        with TestClient("127.0.0.1", port, prefix="emb", protocol=paho.MQTTv311) as c:
            reply = c.request("listModels", {"transaction": "emb"})
    assert reply == {
        "status": "ok",
        "method": "listModels",
        "transaction": "emb",
        "data": {"object": "standin", "method": "GET", "path": "/models", "echo": None},
    }
    assert TEST_API_KEY not in bridge.log_text()
