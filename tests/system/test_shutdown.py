"""Every way out of a bridge leaves `offline` retained and nothing of it running."""

from __future__ import annotations

import asyncio
import io
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
from support.bridge_runner import (
    TEST_API_KEY,
    BridgeProcess,
    BridgeThread,
    make_config,
    private_state,
)
from support.bridges import StartBridge
from support.broker import MosquittoBroker
from support.mqtt_client import TestClient
from support.standin import Reply, Standin

from bridge.config import load_config
from bridge.errors import EX_SOFTWARE
from bridge.ha.status import StatusPublisher
from bridge.pipeline.dispatch import Dispatcher
from bridge.runtime import logs
from bridge.runtime.supervisor import Supervisor


def retained_state(client: TestClient, topic: str) -> Any:
    """The retained message on `topic` as a fresh subscriber gets it."""
    with TestClient(client.host, client.port, prefix=client.prefix) as fresh:
        fresh.subscribe(topic)
        message = fresh.wait_for_one(topic)
        assert message.retain
        return message.json()


def config_file(
    tmp_path: Path, broker: MosquittoBroker, standin: Standin, prefix: str, **overrides: Any
) -> tuple[Path, dict[str, str]]:
    """A bridge's config file on `broker` and `standin`, and its environment."""
    return make_config(
        tmp_path, broker_port=broker.port, api_base=standin.url, prefix=prefix, **overrides
    )


def test_a_failing_background_loop_stops_the_bridge_offline_with_its_requests_cancelled(
    start_bridge: StartBridge,
    client: TestClient,
    standin: Standin,
    topic_prefix: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    standin.script("GET", "/models", Reply(hang=True))
    request_arrived = threading.Event()

    async def failing_stats_loop(self: StatusPublisher, interval: float) -> None:
        await asyncio.to_thread(request_arrived.wait, 10)
        raise RuntimeError("stats loop broke")

    cancelled: list[int] = []
    cancel_all = Dispatcher.cancel_all

    async def counting_cancel_all(self: Dispatcher) -> None:
        cancelled.append(self.in_flight)
        await cancel_all(self)

    monkeypatch.setattr(StatusPublisher, "stats_loop", failing_stats_loop)
    monkeypatch.setattr(Dispatcher, "cancel_all", counting_cancel_all)
    state = f"{topic_prefix}/bridge/test/state"
    client.subscribe(state)
    bridge: BridgeThread = start_bridge(
        extra={"homeassistant": {"stats_interval": 60}}, limits={"shutdown_grace": 0.5}
    )
    client.wait_for_one(state, where=lambda m: m.json() == {"state": "online"})
    mark = client.mark()
    client.publish(client.topic("request", "listModels", "held"), {"transaction": 1})
    standin.wait_for_requests(1)
    request_arrived.set()

    client.wait_for_one(state, after=mark, where=lambda m: m.json() == {"state": "offline"})
    assert bridge.stop() == EX_SOFTWARE
    assert retained_state(client, state) == {"state": "offline"}
    assert cancelled == [1]  # the held request was cancelled, not left running
    assert bridge.tasks_left == []
    assert standin.last.client_gone.wait(10)  # its upstream call was abandoned
    log = bridge.log_text()
    assert "internal error: stopping" in log and "stats loop broke" in log
    assert "Traceback" not in log


def test_a_stop_while_a_request_is_held_leaves_offline_and_no_task(
    start_bridge: StartBridge, client: TestClient, standin: Standin, topic_prefix: str
) -> None:
    standin.script("GET", "/models", Reply(hang=True))
    state = f"{topic_prefix}/bridge/test/state"
    client.subscribe(state)
    bridge = start_bridge(limits={"shutdown_grace": 0.2})
    client.wait_for_one(state, where=lambda m: m.json() == {"state": "online"})
    client.publish(client.topic("request", "listModels", "held"), {"transaction": 1})
    standin.wait_for_requests(1)
    assert bridge.stop() == 0
    assert retained_state(client, state) == {"state": "offline"}
    assert standin.last.client_gone.wait(10)  # the held upstream call was abandoned
    assert bridge.tasks_left == []
    assert "shutdown grace expired" in bridge.log_text()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_while_a_request_is_held_leaves_offline_and_the_process_gone(
    sig: signal.Signals,
    tmp_path: Path,
    mosquitto: MosquittoBroker,
    client: TestClient,
    standin: Standin,
    topic_prefix: str,
) -> None:
    standin.script("GET", "/models", Reply(hang=True))
    state = f"{topic_prefix}/bridge/test/state"
    path, env = config_file(
        tmp_path,
        mosquitto,
        standin,
        topic_prefix,
        limits={"shutdown_grace": 0.2},
        extra={"logging": {"level": "info"}},
    )
    process = BridgeProcess(path, env, tmp_path / "bridge.log").start()
    try:
        client.publish(client.topic("request", "listModels", "held"), {"transaction": 1})
        standin.wait_for_requests(1)
        assert process.proc is not None
        process.proc.send_signal(sig)
        assert process.wait(20) == 0
    finally:
        if process.proc is not None and process.proc.poll() is None:
            process.kill()
    assert retained_state(client, state) == {"state": "offline"}
    assert standin.last.client_gone.wait(10)
    log = process.log_text()
    assert "shutdown grace expired" in log and '"event": "stopped"' in log
    assert "Traceback" not in log and TEST_API_KEY not in log


def test_a_failing_supervisor_loop_stops_it_offline_with_its_workers_gone(
    tmp_path: Path,
    mosquitto: MosquittoBroker,
    client: TestClient,
    standin: Standin,
    topic_prefix: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    path, env = config_file(
        tmp_path,
        mosquitto,
        standin,
        topic_prefix,
        mqtt={"instance": "pool"},
        extra={"homeassistant": {"stats_interval": 60}},
    )
    for name, value in private_state(path, env).items():
        monkeypatch.setenv(name, value)  # the workers' environment is the supervisor's
    config = load_config(path)
    all_ready = threading.Event()

    async def failing_stats_loop(self: StatusPublisher, interval: float) -> None:
        await asyncio.to_thread(all_ready.wait, 30)
        raise RuntimeError("stats loop broke")

    monkeypatch.setattr(StatusPublisher, "stats_loop", failing_stats_loop)
    state = f"{topic_prefix}/bridge/pool/state"
    client.subscribe(state)
    log = io.StringIO()
    logs.configure("info", "json", config.secrets(), stream=log)
    supervisor = Supervisor(config, 2, config_source=str(path))
    outcome: dict[str, Any] = {}

    def run() -> None:
        async def main() -> int:
            try:
                return await supervisor.run()
            finally:
                outcome["tasks_left"] = [
                    t for t in asyncio.all_tasks() if t is not asyncio.current_task()
                ]

        outcome["code"] = asyncio.run(main())

    thread = threading.Thread(target=run, name="supervisor", daemon=True)
    thread.start()
    client.wait_for_one(state, where=lambda m: m.json() == {"state": "online"}, timeout=30)
    pids = [w.process.pid for w in supervisor.workers if w.process is not None]
    mark = client.mark()
    all_ready.set()
    client.wait_for_one(state, after=mark, where=lambda m: m.json() == {"state": "offline"})
    thread.join(30)
    assert not thread.is_alive()
    assert outcome == {"code": EX_SOFTWARE, "tasks_left": []}
    assert retained_state(client, state) == {"state": "offline"}
    assert len(pids) == 2
    for pid in pids:  # reaped by the supervisor: no worker outlives it
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    text = log.getvalue()
    assert "internal error: stopping" in text and "stats loop broke" in text
    assert "Traceback" not in text


def test_the_bridge_stops_cleanly_when_its_log_pipe_closes(
    tmp_path: Path, mosquitto: MosquittoBroker, standin: Standin, topic_prefix: str
) -> None:
    """`bridge 2>&1 | head`: once the reader is gone the bridge stops gracefully, exit 0."""
    path, env = make_config(
        tmp_path, broker_port=mosquitto.port, api_base=standin.url, prefix=topic_prefix
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "bridge", "--config", str(path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env={
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "PYTHONPATH": str(Path(__file__).resolve().parents[2]),
            **private_state(path, env),
        },
    )
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            if b'"event": "ready"' in line:
                break
        proc.stdout.close()  # the reader goes away, as `head` does
        standin.script("POST", "/moderations", Reply(json={"flagged": False}))
        with TestClient.for_broker(mosquitto, prefix=topic_prefix) as client:
            # Its request line is the first write into the closed pipe.
            client.publish(client.topic("request", "createModeration", "x"), {"input": "hi"})
            code = proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert code == 0
