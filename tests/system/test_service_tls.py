"""An https service host, end to end: a bridge process trusting a CA made here (SSL_CERT_FILE, as
OpenSSL reads it) sends the same request over the lean path and over aiohttp, and one that does
not trust it refuses the certificate with the same error on both."""

from __future__ import annotations

import ssl
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trustme
from support.bridge_runner import TEST_API_KEY, BridgeProcess, make_config
from support.bridges import HTTP_PATHS
from support.broker import MosquittoBroker
from support.mqtt_client import TestClient
from support.standin import Reply, Standin

CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def tls_standin(ca: trustme.CA) -> Iterator[Standin]:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(context)
    with Standin(tls=context) as standin:
        standin.set_default(Reply(json={"object": "chat.completion", "choices": []}))
        yield standin


def ask(
    tmp_path: Path,
    mosquitto: MosquittoBroker,
    standin: Standin,
    prefix: str,
    http_path: str,
    env: dict[str, str],
) -> Any:
    """The reply to one chat request through a bridge process on `http_path`."""
    folder = tmp_path / http_path
    folder.mkdir()
    path, bridge_env = make_config(
        folder,
        broker_port=mosquitto.port,
        api_base=standin.url,
        prefix=prefix,
        service={"lean_http": HTTP_PATHS[http_path], "max_retries": 0},
    )
    proc = BridgeProcess(path, {**bridge_env, **env}, folder / "bridge.log").start()
    try:
        with TestClient.for_broker(mosquitto, prefix=prefix) as client:
            return client.request("createChatCompletion", {"transaction": 1, **CHAT}, timeout=20)
    finally:
        proc.close()
        assert TEST_API_KEY not in proc.log_text()


def test_both_paths_send_the_same_request_over_tls(
    tmp_path: Path, mosquitto: MosquittoBroker, tls_standin: Standin, ca: trustme.CA
) -> None:
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    seen = {}
    for http_path in sorted(HTTP_PATHS):
        tls_standin.clear()
        env = {"SSL_CERT_FILE": str(ca_file)}
        reply = ask(tmp_path, mosquitto, tls_standin, f"tls-{http_path}", http_path, env)
        assert reply["status"] == "ok", reply
        [request] = tls_standin.requests
        assert request.headers["Authorization"] == f"Bearer {TEST_API_KEY}"
        seen[http_path] = (request.raw_path, list(request.headers.items()), request.body)
    assert seen["lean"] == seen["aiohttp"]


def test_an_untrusted_certificate_is_refused_alike_on_both_paths(
    tmp_path: Path, mosquitto: MosquittoBroker, tls_standin: Standin
) -> None:
    errors = {}
    for http_path in sorted(HTTP_PATHS):
        reply = ask(tmp_path, mosquitto, tls_standin, f"untrusted-{http_path}", http_path, {})
        assert reply["status"] == "error", reply
        errors[http_path] = (reply["error"]["code"], reply["error"]["message"])
    assert errors["lean"] == errors["aiohttp"]
    code, message = errors["lean"]
    assert code == "upstream_unavailable"
    assert "TLS certificate not trusted" in message
    assert tls_standin.requests == []
