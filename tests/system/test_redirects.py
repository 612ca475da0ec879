"""Redirects from the service host: followed as the SDKs do, the key never leaving its origin."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from support.bridge_runner import TEST_API_KEY, BridgeThread
from support.bridges import module_bridge
from support.broker import MosquittoBroker
from support.mqtt_client import TestClient
from support.standin import Reply, Standin

PREFIX = "redirects"
GATEWAY = {"X-Gateway-Token": "gw-token-5e2f9a7c31"}


@pytest.fixture(scope="module")
def other_origin() -> Iterator[Standin]:
    """A second HTTP server, another origin than the service host's."""
    with Standin() as other:
        yield other


@pytest.fixture(scope="module")
def bridge_env(
    tmp_path_factory: pytest.TempPathFactory, mosquitto: MosquittoBroker, http_path: str
) -> Iterator[tuple[BridgeThread, TestClient, Standin]]:
    # A custom key header (Azure's): aiohttp's own redirect handling would forward it anywhere.
    with module_bridge(
        tmp_path_factory,
        mosquitto,
        PREFIX,
        http_path,
        service={"api_key_name": "api-key", "extra_headers": GATEWAY},
    ) as (bridge, client, standin):
        yield bridge, client, standin


@pytest.fixture
def env(bridge_env: tuple[BridgeThread, TestClient, Standin]) -> tuple[TestClient, Standin]:
    return bridge_env[1], bridge_env[2]


def test_same_origin_redirect_keeps_method_body_and_key(env: tuple[TestClient, Standin]) -> None:
    client, standin = env
    standin.reset()
    standin.script(
        "POST", "/embeddings", Reply(status=307, headers={"Location": f"{standin.url}/moved"})
    )
    standin.script("POST", "/moved", Reply(json={"object": "list", "data": []}))
    reply = client.request("createEmbedding", {"model": "m", "input": "hi"})
    assert reply["status"] == "ok", reply
    first, second = standin.requests
    assert (second.method, second.path) == ("POST", "/moved")
    assert second.headers["api-key"] == TEST_API_KEY
    assert second.headers["X-Gateway-Token"] == GATEWAY["X-Gateway-Token"]
    assert second.json() == first.json() == {"model": "m", "input": "hi"}


def test_cross_origin_redirect_drops_the_key(
    env: tuple[TestClient, Standin], other_origin: Standin
) -> None:
    client, standin = env
    standin.reset()
    other_origin.reset()
    standin.script(
        "POST", "/embeddings", Reply(status=307, headers={"Location": f"{other_origin.url}/x"})
    )
    other_origin.set_default(Reply(json={"object": "list", "data": []}))
    reply = client.request("createEmbedding", {"model": "m", "input": "hi"})
    assert reply["status"] == "ok", reply
    [elsewhere] = other_origin.requests
    assert (elsewhere.method, elsewhere.path) == ("POST", "/x")
    assert elsewhere.json() == {"model": "m", "input": "hi"}
    assert "api-key" not in elsewhere.headers
    assert "Authorization" not in elsewhere.headers
    assert TEST_API_KEY not in repr(elsewhere.headers)
    # Extra headers may carry a gateway's credential: dropped like the key.
    assert "X-Gateway-Token" not in elsewhere.headers
    assert GATEWAY["X-Gateway-Token"] not in repr(elsewhere.headers)


def test_see_other_becomes_a_get_without_body(env: tuple[TestClient, Standin]) -> None:
    client, standin = env
    standin.reset()
    standin.script(
        "POST", "/embeddings", Reply(status=303, headers={"Location": f"{standin.url}/result"})
    )
    standin.script("GET", "/result", Reply(json={"object": "list", "data": []}))
    reply = client.request("createEmbedding", {"model": "m", "input": "hi"})
    assert reply["status"] == "ok", reply
    _, second = standin.requests
    assert (second.method, second.path, second.body) == ("GET", "/result", b"")
    assert "Content-Type" not in second.headers


def test_a_redirect_loop_ends_in_an_error_reply(env: tuple[TestClient, Standin]) -> None:
    client, standin = env
    standin.reset()
    standin.set_default(Reply(status=302, headers={"Location": f"{standin.url}/again"}))
    reply = client.request("listModels", {})
    assert (reply["status"], reply["error"]["code"]) == ("error", "upstream_error"), reply
    assert reply["error"]["http_status"] == 302
    assert len(standin.requests) == 11  # the request and the ten redirects aiohttp also allows


@pytest.mark.parametrize(
    "location",
    [
        "http://[::1",  # garbage: an unclosed IPv6 host
        "http://h:99999/",  # a port out of range
        "http://:80/",  # no host
        "https://",
        "ftp://files.example/x",  # another scheme
        "file:///etc/passwd",
        "javascript:alert(1)",
        "mailto:a@b.example",
    ],
)
def test_a_redirect_that_cannot_be_followed_is_named_not_an_internal_error(
    bridge_env: tuple[BridgeThread, TestClient, Standin], location: str
) -> None:
    bridge, client, standin = bridge_env
    standin.reset()
    standin.set_default(Reply(status=302, headers={"Location": location}))
    reply = client.request("listModels", {})
    error = reply["error"]
    assert (reply["status"], error["code"], error["retryable"]) == ("error", "bad_redirect", False)
    assert location[:12] in error["message"]
    assert len(standin.requests) == 1  # nothing sent anywhere else, not asked again
    assert "Traceback" not in bridge.log_text()


def test_a_relative_redirect_is_followed_on_the_same_origin(
    env: tuple[TestClient, Standin],
) -> None:
    client, standin = env
    standin.reset()
    standin.script("GET", "/models", Reply(status=301, headers={"Location": "../v1/listed"}))
    standin.script("GET", "/listed", Reply(json={"object": "list", "data": []}))
    reply = client.request("listModels", {})
    assert reply["status"] == "ok", reply
    assert standin.requests[1].headers["api-key"] == TEST_API_KEY
