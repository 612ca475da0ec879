"""Every way out of a bridge leaves `offline` retained and nothing of it running."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import pytest
from support.bridge_runner import BridgeThread
from support.bridges import StartBridge
from support.mqtt_client import TestClient
from support.standin import Reply, Standin

from bridge.errors import EX_SOFTWARE
from bridge.ha.status import StatusPublisher
from bridge.pipeline.dispatch import Dispatcher


def retained_state(client: TestClient, topic: str) -> Any:
    """The retained message on `topic` as a fresh subscriber gets it."""
    with TestClient(client.host, client.port, prefix=client.prefix) as fresh:
        fresh.subscribe(topic)
        message = fresh.wait_for_one(topic)
        assert message.retain
        return message.json()


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
    assert standin.last.client_gone.wait(10)  # its upstream call was abandoned
    log = bridge.log_text()
    assert "internal error: stopping" in log and "stats loop broke" in log
    assert "Traceback" not in log
