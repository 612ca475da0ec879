"""What the bridge tells a new user in its log: start-up, requests, errors, reconnects, stopping."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from support.bridge_runner import BridgeThread, make_config
from support.broker import MosquittoBroker, free_port
from support.lines import OutputLines
from support.mqtt_client import TestClient
from support.standin import Reply, Standin

from bridge.config import load_config
from bridge.runtime.startup import is_local_host, missing_key_warning

REPO = Path(__file__).resolve().parents[2]


def _events(log: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in log.splitlines() if line.startswith("{")]


def _one(log: str, event: str) -> dict[str, Any]:
    (found,) = [e for e in _events(log) if e.get("event") == event]
    return found


# --- start-up ------------------------------------------------------------------------------------


def test_start_summary_instead_of_the_config_dump(
    tmp_path: Path, mosquitto: MosquittoBroker, standin: Standin, topic_prefix: str
) -> None:
    path, env = make_config(
        tmp_path, broker_port=mosquitto.port, api_base=standin.url, prefix=topic_prefix
    )
    with BridgeThread.from_file(path, env) as bridge:
        pass
    starting = _one(bridge.log_text(), "starting")
    assert starting["broker"] == f"127.0.0.1:{mosquitto.port}"
    assert starting["prefix"] == topic_prefix and starting["api_key"] == "set"
    assert starting["service"] == standin.url
    assert starting["concurrency"] == bridge.config.limits.max_concurrency
    assert "check-config" in starting["full_config"]
    assert "config" not in starting
    # The whole config only at debug level, for whoever asks.
    above_debug = [e for e in _events(bridge.log_text()) if e["level"] != "debug"]
    assert not any("max_packet_size" in json.dumps(e) for e in above_debug)
    assert "no API key" not in bridge.log_text()


def test_no_key_warns_unless_the_service_is_local(
    tmp_path: Path, mosquitto: MosquittoBroker, topic_prefix: str
) -> None:
    path, env = make_config(
        tmp_path,
        broker_port=mosquitto.port,
        api_base="https://api.openai.com/v1",  # never contacted: no request is sent
        prefix=topic_prefix,
        api_key="",
    )
    with BridgeThread.from_file(path, env) as bridge:
        pass
    warning = next(e for e in _events(bridge.log_text()) if "no API key" in e["event"])
    assert warning["level"] == "warning" and "OPENAI_API_KEY" in warning["event"]
    assert _one(bridge.log_text(), "starting")["api_key"] == "not set"
    for local in ("http://127.0.0.1:11434/v1", "http://localhost:8080/v1", "http://ollama:11434"):
        config = load_config(None, environ={"OMB_SERVICE__API_BASE": f'"{local}"'})
        assert missing_key_warning(config) is None, local
    assert is_local_host("192.168.1.20") and is_local_host("pi.local")
    assert not is_local_host("api.openai.com") and not is_local_host("8.8.8.8")


# --- requests ------------------------------------------------------------------------------------


def test_arrival_at_debug_errors_as_warnings_with_their_message(
    tmp_path: Path, mosquitto: MosquittoBroker, standin: Standin, topic_prefix: str
) -> None:
    path, env = make_config(
        tmp_path, broker_port=mosquitto.port, api_base=standin.url, prefix=topic_prefix
    )
    # The request line follows the reply's PUBACK: stopping the bridge makes sure it is written.
    with (
        BridgeThread.from_file(path, env) as bridge,
        TestClient.for_broker(mosquitto, prefix=topic_prefix) as client,
    ):
        reply = client.request("listModels", b"{not json", suffix="bad")
    assert reply["error"]["code"] == "bad_json"
    log = bridge.log_text()
    arrived = next(e for e in _events(log) if e["event"] == "request received")
    assert arrived["level"] == "debug" and arrived["topic"].endswith("/listModels/bad")
    line = next(e for e in _events(log) if e["event"] == "request" and e.get("code") == "bad_json")
    assert line["level"] == "warning" and line["message"].startswith("payload is not valid")


def test_connection_errors_name_their_cause(
    tmp_path: Path, mosquitto: MosquittoBroker, topic_prefix: str
) -> None:
    path, env = make_config(
        tmp_path,
        broker_port=mosquitto.port,
        api_base=f"http://127.0.0.1:{free_port()}/v1",
        prefix=topic_prefix,
        service={"max_retries": 0},
    )
    with (
        BridgeThread.from_file(path, env) as bridge,
        TestClient.for_broker(mosquitto, prefix=topic_prefix) as c,
    ):
        reply = c.request("listModels", {})
    assert reply["error"]["code"] == "upstream_unavailable"
    assert reply["error"]["message"].endswith(": connection refused")
    assert "ClientConnectorError" not in bridge.log_text()
    assert "connection refused" in bridge.log_text()


def test_payload_messages_name_the_option_and_no_surrogates(
    tmp_path: Path, mosquitto: MosquittoBroker, standin: Standin, topic_prefix: str
) -> None:
    path, env = make_config(
        tmp_path,
        broker_port=mosquitto.port,
        api_base=standin.url,
        prefix=topic_prefix,
        limits={"max_request_bytes": 2 * 1024 * 1024},
    )
    with (
        BridgeThread.from_file(path, env),
        TestClient.for_broker(mosquitto, prefix=topic_prefix) as c,
    ):
        big = c.request("createModeration", b"{" + b" " * (3 * 1024 * 1024) + b"}", suffix="big")
        bad = c.request("createModeration", b'{"input": "caf\xe9"}', suffix="utf8")
        typo = c.request("listModel", {}, suffix="typo")
    assert big["error"]["code"] == "payload_too_large"
    assert "[limits] max_request_bytes" in big["error"]["message"]
    assert "3.0 MiB" in big["error"]["message"] and "2 MiB" in big["error"]["message"]
    assert bad["error"]["code"] == "bad_json"
    assert "surrogates" not in bad["error"]["message"]
    assert "invalid UTF-8 at byte 14" in bad["error"]["message"]
    assert typo["error"]["code"] == "unknown_method"
    assert "(did you mean listModels, " in typo["error"]["message"]


# --- the process: reconnecting, stopping ---------------------------------------------------------


@pytest.fixture
def spawn(tmp_path: Path) -> Iterator[Any]:
    started: list[subprocess.Popen[str]] = []

    def run(config: Path, env: dict[str, str]) -> tuple[subprocess.Popen[str], OutputLines]:
        proc = subprocess.Popen(
            [sys.executable, "-m", "bridge", "--config", str(config)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PYTHONPATH": str(REPO), **env},
        )
        started.append(proc)
        return proc, OutputLines(proc)

    yield run
    for proc in started:
        if proc.poll() is None:
            proc.kill()
        proc.wait(20)
        if proc.stdout is not None:
            proc.stdout.close()


def test_says_it_is_still_trying_to_reach_the_broker(tmp_path: Path, spawn: Any) -> None:
    port = free_port()
    path, env = make_config(
        tmp_path, broker_port=port, api_base="http://127.0.0.1:9/v1", prefix="retry"
    )
    proc, out = spawn(path, env)
    first = json.loads(out.wait_for("cannot connect to broker"))
    assert first["level"] == "warning" and first["error"] == "connection refused"
    again = json.loads(out.wait_for("still trying to reach broker"))
    assert again["level"] == "warning" and f"127.0.0.1:{port}" in again["event"]
    assert again["attempts"] >= 2
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(20) == 0


def test_second_ctrl_c_stops_at_once(
    tmp_path: Path, mosquitto: MosquittoBroker, standin: Standin, topic_prefix: str, spawn: Any
) -> None:
    path, env = make_config(
        tmp_path,
        broker_port=mosquitto.port,
        api_base=standin.url,
        prefix=topic_prefix,
        limits={"shutdown_grace": 120.0},
        service={"read_timeout": 120.0, "total_timeout": 120.0},
    )
    standin.script("GET", "/models", Reply(json={}, delay=110.0))
    proc, out = spawn(path, env)
    out.wait_for('"event": "ready"')
    with TestClient.for_broker(mosquitto, prefix=topic_prefix) as c:
        c.publish(c.topic("request", "listModels", "slow"), {})
        standin.wait_for_requests(1)
        proc.send_signal(signal.SIGINT)
        out.wait_for('"event": "stopping"')
        proc.send_signal(signal.SIGINT)
        assert proc.wait(20) == 0
    line = json.loads(out.wait_for("second signal"))
    assert line["level"] == "warning" and "redeliver" in line["event"]
    assert "Traceback" not in out.text()
