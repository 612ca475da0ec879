"""No secret reaches a device in any form, even from a service host that echoes the key.

A gateway or debug route may echo the credentials it was sent (OpenAI itself masks keys). The
stand-in here puts the key, an extra header's token and the api_base password into its answers
raw, JSON-escaped, `\\u`-escaped, percent-encoded and base64-encoded; the bridge's replies,
stream events, stats and log lines must hold none of them, whatever the reply options do.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from typing import Any
from urllib.parse import quote, quote_plus

import pytest
from support.bridge_runner import TEST_API_KEY, BridgeThread
from support.bridges import StartBridge
from support.mqtt_client import TestClient
from support.standin import RecordedRequest, Reply, Standin

TOKEN = "gw-token-0b7d3e19aa"
SIGNATURE = "sig/Tok+en=9c4e1b7a2f=="
"""A query-string style secret: `/`, `+` and `=` each encode differently by form."""
SECRETS = (TEST_API_KEY, TOKEN, SIGNATURE)


def forms(secret: str) -> dict[str, str]:
    """The ways a service host could show `secret`."""
    raw = secret.encode()
    return {
        "raw": secret,
        "json-escaped": json.dumps(secret).replace("/", "\\/")[1:-1],
        "unicode-escaped": "".join(f"\\u{ord(c):04x}" for c in secret),
        "percent": quote(secret, safe=""),
        "percent-path": quote(secret),  # `/` kept
        "percent-plus": quote_plus(secret),
        "percent-plus-all": quote_plus(secret, safe=""),
        "base64": base64.b64encode(raw).decode(),
        "base64+1": base64.b64encode(b"x" + raw).decode(),
        "base64+2": base64.urlsafe_b64encode(b"xy" + raw).decode(),
    }


def leaked(text: bytes) -> list[str]:
    """Which secret pieces `text` holds: 8 characters of a secret, or 12 from the inside of one
    of its other forms (a base64 form's first and last characters depend on its neighbours)."""
    found = []
    for secret in SECRETS:
        for i in range(len(secret) - 7):
            if secret[i : i + 8].encode() in text:
                found.append(f"{secret[:4]}... piece {i}")
                break
        for name, form in forms(secret).items():
            inside = form[4:-4]
            if any(inside[i : i + 12].encode() in text for i in range(len(inside) - 11)):
                found.append(f"{secret[:4]}... {name}")
    return found


def echo(request: RecordedRequest) -> Reply:
    """An answer that shows every credential of `request` in every form."""
    shown, escaped = {}, []
    for name, value in request.headers.items():
        for secret in (s for s in SECRETS if s in value):
            shown.update({f"{name}-{form}": text for form, text in forms(secret).items()})
            # And as JSON's own \u escapes in the body (a JSON reader gets the secret itself).
            escaped.append(f'"{name}-json-escapes": "{forms(secret)["unicode-escaped"]}"')
    body = json.dumps({"object": "list", "data": [], "echo": shown})
    body = body[:-1] + "".join(f", {pair}" for pair in escaped) + "}"
    return Reply(body=body.encode(), content_type="application/json")


@pytest.fixture
def echoing(start_bridge: StartBridge, standin: Standin) -> Iterator[BridgeThread]:
    standin.script("GET", "/models", echo)
    standin.script(
        "POST", "/audio/speech", lambda r: Reply(body=b"RIFF" + TEST_API_KEY.encode() * 3)
    )
    standin.script(
        "POST",
        "/chat/completions",
        Reply(
            sse=[
                (None, json.dumps({"choices": [{"delta": {"content": f"key {TEST_API_KEY} ok"}}]}))
            ]
        ),
    )
    bridge = start_bridge(
        service={"extra_headers": {"X-Gateway-Token": TOKEN, "X-Gateway-Signature": SIGNATURE}},
        extra={"homeassistant": {"stats_interval": 1}},
    )
    yield bridge
    for secret in SECRETS:
        assert secret not in bridge.log_text()
    assert leaked(bridge.log_text().encode()) == []


OPTIONS: list[dict[str, Any] | None] = [
    None,
    {"select": "echo"},
    {"select": "reverse(to_string(echo))", "format": "plain"},
    {"format": "plain", "max_bytes": 40, "select": "to_string(echo)"},
    {"format": "raw", "chunk_bytes": 128},
]


@pytest.mark.parametrize("options", OPTIONS)
def test_an_echoed_key_never_reaches_a_device_in_any_form(
    echoing: BridgeThread, client: TestClient, options: dict[str, Any] | None
) -> None:
    client.subscribe(f"{client.prefix}/#")
    payload: dict[str, Any] = {"transaction": 1}
    if options is not None:
        payload["_bridge"] = options
    reply = client.request_raw("listModels", payload)
    assert reply.payload  # an answer, not silence
    everything = b"\n".join(m.payload for m in client.messages(f"{client.prefix}/#"))
    assert leaked(everything) == []


def test_a_binary_answer_and_a_plain_stream_hold_no_key(
    echoing: BridgeThread, client: TestClient
) -> None:
    client.subscribe(f"{client.prefix}/#")
    speech = client.request("createSpeech", {"model": "tts-1", "voice": "a", "input": "x"})
    assert speech["status"] == "ok"
    chat = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": True}
    plain = {"format": "plain", "max_bytes": 32}  # pieces smaller than the key
    client.request_raw("createChatCompletion", {**chat, "_bridge": plain}, timeout=20)
    everything = b"\n".join(m.payload for m in client.messages(f"{client.prefix}/#"))
    assert leaked(everything) == []
    assert b"**********" in everything


def _delta_stream(pieces: list[str]) -> Reply:
    """A chat stream whose content deltas are `pieces`, each in its own event."""
    chunk = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "model": "m"}
    return Reply(
        sse=[
            (None, json.dumps({**chunk, "choices": [{"index": 0, "delta": {"content": piece}}]}))
            for piece in pieces
        ]
    )


KEY = TEST_API_KEY
SPLITS = {
    "halves": ["the key is ", KEY[:14], KEY[14:] + " ok"],
    "thirds": ["key ", KEY[:5], KEY[5:17], KEY[17:], " end"],
    "one by one": ["key ", *KEY, " end"],
    "a short head": ["key " + KEY[:3], KEY[3:] + " end"],
}


@pytest.mark.parametrize("pieces", SPLITS.values(), ids=SPLITS.keys())
@pytest.mark.parametrize("options", [None, {"format": "plain"}], ids=["events", "plain"])
def test_a_key_split_over_streamed_events_never_reaches_a_device(
    echoing: BridgeThread,
    standin: Standin,
    client: TestClient,
    pieces: list[str],
    options: dict[str, Any] | None,
) -> None:
    standin.script("POST", "/chat/completions", _delta_stream(pieces))
    client.subscribe(f"{client.prefix}/#")
    chat: dict[str, Any] = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    chat["stream"] = True
    if options is not None:
        chat["_bridge"] = options
    client.request_raw("createChatCompletion", chat, timeout=20)
    messages = client.messages(f"{client.prefix}/#")
    everything = b"\n".join(m.payload for m in messages)
    assert leaked(everything) == []
    # What a device puts together from the pieces holds no more of the key than each piece.
    shown = _streamed_text([m.payload for m in messages])
    assert leaked(shown.encode()) == [], shown
    assert "**********" in shown
    assert shown.endswith((" end", " ok")), shown  # the text after the key still arrives


def _streamed_text(payloads: list[bytes]) -> str:
    """The answer text a device assembles from stream messages (events' deltas, plain pieces)."""
    text = []
    for payload in payloads:
        try:
            message = json.loads(payload)
        except ValueError:
            text.append(payload.decode())  # a plain piece
            continue
        if isinstance(message, dict) and "seq" in message:
            for choice in message["data"].get("choices", []):
                text.append(choice["delta"].get("content") or "")
        elif not isinstance(message, dict):
            text.append(payload.decode())
    return "".join(text)


def test_a_key_cut_by_the_service_host_reaches_neither_stats_nor_log(
    echoing: BridgeThread, standin: Standin, client: TestClient
) -> None:
    message = f"Incorrect API key provided: {KEY}. Your key starts {KEY[:14]}"
    standin.script("GET", "/models", Reply(status=401, json={"error": {"message": message}}))
    client.subscribe(f"{client.prefix}/#")
    reply = client.request("listModels", {})
    assert reply["error"]["code"] == "upstream_error"
    stats = client.wait_for_one(
        f"{client.prefix}/bridge/+/stats",
        timeout=10,
        where=lambda m: json.loads(m.payload)["errors_total"] >= 1,
    )
    assert "Incorrect API key provided: **********" in stats.payload.decode()
    everything = b"\n".join(m.payload for m in client.messages(f"{client.prefix}/#"))
    assert leaked(everything) == []  # the error reply too; the log is checked by the fixture
