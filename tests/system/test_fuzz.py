"""Hostile input: random topics and payloads through the real bridge, one known reply for each."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support.bridge_runner import TEST_API_KEY, BridgeThread
from support.bridges import module_bridge
from support.broker import MosquittoBroker
from support.mqtt_client import TestClient
from support.standin import Standin

from bridge.errors import ERROR_CODES
from bridge.methods.catalog import default_table

PREFIX = f"fuzz-{uuid.uuid4().hex[:8]}"
METHOD_NAMES = [op.name for op in default_table().operations]

# Unicode noncharacters: U+FDD0..U+FDEF and the last two code points of every plane.
NONCHARACTERS = "".join(chr(c) for c in range(0xFDD0, 0xFDF0)) + "".join(
    chr(plane + last) for plane in range(0, 0x110000, 0x10000) for last in (0xFFFE, 0xFFFF)
)
# Topic levels: any text a broker accepts in a topic name (no wildcards or level separator; no
# control characters or noncharacters, on which Mosquitto drops the publisher's connection).
levels = st.text(
    alphabet=st.characters(
        blacklist_characters="/+#" + NONCHARACTERS, blacklist_categories=("Cs", "Cc")
    ),
    max_size=12,
)
methods = st.one_of(st.sampled_from(METHOD_NAMES), levels)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=20,
)
payloads = st.one_of(
    st.binary(max_size=200),
    st.dictionaries(
        st.sampled_from(["model", "thread_id", "file_id", "input", "messages", "x", "transaction"])
        | st.text(max_size=8),
        json_values,
        max_size=6,
    ).map(lambda d: json.dumps(d).encode()),
    json_values.map(lambda v: json.dumps(v).encode()),
    st.integers(1, 3000).map(lambda n: b"[" * n + b"]" * n),
    st.integers(1, 3000).map(lambda n: b'{"a":' * n + b"1" + b"}" * n),
)


@pytest.fixture(scope="module")
def fuzz_env(
    tmp_path_factory: pytest.TempPathFactory, mosquitto: MosquittoBroker
) -> Iterator[tuple[BridgeThread, TestClient, Standin]]:
    with module_bridge(
        tmp_path_factory,
        mosquitto,
        PREFIX,
        service={"max_retries": 0},
        limits={"max_request_bytes": 16384},
    ) as (bridge, client, standin):
        client.subscribe(f"{PREFIX}/response/#")
        yield bridge, client, standin
    assert "Traceback" not in bridge.log_text()


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(method=methods, middle=st.lists(levels, max_size=3), payload=payloads)
def test_any_input_gets_exactly_one_known_reply(
    fuzz_env: tuple[BridgeThread, TestClient, Standin],
    method: str,
    middle: list[str],
    payload: bytes,
) -> None:
    _, client, _ = fuzz_env
    tag = uuid.uuid4().hex
    tail = "/".join([method, *middle, tag])
    position = client.mark()
    client.publish(f"{PREFIX}/request/{tail}", payload)
    reply_topic = f"{PREFIX}/response/{tail}"
    [reply] = client.wait_for(reply_topic, 1, timeout=10, after=position)
    body: dict[str, Any] = reply.json()
    assert TEST_API_KEY.encode() not in reply.payload
    assert body["status"] in ("ok", "error")
    if body["status"] == "error":
        assert body["error"]["code"] in ERROR_CODES
        assert body["error"]["code"] != "internal_error", body
        assert isinstance(body["error"]["message"], str)
    # Exactly one: a second reply to the same request would arrive right behind the first.
    marker = client.mark()
    client.publish(f"{PREFIX}/request/listModels/{tag}-probe", {})
    client.wait_for(f"{PREFIX}/response/listModels/{tag}-probe", 1, timeout=10, after=marker)
    assert len(client.messages(reply_topic)) == 1
