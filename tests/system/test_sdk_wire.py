"""Over MQTT, the ten operations with array query or header parameters reach the stand-in exactly
as the official SDKs send them: `name[]=` arrays, `betas` as the OpenAI-Beta header, JSON Accept."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from support.bridge_runner import TEST_API_KEY
from support.bridges import module_bridge
from support.broker import MosquittoBroker
from support.mqtt_client import TestClient
from support.standin import Reply, Standin

PREFIX = "sdkwire"
INCLUDES = ["message.output_text.logprobs", "file_search_call.results"]
INCLUDE_QUERY = "include[]=message.output_text.logprobs&include[]=file_search_call.results"


@pytest.fixture(scope="module")
def wire_env(
    tmp_path_factory: pytest.TempPathFactory, mosquitto: MosquittoBroker, http_path: str
) -> Iterator[tuple[TestClient, Standin]]:
    with module_bridge(tmp_path_factory, mosquitto, PREFIX, http_path) as (_, client, standin):
        standin.set_default(Reply(json={"object": "stand-in"}))
        yield client, standin


# (method, payload, HTTP verb, path, exact query string)
CASES: list[tuple[str, dict[str, Any], str, str, str]] = [
    (
        "getResponse",
        {"response_id": "resp_1", "include": INCLUDES},
        "GET",
        "/responses/resp_1",
        INCLUDE_QUERY,
    ),
    (
        "listInputItems",
        {"response_id": "resp_1", "limit": 2, "include[]": INCLUDES},
        "GET",
        "/responses/resp_1/input_items",
        "limit=2&" + INCLUDE_QUERY,
    ),
    (
        "beta_getResponse",
        {"response_id": "resp_1", "include": INCLUDES},
        "GET",
        "/responses/resp_1",
        "beta=true&" + INCLUDE_QUERY,
    ),
    (
        "createConversationItems",
        {"conversation_id": "conv_1", "include[]": INCLUDES, "items": [{"type": "message"}]},
        "POST",
        "/conversations/conv_1/items",
        INCLUDE_QUERY,
    ),
    (
        "listConversationItems",
        {"conversation_id": "conv_1", "include": INCLUDES, "order": "asc"},
        "GET",
        "/conversations/conv_1/items",
        "order=asc&" + INCLUDE_QUERY,
    ),
    (
        "getConversationItem",
        {
            "conversation_id": "conv_1",
            "item_id": "msg_1",
            "include": ["web_search_call.action.sources"],
        },
        "GET",
        "/conversations/conv_1/items/msg_1",
        "include[]=web_search_call.action.sources",
    ),
    (
        "list-users",
        {"emails": ["a@example.com", "b+c@example.com"], "limit": 5},
        "GET",
        "/organization/users",
        "limit=5&emails[]=a%40example.com&emails[]=b%2Bc%40example.com",
    ),
    (
        "usage-completions",
        {
            "start_time": 1730419200,
            "group_by": ["project_id", "model"],
            "models": ["gpt-4o"],
            "project_ids": ["proj_1", "proj_2"],
        },
        "GET",
        "/organization/usage/completions",
        "start_time=1730419200&project_ids[]=proj_1&project_ids[]=proj_2&models[]=gpt-4o"
        "&group_by[]=project_id&group_by[]=model",
    ),
    (
        "usage-costs",
        {"start_time": 1730419200, "group_by": "line_item", "project_ids[]": ["proj_1"]},
        "GET",
        "/organization/costs",
        "start_time=1730419200&project_ids[]=proj_1&group_by[]=line_item",
    ),
    (
        "getCertificate",
        {"certificate_id": "cert_1", "include": ["content"]},
        "GET",
        "/organization/certificates/cert_1",
        "include[]=content",
    ),
]


@pytest.mark.parametrize(
    ("method", "payload", "verb", "path", "query"), CASES, ids=[c[0] for c in CASES]
)
def test_array_query_parameters_go_as_brackets(
    wire_env: tuple[TestClient, Standin],
    method: str,
    payload: dict[str, Any],
    verb: str,
    path: str,
    query: str,
) -> None:
    client, standin = wire_env
    standin.clear()
    reply = client.request(method, {"transaction": method, **payload})
    assert reply["status"] == "ok", reply
    [seen] = standin.requests
    assert (seen.method, seen.path, seen.query_string) == (verb, path, query)
    assert seen.headers["Authorization"] == f"Bearer {TEST_API_KEY}"
    assert seen.headers["Accept"] == "application/json"
    assert "OpenAI-Beta" not in seen.headers
    if verb == "POST":
        assert seen.headers["Content-Type"] == "application/json"
        assert seen.json() == {"items": [{"type": "message"}]}
    else:
        assert seen.body == b""


def test_betas_become_the_openai_beta_header_on_beta_responses(
    wire_env: tuple[TestClient, Standin],
) -> None:
    client, standin = wire_env
    standin.clear()
    body = {"model": "gpt-5", "input": "hi"}
    payload = {"transaction": 1, **body, "betas": ["responses_multi_agent=v1", "other=v2"]}
    assert client.request("beta_createResponse", payload)["status"] == "ok"
    [seen] = standin.requests
    assert (seen.method, seen.path, seen.query_string) == ("POST", "/responses", "beta=true")
    assert seen.headers.getall("OpenAI-Beta") == ["responses_multi_agent=v1,other=v2"]
    assert seen.headers["Accept"] == "application/json"
    assert seen.json() == body

    standin.clear()
    payload = {
        "response_id": "resp_1",
        "include": ["content"],
        "openai-beta": "responses_multi_agent=v1",
    }
    assert client.request("beta_getResponse", payload)["status"] == "ok"
    [seen] = standin.requests
    assert seen.query_string == "beta=true&include[]=content"
    assert seen.headers.getall("OpenAI-Beta") == ["responses_multi_agent=v1"]
    assert seen.body == b""


def test_bad_header_parameter_values_are_refused_before_any_request(
    wire_env: tuple[TestClient, Standin],
) -> None:
    client, standin = wire_env
    standin.clear()
    for betas in ({"a": 1}, ["x\r\nX-Evil: 1"]):
        reply = client.request("beta_getResponse", {"response_id": "r", "betas": betas})
        assert reply["status"] == "error" and reply["error"]["code"] == "invalid_parameter", reply
    both = client.request("getResponse", {"response_id": "r", "include": ["a"], "include[]": ["b"]})
    assert both["error"]["code"] == "invalid_parameter"
    assert standin.requests == []


def test_binary_operations_do_not_ask_for_json(wire_env: tuple[TestClient, Standin]) -> None:
    client, standin = wire_env
    standin.clear()
    standin.set_default(Reply(body=b"bytes", content_type="application/octet-stream"))
    try:
        assert client.request("downloadFile", {"file_id": "file-1"})["status"] == "ok"
    finally:
        standin.set_default(Reply(json={"object": "stand-in"}))
    [seen] = standin.requests
    assert seen.headers.get("Accept") != "application/json"
