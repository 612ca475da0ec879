"""callEndpoint: any endpoint of the service host over MQTT, validated field by field.

Pure request building first (every refused path, header and field with its error code), then
through the real bridge and stand-in: JSON, multipart with a file, a binary answer, a streamed
answer, access rules, and the key reaching only the stand-in (never a second host).
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from typing import Any

import pytest
from pydantic import SecretStr
from support.bridge_runner import TEST_API_KEY
from support.bridges import module_bridge
from support.broker import MosquittoBroker
from support.mqtt_client import TestClient
from support.standin import Reply, Standin

from bridge.config import ServiceConfig
from bridge.errors import BridgeError
from bridge.methods.catalog import default_table
from bridge.methods.describe import describe
from bridge.methods.endpoint import CALL_ENDPOINT
from bridge.pipeline.build import RequestBuilder

KEY = "sk-unit-KEY-0123456789"
PREFIX = "anyep"
PNG = b"\x89PNG\r\n\x1a\n" + bytes(range(200))


def builder(**overrides: Any) -> RequestBuilder:
    options: dict[str, Any] = {"api_base": "https://api.example.test/v1", "api_key": SecretStr(KEY)}
    options.update(overrides)
    return RequestBuilder(ServiceConfig(**options))


def refusal(payload: dict[str, Any], **overrides: Any) -> str:
    """The error code building `payload` raises."""
    with pytest.raises(BridgeError) as info:
        builder(**overrides).build(CALL_ENDPOINT, payload)
    assert KEY not in str(info.value)
    return info.value.code


# --- pure building --------------------------------------------------------------------------------


def test_the_table_finds_it_in_any_case_and_keeps_the_spec_operations_apart() -> None:
    table = default_table()
    assert table.find("callEndpoint") is CALL_ENDPOINT
    assert table.find("CALLENDPOINT") is CALL_ENDPOINT
    assert CALL_ENDPOINT not in table.operations


def test_json_call_builds_the_same_kind_of_request_as_the_table() -> None:
    request = builder().build(
        CALL_ENDPOINT,
        {
            "method": "post",
            "path": "/beta/agents",
            "query": {"include": ["a", "b"], "limit": 2, "meta": {"k": "v"}, "skip": None},
            "headers": {"OpenAI-Beta": "agents=v1", "X-Trace": 7},
            "body": {"name": "helper", "tools": []},
        },
    )
    assert request.method == "POST"
    assert request.url == (
        "https://api.example.test/v1/beta/agents?include[]=a&include[]=b&limit=2&meta[k]=v"
    )
    assert request.headers["Authorization"] == f"Bearer {KEY}"
    assert request.headers["OpenAI-Beta"] == "agents=v1"
    assert request.headers["X-Trace"] == "7"
    assert request.headers["Content-Type"] == "application/json"
    assert request.json_body is not None
    assert json.loads(request.json_body) == {"name": "helper", "tools": []}
    assert request.form is None


def test_bodyless_call_and_odd_path_characters_are_encoded_not_refused() -> None:
    request = builder().build(CALL_ENDPOINT, {"method": "DELETE", "path": "/files/a b/ü:x@y/"})
    assert request.url == "https://api.example.test/v1/files/a%20b/%C3%BC:x@y/"
    assert request.json_body is None and request.form is None
    assert "Content-Type" not in request.headers


def test_user_headers_replace_configured_extras_ignoring_case() -> None:
    b = builder(extra_headers={"X-Team": "ops"})
    request = b.build(CALL_ENDPOINT, {"method": "GET", "path": "/x", "headers": {"x-team": "dev"}})
    assert [v for k, v in request.headers.items() if k.lower() == "x-team"] == ["dev"]


@pytest.mark.parametrize(
    "path",
    [
        "http://evil.test/x",
        "https://evil.test",
        "//evil.test/v1/models",
        "models",
        "",
        "/a/../b",
        "/..",
        "/a/./b",
        "/a/%2e%2e/b",
        "/a/%2E/b",
        "/a/.%2E",
        "/a%2fb",
        "/a%5Cb",
        "/a\\b",
        "/a?b=1",
        "/a#frag",
        "/a\r\nX-Evil: 1",
        "/a\tb",
        "/a%0d%0aX: 1",
        "/a%zz",
        "/a%",
        "/a//b",
        "/" + "x" * 2048,
        123,
        ["/models"],
    ],
)
def test_refused_paths(path: Any) -> None:
    assert refusal({"method": "GET", "path": path}) == "invalid_path"


@pytest.mark.parametrize(
    ("headers", "code", "overrides"),
    [
        ({"Authorization": "Bearer other"}, "forbidden_header", {}),
        ({"authorization": "x"}, "forbidden_header", {}),
        ({"Proxy-Authorization": "x"}, "forbidden_header", {}),
        ({"Host": "evil.test"}, "forbidden_header", {}),
        ({"Content-Length": "0"}, "forbidden_header", {}),
        ({"Transfer-Encoding": "chunked"}, "forbidden_header", {}),
        ({"Connection": "close"}, "forbidden_header", {}),
        ({"Cookie": "a=b"}, "forbidden_header", {}),
        ({"api-key": "x"}, "forbidden_header", {"api_key_name": "api-key"}),
        ({"API-KEY": "x"}, "forbidden_header", {"api_key_name": "api-key"}),
        ({"X-A": "b\r\nX-Evil: 1"}, "invalid_header", {}),
        ({"X-A": "b\nc"}, "invalid_header", {}),
        ({"X-A": "b\x00"}, "invalid_header", {}),
        ({"X-A": ["ok", "b\rc"]}, "invalid_header", {}),
        ({"X A": "b"}, "invalid_header", {}),
        ({"X-A:": "b"}, "invalid_header", {}),
        ({"": "b"}, "invalid_header", {}),
        ({"X-A": {"k": "v"}}, "invalid_header", {}),
        ({"X-A": None}, "invalid_header", {}),
        ({"X-A": "1", "x-a": "2"}, "invalid_header", {}),
    ],
)
def test_refused_headers(headers: dict[str, Any], code: str, overrides: dict[str, Any]) -> None:
    payload = {"method": "POST", "path": "/x", "headers": headers, "body": {}}
    assert refusal(payload, **overrides) == code


def test_headers_must_be_an_object_and_form_sets_its_own_content_type() -> None:
    assert refusal({"method": "GET", "path": "/x", "headers": ["X-A: b"]}) == "invalid_header"
    form = {"method": "POST", "path": "/x", "headers": {"content-type": "text/plain"}, "form": {}}
    assert refusal(form) == "invalid_header"


@pytest.mark.parametrize(
    ("payload", "code"),
    [
        ({"path": "/x"}, "missing_parameter"),
        ({"method": "GET"}, "missing_parameter"),
        ({"method": "TRACE", "path": "/x"}, "invalid_method"),
        ({"method": "CONNECT", "path": "/x"}, "invalid_method"),
        ({"method": "", "path": "/x"}, "invalid_method"),
        ({"method": 1, "path": "/x"}, "invalid_method"),
        ({"method": "GET", "path": "/x", "query": "a=1"}, "invalid_query"),
        ({"method": "GET", "path": "/x", "query": {"a": [[1]]}}, "invalid_query"),
        ({"method": "GET", "path": "/x", "query": {"a": {"b": {"c": 1}}}}, "invalid_query"),
        ({"method": "GET", "path": "/x", "query": {"": 1}}, "invalid_query"),
        ({"method": "POST", "path": "/x", "body": {}, "form": {}}, "invalid_body"),
        ({"method": "GET", "path": "/x", "body": {"a": 1}}, "invalid_body"),
        ({"method": "POST", "path": "/x", "form": [1]}, "invalid_body"),
        ({"method": "GET", "path": "/x", "url": "https://evil.test"}, "unknown_parameter"),
        ({"method": "POST", "path": "/f", "form": {"file": {"base64": "!!"}}}, "invalid_base64"),
    ],
)
def test_refused_fields(payload: dict[str, Any], code: str) -> None:
    assert refusal(payload) == code


def test_the_key_query_parameter_cannot_be_set_or_moved() -> None:
    overrides = {"api_key_name": "key", "api_key_in_query": True}
    payload = {"method": "GET", "path": "/x", "query": {"key": "mine"}}
    assert refusal(payload, **overrides) == "invalid_query"
    request = builder(**overrides).build(
        CALL_ENDPOINT, {"method": "GET", "path": "/x", "query": {"a": 1}}
    )
    assert request.url == f"https://api.example.test/v1/x?a=1&key={KEY}"


def test_form_with_files_builds_multipart_parts() -> None:
    png = base64.b64encode(PNG).decode()
    request = builder().build(
        CALL_ENDPOINT,
        {
            "method": "POST",
            "path": "/uploads/up_1/parts",
            "form": {
                "data": {"base64": png, "filename": "p.png"},
                "images": [{"base64": png}, {"base64": png, "content_type": "image/png"}],
                "note": "hi",
                "n": 2,
            },
        },
    )
    assert request.form is not None and request.json_body is None
    parts = [(p.name, p.filename, p.content_type, p.value) for p in request.form]
    assert parts[0] == ("data", "p.png", "image/png", PNG)
    assert [p[0] for p in parts[1:3]] == ["images[]", "images[]"]
    assert all(p[3] == PNG and p[2] == "image/png" for p in parts[1:3])
    assert [(p.name, p.value) for p in request.form[3:]] == [("note", b"hi"), ("n", b"2")]
    assert "Content-Type" not in request.headers


def test_describe_covers_it() -> None:
    text = describe(CALL_ENDPOINT)
    for fragment in ("openai/request/callEndpoint", "`path`", "`headers`", "`form`", "[access]"):
        assert fragment in text, fragment


# --- over MQTT ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def other_host() -> Iterator[Standin]:
    """A second HTTP server a malicious path might try to reach with the key."""
    with Standin() as other:
        other.set_default(Reply(json={"stolen": True}))
        yield other


@pytest.fixture(scope="module")
def any_env(
    tmp_path_factory: pytest.TempPathFactory, mosquitto: MosquittoBroker
) -> Iterator[tuple[TestClient, Standin]]:
    with module_bridge(tmp_path_factory, mosquitto, PREFIX) as (_, client, standin):
        yield client, standin


def test_json_call_over_mqtt(any_env: tuple[TestClient, Standin]) -> None:
    client, standin = any_env
    standin.clear()
    standin.script("POST", "/beta/agents", Reply(json={"id": "agent_1", "object": "agent"}))
    reply = client.request(
        "callEndpoint",
        {
            "transaction": "t1",
            "method": "POST",
            "path": "/beta/agents",
            "query": {"include": ["x"]},
            "headers": {"OpenAI-Beta": "agents=v1"},
            "body": {"name": "helper"},
        },
    )
    assert reply == {
        "status": "ok",
        "method": "callEndpoint",
        "transaction": "t1",
        "data": {"id": "agent_1", "object": "agent"},
    }
    [seen] = standin.requests
    assert (seen.method, seen.path, seen.query_string) == ("POST", "/beta/agents", "include[]=x")
    assert seen.headers["Authorization"] == f"Bearer {TEST_API_KEY}"
    assert seen.headers["OpenAI-Beta"] == "agents=v1"
    assert seen.headers["Content-Type"] == "application/json"
    assert seen.json() == {"name": "helper"}


def test_multipart_call_with_a_file_over_mqtt(any_env: tuple[TestClient, Standin]) -> None:
    client, standin = any_env
    standin.clear()
    standin.script("POST", "/containers/c_1/files", Reply(json={"id": "cfile_1"}))
    reply = client.request(
        "callEndpoint",
        {
            "method": "POST",
            "path": "/containers/c_1/files",
            "form": {"file": {"base64": base64.b64encode(PNG).decode(), "filename": "a.png"}},
        },
    )
    assert reply["status"] == "ok" and reply["data"] == {"id": "cfile_1"}, reply
    [seen] = standin.requests
    assert seen.content_type is not None and seen.content_type.startswith("multipart/form-data")
    part = seen.part("file")
    assert (part.filename, part.data) == ("a.png", PNG)


def test_binary_and_text_answers_over_mqtt(any_env: tuple[TestClient, Standin]) -> None:
    client, standin = any_env
    standin.clear()
    standin.script(
        "GET", "/files/f_1/content", Reply(body=PNG, content_type="application/octet-stream")
    )
    standin.script("GET", "/notes", Reply(text="plain words", content_type="text/plain"))
    binary = client.request("callEndpoint", {"method": "GET", "path": "/files/f_1/content"})
    assert binary["status"] == "ok", binary
    assert base64.b64decode(binary["data"]["base64"]) == PNG
    assert binary["data"]["content_type"] == "application/octet-stream"
    text = client.request("callEndpoint", {"method": "GET", "path": "/notes"})
    assert text["data"] == {"text": "plain words", "content_type": "text/plain"}


def test_streamed_answer_over_mqtt(any_env: tuple[TestClient, Standin]) -> None:
    client, standin = any_env
    standin.clear()
    chunks = [{"type": "agent.delta", "delta": "he"}, {"type": "agent.delta", "delta": "llo"}]
    standin.script(
        "POST",
        "/beta/agents/agent_1/runs",
        Reply(sse=[(None, json.dumps(c)) for c in chunks]),
    )
    stream_topic = client.topic("stream", "callEndpoint", "s1")
    client.subscribe(stream_topic)
    start = client.mark()
    payload = {
        "transaction": 9,
        "method": "POST",
        "path": "/beta/agents/agent_1/runs",
        "body": {"input": "hi", "stream": True},
    }
    reply = client.request_raw("callEndpoint", payload, suffix="s1")
    events = client.messages(stream_topic, after=start)
    assert [e.json() for e in events] == [
        {"transaction": 9, "seq": i, "event": None, "data": c} for i, c in enumerate(chunks)
    ]
    assert all(e.index < reply.index for e in events)
    final = reply.json()
    assert final["status"] == "ok" and final["data"] == chunks[-1], final
    [seen] = standin.requests
    assert seen.json() == {"input": "hi", "stream": True}


def test_refusals_over_mqtt_send_nothing_and_the_key_goes_nowhere_else(
    any_env: tuple[TestClient, Standin], other_host: Standin
) -> None:
    client, standin = any_env
    standin.clear()
    hostport = other_host.origin.split("://", 1)[1]
    attempts: list[tuple[dict[str, Any], str]] = [
        ({"method": "GET", "path": f"http://{hostport}/v1/models"}, "invalid_path"),
        ({"method": "GET", "path": f"//{hostport}/v1/models"}, "invalid_path"),
        ({"method": "GET", "path": f"/..//{hostport}/v1/models"}, "invalid_path"),
        ({"method": "GET", "path": f"/models?x=1#{hostport}"}, "invalid_path"),
        ({"method": "GET", "path": "/models", "headers": {"Host": hostport}}, "forbidden_header"),
        ({"method": "GET", "path": "/x", "headers": {"X-A": "1\r\nHost: e"}}, "invalid_header"),
        ({"method": "PROPFIND", "path": "/x"}, "invalid_method"),
    ]
    for payload, code in attempts:
        reply = client.request("callEndpoint", payload)
        assert reply["status"] == "error" and reply["error"]["code"] == code, (payload, reply)
        assert TEST_API_KEY not in json.dumps(reply)
    assert standin.requests == []
    assert other_host.requests == []

    # An allowed call reaches the service host, and only it, with the key.
    assert client.request("callEndpoint", {"method": "GET", "path": "/models"})["status"] == "ok"
    [seen] = standin.requests
    assert seen.headers["Authorization"] == f"Bearer {TEST_API_KEY}"
    assert other_host.requests == []


def test_access_rules_can_deny_it(
    tmp_path_factory: pytest.TempPathFactory, mosquitto: MosquittoBroker
) -> None:
    access = {"deny_methods": ["callEndpoint"]}
    with module_bridge(tmp_path_factory, mosquitto, "anyepdeny", access=access) as (
        _,
        client,
        standin,
    ):
        reply = client.request("callendpoint", {"method": "GET", "path": "/models"})
        assert reply["error"]["code"] == "method_not_allowed", reply
        assert client.request("listModels", {})["status"] == "ok"
        assert [r.path for r in standin.requests] == ["/models"]
