"""Bridges for tests: the `start_bridge` fixture's type, and one bridge for a whole module."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from support.bridge_runner import TEST_API_KEY, BridgeProcess, BridgeThread, make_config
from support.broker import MosquittoBroker
from support.mqtt_client import TestClient
from support.standin import Standin

HTTP_PATHS = {"lean": True, "aiohttp": False}
"""`[service] lean_http` per HTTP path: the modules that check what reaches the service host run
on both (the `http_path` fixture)."""

StartBridge = Callable[..., BridgeThread]
"""`start_bridge(**overrides)`: overrides go to `make_config` (mqtt=..., service=..., ...)."""


def spawn_process(
    tmp_path: Path,
    processes: list[BridgeProcess],
    broker: MosquittoBroker,
    standin: Standin,
    prefix: str,
    **overrides: Any,
) -> BridgeProcess:
    """A started bridge process on `broker` and `standin` (`overrides` go to `make_config`),
    added to `processes` (the fixture closes it and checks its log)."""
    path, env = make_config(
        tmp_path, broker_port=broker.port, api_base=standin.url, prefix=prefix, **overrides
    )
    proc = BridgeProcess(path, env, tmp_path / f"bridge-{len(processes)}.log")
    processes.append(proc)
    return proc.start()


@contextlib.contextmanager
def module_bridge(
    tmp_path_factory: pytest.TempPathFactory,
    mosquitto: MosquittoBroker,
    prefix: str,
    http_path: str = "lean",
    **config: Any,
) -> Iterator[tuple[BridgeThread, TestClient, Standin]]:
    """A stand-in, a bridge on `prefix` and a client, for a module's worth of requests, sending
    through `http_path` (a key of HTTP_PATHS).

    On exit it checks that the API key never reached the bridge's log.
    """
    standin = Standin().start()
    config["service"] = {"lean_http": HTTP_PATHS[http_path], **config.get("service", {})}
    path, env = make_config(
        tmp_path_factory.mktemp(prefix),
        broker_port=mosquitto.port,
        api_base=standin.url,
        prefix=prefix,
        **config,
    )
    bridge = BridgeThread.from_file(path, env).start()
    client = TestClient.for_broker(mosquitto, prefix=prefix).connect()
    try:
        yield bridge, client, standin
    finally:
        client.disconnect()
        bridge.stop()
        standin.stop()
    assert TEST_API_KEY not in bridge.log_text()
