"""Bridge.run's lifecycle: a part that cannot start closes every part started before it."""

from __future__ import annotations

import gc
import socket
import sys
from pathlib import Path

import pytest
from support.bridge_runner import broken_tls_config
from support.broker import free_port

from bridge.config import load_config
from bridge.errors import StartupError
from bridge.runtime import logs
from bridge.runtime.daemon import Bridge
from bridge.runtime.process import GC_YOUNG_THRESHOLD


def port_is_free(port: int) -> bool:
    """Whether 127.0.0.1:`port` can be bound now."""
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


async def test_an_unusable_tls_file_closes_the_embedded_broker_and_the_http_session(
    tmp_path: Path,
) -> None:
    config = load_config(broken_tls_config(tmp_path))
    logs.configure("warning", "json", stream=sys.stderr)
    bridge = Bridge(config)
    thresholds = gc.get_threshold()
    try:
        with pytest.raises(StartupError, match=r"\[mqtt.tls\]"):
            await bridge.run()
        # Set before anything is served: young collections every 10,000 allocations, not 700.
        assert gc.get_threshold() == (GC_YOUNG_THRESHOLD, *thresholds[1:])
    finally:
        gc.set_threshold(*thresholds)
    assert port_is_free(config.mqtt.port)  # the embedded broker stopped listening
    # An unclosed aiohttp session warns when collected, and warnings are errors here.
    gc.collect()


async def test_without_the_trial_broker_installed_the_embedded_mode_says_what_to_install(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "bridge.toml"
    path.write_text(f'[mqtt]\nhost = ""\nport = {free_port()}\n')
    for name in ("amqtt", "amqtt.broker"):  # what the import meets when amqtt is absent
        monkeypatch.setitem(sys.modules, name, None)
    logs.configure("warning", "json", stream=sys.stderr)
    with pytest.raises(StartupError, match=r"openai-mqtt-bridge\[trial\]"):
        await Bridge(load_config(path)).run()
