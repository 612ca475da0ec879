"""All 50 methods of node-red-openai-api 0.3.9 over MQTT: the HTTP request each one produces."""

from __future__ import annotations

import base64
from collections.abc import Iterator
from typing import Any

import pytest
from support import openapi_spec
from support.bridge_runner import TEST_API_KEY
from support.bridges import module_bridge
from support.broker import MosquittoBroker
from support.mqtt_client import TestClient
from support.standin import Reply, Standin

from tools.tablegen.specfacts import SEED_EXAMPLES, SEED_GROUPS

SEED_NAMES = sorted(name for _, names in SEED_GROUPS for name in names.split())
PREFIX = "seed"
WAV = b"RIFF\x24\x00\x00\x00WAVEfmt " + bytes(range(256))


@pytest.fixture(scope="module")
def seed_env(
    tmp_path_factory: pytest.TempPathFactory, mosquitto: MosquittoBroker
) -> Iterator[tuple[TestClient, Standin]]:
    with module_bridge(tmp_path_factory, mosquitto, PREFIX) as (_, client, standin):
        yield client, standin


def payload_for(name: str, spec: dict[str, Any]) -> dict[str, Any]:
    """The seed's own example payload, with ids for path parameters and files as base64."""
    example = SEED_EXAMPLES.get(name) or {}
    payload: dict[str, Any] = {}
    payload.update(example.get("json") or {})
    payload.update(example.get("query") or {})
    payload.update(example.get("form") or {})
    for param in spec["path_params"]:
        payload[param] = f"{param}-1"
    for field in example.get("files") or []:
        payload[field] = {"base64": base64.b64encode(WAV).decode(), "filename": f"{field}.wav"}
    if name == "createFile":
        payload[(example.get("files") or ["file"])[0]]["filename"] = "data.jsonl"
    return payload


@pytest.mark.parametrize("name", SEED_NAMES, ids=str)
def test_seed_method_sends_what_the_spec_describes(
    seed_env: tuple[TestClient, Standin], name: str
) -> None:
    client, standin = seed_env
    # The request the seed method's operation describes: in the current spec, else in 2024-02's.
    target = openapi_spec.operation(name)
    example = SEED_EXAMPLES.get(name) or {}
    standin.clear()
    standin.set_default(Reply(json={"object": "standin", "ok": True}))
    payload = payload_for(name, target)
    reply = client.request(name, {"transaction": name, **payload}, suffix=name)
    assert reply["status"] == "ok", reply
    assert reply["method"] == name and reply["transaction"] == name

    [seen] = standin.requests
    expected_path = target["path"]
    for param in target["path_params"]:
        expected_path = expected_path.replace("{" + param + "}", f"{param}-1")
    assert (seen.method, seen.path) == (target["method"], expected_path)
    assert seen.headers["Authorization"] == f"Bearer {TEST_API_KEY}"
    if openapi_spec.operations(openapi_spec.RETIRED).get(name, target)["beta_header"]:
        assert seen.headers["OpenAI-Beta"] == "assistants=v2"
    else:
        assert "OpenAI-Beta" not in seen.headers

    query = dict(seen.query)
    for key, value in (example.get("query") or {}).items():
        assert query[key] == str(value)
    body_expected = {
        k: v
        for k, v in payload.items()
        if k not in target["path_params"] and k not in {q for q in query}
    }
    content_types = target["request_content_types"]
    if content_types and content_types[0] == "multipart/form-data":
        assert seen.content_type is not None
        assert seen.content_type.startswith("multipart/form-data")
        for field in example.get("files") or []:
            if field in payload:
                part = seen.part(field)
                assert part.data == WAV and part.filename == payload[field]["filename"]
        form = dict(seen.form())
        for key, value in (example.get("form") or {}).items():
            assert form[key] == str(value)
    elif target["method"] == "POST" and content_types[:1] == ["application/json"]:
        assert seen.headers["Content-Type"] == "application/json"
        assert seen.json() == body_expected
    else:
        assert seen.body == b""
        assert body_expected == {}
