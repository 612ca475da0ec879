"""Every operation of the method table over MQTT: its example becomes the right HTTP call."""

from __future__ import annotations

import base64
from collections.abc import Iterator
from typing import Any
from urllib.parse import unquote

import pytest
from support.bridge_runner import TEST_API_KEY
from support.bridges import module_bridge
from support.broker import MosquittoBroker
from support.mqtt_client import TestClient
from support.standin import Reply, Standin

from bridge.methods.catalog import default_table
from bridge.methods.describe import example_payload
from bridge.methods.model import Operation

PREFIX = "every"
FILE_B64 = base64.b64encode(b"RIFF\x24\x00\x00\x00WAVEfmt " + bytes(range(64))).decode()
OPERATIONS = default_table().operations


@pytest.fixture(scope="module")
def every_env(
    tmp_path_factory: pytest.TempPathFactory, mosquitto: MosquittoBroker, http_path: str
) -> Iterator[tuple[TestClient, Standin]]:
    with module_bridge(tmp_path_factory, mosquitto, PREFIX, http_path) as (_, client, standin):
        yield client, standin


def expected_path(op: Operation, payload: dict[str, object]) -> str:
    """The operation's path, decoded, with the example's ids (one segment each) filled in."""
    path = op.path
    for param in op.path_params:
        value = str(payload[param])
        assert "/" not in value, (op.name, param, value)
        path = path.replace("{" + param + "}", value)
    return path


def with_real_files(op: Operation, payload: dict[str, Any]) -> dict[str, Any]:
    """The example with its `<base64 bytes>` placeholders replaced by real base64."""
    for field in op.file_fields:
        if isinstance(payload.get(field), dict):
            payload[field] = {**payload[field], "base64": FILE_B64}
    return payload


def test_every_operation_reaches_the_api_over_mqtt(every_env: tuple[TestClient, Standin]) -> None:
    client, standin = every_env
    standin.set_default(Reply(json={"object": "stand-in"}))
    failures: list[str] = []
    for op in OPERATIONS:
        payload = with_real_files(op, example_payload(op))
        standin.clear()
        reply = client.request(op.name, {"transaction": op.name, **payload})
        if reply.get("status") != "ok" or reply.get("transaction") != op.name:
            failures.append(f"{op.name}: {reply}")
            continue
        [seen] = standin.requests
        path, _, fixed_query = expected_path(op, payload).partition("?")
        if (seen.method, unquote(seen.path)) != (op.verb, path):
            failures.append(f"{op.name}: {seen.method} {seen.path}, expected {op.verb} {path}")
        if fixed_query and fixed_query not in seen.query_string.split("&"):
            failures.append(f"{op.name}: query {seen.query_string!r} lacks {fixed_query!r}")
        if seen.headers.get("Authorization") != f"Bearer {TEST_API_KEY}":
            failures.append(f"{op.name}: no bearer key")
        if op.request_kind == "multipart" and op.file_fields and not op.json_alternative:
            content_type = seen.content_type or ""
            if not content_type.startswith("multipart/form-data"):
                failures.append(f"{op.name}: sent {content_type or 'no body'}, not multipart")
    assert failures == [], "\n".join(failures)
