"""The realtime wire contract: topics, session names, open options, URLs, event types."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import SecretStr
from support.openapi_spec import LATEST, deref, document

from bridge.config import ServiceConfig
from bridge.errors import BadOpen, BadSessionName
from bridge.pipeline.build import RequestBuilder
from bridge.realtime import model


@pytest.mark.parametrize("name", ["", "+", "#", "a+b", "x#", ".", "..", "-x", ".hidden", "a" * 65])
def test_unusable_session_names_are_refused(name: str) -> None:
    assert not model.valid_session(name)
    with pytest.raises(BadSessionName):
        model.parse_topic("p", f"p/request/realtime/{name}/audio")


def test_a_realtime_topic_parses_and_others_are_not_realtime() -> None:
    assert model.parse_topic("p", "p/request/realtime/kitchen-1/audio") == model.RealtimeTopic(
        "realtime", "kitchen-1", "audio"
    )
    assert model.parse_topic("p", "p/request/createChatCompletion") is None
    assert model.parse_topic("p", "q/request/realtime/a/open") is None
    for bad in ("p/request/realtime/a", "p/request/realtime/a/b/open", "p/request/realtime/a/x"):
        with pytest.raises(BadSessionName):
            model.parse_topic("p", bad)


def test_open_options_are_checked() -> None:
    opts = model.parse_open({"outputs": ["audio"], "chunk_bytes": 320}, "gpt-realtime")
    assert opts.model == "gpt-realtime" and opts.outputs == {"audio", "state"}
    assert opts.chunk_bytes == 320
    opts = model.parse_open(
        {"tools": ["a", "b", "a"], "allow_dangerous": ["b"], "dry_run": True}, "m"
    )
    assert opts.tools == ("a", "b") and opts.allow_dangerous == {"b"} and opts.dry_run
    bad: Any
    for bad in (
        [],
        {"x": 1},
        {"model": "a b"},
        {"outputs": ["video"]},
        {"chunk_bytes": -1},
        {"chunk_bytes": True},
        {"audio_format": "mp3"},
        {"session": "x"},
        {"tools": "kitchen_light"},
        {"tools": ["a", 1]},
        {"tools": [f"t{n}" for n in range(33)]},
        {"dry_run": True},
        {"allow_dangerous": ["front_door"]},
        {"tools": ["a"], "dry_run": "yes"},
    ):
        with pytest.raises(BadOpen):
            model.parse_open(bad, "m")


def test_the_sessions_declared_audio_format_decides_rates_and_chunks() -> None:
    pcmu = {"audio": {"input": {"format": {"type": "audio/pcmu"}}}}
    opts = model.parse_open({"session": pcmu, "chunk_bytes": 333}, "m")
    assert (opts.audio_format, opts.output_format, opts.chunk_bytes) == (
        "audio/pcmu",
        "audio/pcmu",
        333,
    )
    assert model.BYTES_PER_SECOND[opts.audio_format] == 8_000
    # PCM16 pieces keep whole samples: 333 -> 332 bytes.
    out_pcm = {"audio": {"output": {"format": {"type": "audio/pcm", "rate": 24000}}}}
    assert opts.declaring(out_pcm).chunk_bytes == 332
    assert opts.declaring(out_pcm).audio_format == "audio/pcmu"
    assert model.parse_open({"chunk_bytes": 1}, "m").chunk_bytes == 2
    legacy = model.parse_open({"session": {"input_audio_format": "g711_alaw"}}, "m")
    assert (legacy.audio_format, legacy.output_format) == ("g711_alaw", "g711_alaw")
    assert model.declared_formats({"audio": {"input": {"format": {"type": "video"}}}}) == (
        None,
        None,
    )
    assert opts.declaring(None) is opts
    with pytest.raises(BadOpen, match="differs from the session's audio/pcmu"):
        model.parse_open({"session": pcmu, "audio_format": "pcm16"}, "m")
    assert model.parse_open({"session": pcmu, "audio_format": "g711_ulaw"}, "m").chunk_bytes == 0


def test_chunks_cut_in_order_and_keep_every_byte() -> None:
    data = bytes(range(256)) * 5
    assert b"".join(model.chunks(data, 333)) == data
    assert max(map(len, model.chunks(data, 333))) == 333
    assert model.chunks(data, 0) == [data]


def test_upstream_urls_map_the_scheme_and_carry_the_key_as_configured() -> None:
    url = model.upstream_url("https://api.openai.com/v1", "realtime", "gpt-realtime")
    assert url == "wss://api.openai.com/v1/realtime?model=gpt-realtime"
    assert model.upstream_url("http://h:1/v1", "responsesWebSocket", "") == "ws://h:1/v1/responses"
    assert model.upstream_url("http://h/v1", "realtimeTranscription", "x").endswith(
        "/realtime?intent=transcription"
    )
    azure = ServiceConfig(
        api_base="https://res.openai.azure.com/openai/v1",
        api_key=SecretStr("k-123456"),
        api_key_name="api-key",
    )
    url, headers = RequestBuilder(azure).websocket_request(
        model.upstream_url(azure.api_base, "realtime", "my-deployment")
    )
    assert url == "wss://res.openai.azure.com/openai/v1/realtime?model=my-deployment"
    assert headers["api-key"] == "k-123456" and "Authorization" not in headers
    in_query = azure.model_copy(update={"api_key_in_query": True})
    url, headers = RequestBuilder(in_query).websocket_request("wss://h/v1/realtime?model=m")
    assert url == "wss://h/v1/realtime?model=m&api-key=k-123456" and "api-key" not in headers


def _event_types(name: str) -> set[str]:
    spec = document(LATEST)

    def type_enum(node: Any) -> list[str]:
        node = deref(spec, node)
        found = node.get("properties", {}).get("type", {}).get("enum")
        if found:
            return list(found)
        return [t for part in node.get("allOf", []) for t in type_enum(part)]

    return {t for ref in spec["components"]["schemas"][name]["anyOf"] for t in type_enum(ref)}


def test_the_client_event_types_are_the_specs() -> None:
    assert _event_types("RealtimeClientEvent") == model.REALTIME_CLIENT_EVENTS
    assert _event_types("ResponsesClientEvent") == model.CLIENT_EVENTS["responsesWebSocket"]
    server = _event_types("RealtimeServerEvent")
    assert model.AUDIO_DELTAS & server == {"response.output_audio.delta"}
    assert "response.output_audio_transcript.delta" in server
