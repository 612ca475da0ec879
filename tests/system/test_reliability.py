"""Delivery and fault tolerance: kill -9, broker restarts, SIGTERM, upstream faults, secrets."""

from __future__ import annotations

import json
import os
import socket
import threading
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from support.bridge_runner import (
    TEST_API_KEY,
    TEST_MQTT_PASSWORD,
    BridgeProcess,
    BridgeThread,
    make_config,
)
from support.bridges import HTTP_PATHS, spawn_process
from support.broker import MosquittoBroker, free_port
from support.mqtt_client import TestClient, durable_client
from support.standin import Reply, Standin


def inputs_seen(standin: Standin) -> Counter[str]:
    return Counter(str((r.json() or {}).get("input")) for r in standin.requests)


def publish_requests(client: TestClient, n: int, method: str = "createModeration") -> None:
    for i in range(n):
        client.publish(
            client.topic("request", method, f"r{i}"), {"transaction": i, "input": f"in-{i}"}
        )


def replies_by_transaction(client: TestClient, prefix: str) -> Counter[Any]:
    return Counter(m.json()["transaction"] for m in client.messages(f"{prefix}/response/#"))


# --- crash and restart ----------


def test_kill_9_with_requests_in_flight_loses_nothing(
    tmp_path: Path,
    own_mosquitto: MosquittoBroker,
    standin: Standin,
    topic_prefix: str,
    processes: list[BridgeProcess],
) -> None:
    total, concurrency = 30, 6
    standin.set_latency(2.0)
    client = durable_client(own_mosquitto, topic_prefix)
    try:
        options = {"limits": {"max_concurrency": concurrency}, "mqtt": {"session_expiry": 600}}
        first = spawn_process(tmp_path, processes, own_mosquitto, standin, topic_prefix, **options)
        publish_requests(client, total)
        reached_api = standin.wait_for_requests(concurrency, timeout=10)
        first.kill()
        before_kill = {str(r.json()["input"]) for r in reached_api}
        assert client.messages(f"{topic_prefix}/response/#") == []

        standin.set_latency(0.0)
        spawn_process(tmp_path, processes, own_mosquitto, standin, topic_prefix, **options)
        client.wait_for(f"{topic_prefix}/response/#", total, timeout=30)

        replies = replies_by_transaction(client, topic_prefix)
        assert set(replies) == set(range(total))
        assert all(count == 1 for count in replies.values()), replies
        calls = inputs_seen(standin)
        assert set(calls) == {f"in-{i}" for i in range(total)}
        twice = {name for name, count in calls.items() if count > 1}
        # Only calls that had reached the API before the crash may be repeated, and once at most.
        assert twice <= before_kill
        assert max(calls.values()) <= 2
    finally:
        client.disconnect()


def test_broker_restart_with_requests_in_flight_loses_nothing(
    tmp_path: Path, own_mosquitto: MosquittoBroker, standin: Standin, topic_prefix: str
) -> None:
    total = 20
    standin.set_latency(1.0)
    client = durable_client(own_mosquitto, topic_prefix)
    path, env = make_config(
        tmp_path, broker_port=own_mosquitto.port, api_base=standin.url, prefix=topic_prefix
    )
    bridge = BridgeThread.from_file(path, env).start()
    try:
        publish_requests(client, total)
        standin.wait_for_requests(total, timeout=10)
        own_mosquitto.restart()  # graceful: Mosquitto saves sessions and in-flight messages
        client.wait_connected(timeout=15)
        client.wait_for(f"{topic_prefix}/response/#", total, timeout=30)
        replies = replies_by_transaction(client, topic_prefix)
        assert set(replies) == set(range(total))
        assert all(c == 1 for c in inputs_seen(standin).values())
        log = bridge.log_text()
        assert log.count('"broker connection lost"') == 1
    finally:
        bridge.stop()
        client.disconnect()
    assert TEST_API_KEY not in bridge.log_text()


def test_sigterm_finishes_in_flight_publishes_offline_and_leaves_the_rest(
    tmp_path: Path,
    own_mosquitto: MosquittoBroker,
    standin: Standin,
    topic_prefix: str,
    processes: list[BridgeProcess],
) -> None:
    total, concurrency = 12, 4
    standin.set_latency(1.5)
    client = durable_client(own_mosquitto, topic_prefix)
    state = f"{topic_prefix}/bridge/test/state"
    client.subscribe(state)
    try:
        options = {"limits": {"max_concurrency": concurrency, "shutdown_grace": 10.0}}
        first = spawn_process(tmp_path, processes, own_mosquitto, standin, topic_prefix, **options)
        publish_requests(client, total)
        standin.wait_for_requests(concurrency, timeout=10)
        mark = client.mark()
        assert first.terminate() == 0
        # The in-flight requests were answered before the process exited ...
        answered = replies_by_transaction(client, topic_prefix)
        assert sum(answered.values()) == concurrency == len(standin.requests)
        client.wait_for_one(state, after=mark, where=lambda m: m.json() == {"state": "offline"})
        # ... and the rest is answered by the next start.
        standin.set_latency(0.0)
        spawn_process(tmp_path, processes, own_mosquitto, standin, topic_prefix, **options)
        client.wait_for(f"{topic_prefix}/response/#", total, timeout=30)
        replies = replies_by_transaction(client, topic_prefix)
        assert set(replies) == set(range(total)) and set(replies.values()) == {1}
        assert set(inputs_seen(standin).values()) == {1}
    finally:
        client.disconnect()


def test_systemd_notify_ready_watchdog_stopping(
    tmp_path: Path,
    mosquitto: MosquittoBroker,
    standin: Standin,
    topic_prefix: str,
    processes: list[BridgeProcess],
) -> None:
    sock_path = tmp_path / "notify.sock"
    received: list[str] = []
    got = threading.Condition()
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(sock_path))
        sock.settimeout(0.5)
        stop = threading.Event()

        def read() -> None:
            while not stop.is_set():
                try:
                    data = sock.recv(4096)
                except TimeoutError:
                    continue
                with got:
                    received.append(data.decode())
                    got.notify_all()

        reader = threading.Thread(target=read)
        reader.start()
        try:
            path, env = make_config(
                tmp_path, broker_port=mosquitto.port, api_base=standin.url, prefix=topic_prefix
            )
            env = {**env, "NOTIFY_SOCKET": str(sock_path), "WATCHDOG_USEC": "400000"}
            proc = BridgeProcess(path, env, tmp_path / "notify-bridge.log")
            processes.append(proc)
            proc.start()
            with got:
                assert got.wait_for(lambda: sum("WATCHDOG=1" in m for m in received) >= 2, 10)
            assert proc.terminate() == 0
            with got:
                assert got.wait_for(lambda: any("STOPPING=1" in m for m in received), 10)
        finally:
            stop.set()
            reader.join()
    ready = [m for m in received if "READY=1" in m]
    assert len(ready) == 1 and "STATUS=" in ready[0]
    assert received.index(ready[0]) < next(i for i, m in enumerate(received) if "STOPPING=1" in m)


# --- upstream faults ----------


@pytest.fixture
def bridge(
    tmp_path: Path, mosquitto: MosquittoBroker, standin: Standin, topic_prefix: str, http_path: str
) -> Iterator[BridgeThread]:
    service = {"max_retries": 2, "read_timeout": 0.5, "total_timeout": 5.0}
    path, env = make_config(
        tmp_path,
        broker_port=mosquitto.port,
        api_base=standin.url,
        prefix=topic_prefix,
        service={**service, "lean_http": HTTP_PATHS[http_path]},
    )
    with BridgeThread.from_file(path, env) as running:
        yield running
    assert TEST_API_KEY not in running.log_text()


def test_429_with_retry_after_then_200(
    bridge: BridgeThread, client: TestClient, standin: Standin
) -> None:
    standin.script(
        "GET",
        "/models",
        Reply.error(429, "slow down", headers={"Retry-After": "0.3"}),
        Reply(json={"data": []}),
    )
    reply = client.request("listModels", {})
    assert reply["status"] == "ok" and reply["data"] == {"data": []}
    first, second = standin.requests
    assert second.received_at - first.received_at >= 0.3


def test_retry_after_ms_is_honoured(
    bridge: BridgeThread, client: TestClient, standin: Standin
) -> None:
    standin.script(
        "GET",
        "/models",
        Reply.error(429, "slow", headers={"retry-after-ms": "250"}),
        Reply(json={"ok": 1}),
    )
    assert client.request("listModels", {})["status"] == "ok"
    first, second = standin.requests
    assert second.received_at - first.received_at >= 0.25


def test_persistent_5xx_gives_a_retryable_error_after_the_retries(
    bridge: BridgeThread, client: TestClient, standin: Standin
) -> None:
    standin.script("GET", "/models", Reply.error(502, "bad gateway"))
    error = client.request("listModels", {})["error"]
    assert error["code"] == "upstream_error" and error["http_status"] == 502
    assert error["retryable"] is True
    assert len(standin.requests) == 3  # the first try and max_retries = 2


def test_refused_connection_is_retried_then_reported(
    tmp_path: Path,
    mosquitto: MosquittoBroker,
    client: TestClient,
    topic_prefix: str,
    http_path: str,
) -> None:
    path, env = make_config(
        tmp_path,
        broker_port=mosquitto.port,
        api_base=f"http://127.0.0.1:{free_port()}/v1",
        prefix=topic_prefix,
        service={"max_retries": 2, "lean_http": HTTP_PATHS[http_path]},
    )
    with BridgeThread.from_file(path, env) as running:
        error = client.request("listModels", {})["error"]
    assert error["code"] == "upstream_unavailable" and error["retryable"] is True
    assert '"attempts": 3' in running.log_text()


# --- secrets ----------


def test_mqtt_password_and_api_key_never_logged(
    tmp_path: Path, mosquitto: MosquittoBroker, standin: Standin, topic_prefix: str
) -> None:
    path, env = make_config(
        tmp_path,
        broker_port=mosquitto.port,
        api_base=standin.url,
        prefix=topic_prefix,
        mqtt={"username": "bridge-user"},
    )
    env = {**env, "MQTT_PASSWORD": TEST_MQTT_PASSWORD}
    with (
        BridgeThread.from_file(path, env) as running,
        TestClient.for_broker(mosquitto, prefix=topic_prefix) as client,
    ):
        standin.script(
            "GET", "/models", Reply(json={"leak": f"{TEST_API_KEY} {TEST_MQTT_PASSWORD}"})
        )
        reply = client.request_raw("listModels", {})
        client.subscribe(f"{topic_prefix}/bridge/test/info")
        info = client.wait_for_one(f"{topic_prefix}/bridge/test/info")
    text = running.log_text()
    assert '"password": "**********"' in text and '"api_key": "**********"' in text
    for secret in (TEST_API_KEY, TEST_MQTT_PASSWORD):
        assert secret not in text
        assert secret.encode() not in reply.payload
        assert secret.encode() not in info.payload
    assert json.loads(reply.payload)["data"]["leak"] == "********** **********"


def test_key_file_readable_by_others_draws_a_warning(tmp_path: Path) -> None:
    from bridge.config import load_config

    key_file = tmp_path / "key"
    key_file.write_text(TEST_API_KEY + "\n")
    os.chmod(key_file, 0o644)
    config_path = tmp_path / "c.toml"
    config_path.write_text(f'[service]\napi_key_file = "{key_file}"\n')
    warnings: list[str] = []
    config = load_config(config_path, environ={}, warnings=warnings)
    assert config.service.api_key.get_secret_value() == TEST_API_KEY
    assert any("readable by group or others" in w for w in warnings)
    assert all(TEST_API_KEY not in w for w in warnings)
    os.chmod(key_file, 0o600)
    quiet: list[str] = []
    load_config(config_path, environ={}, warnings=quiet)
    assert quiet == []
