"""Bridge.run's lifecycle: a part that cannot start closes every part started before it."""

from __future__ import annotations

import gc
import socket
import sys
from pathlib import Path

import pytest
from support.broker import free_port
from support.cli import LEAKS, cli
from support.imports import top_level_packages_after

from bridge.config import load_config
from bridge.errors import EX_CONFIG, StartupError
from bridge.runtime import logs
from bridge.runtime.daemon import Bridge
from bridge.runtime.process import GC_YOUNG_THRESHOLD


def broken_tls_config(tmp_path: Path) -> Path:
    """Embedded broker on a free port, and a CA file that exists but is not a certificate."""
    ca = tmp_path / "ca.pem"
    ca.write_text("-----BEGIN CERTIFICATE-----\nnot base64 at all\n-----END CERTIFICATE-----\n")
    path = tmp_path / "bridge.toml"
    path.write_text(
        f'[mqtt]\nhost = ""\nport = {free_port()}\n\n[mqtt.tls]\nca_file = "{ca}"\n\n'
        '[service]\napi_base = "http://127.0.0.1:9/v1"\n\n[homeassistant]\ndiscovery = false\n'
    )
    return path


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


def test_the_command_exits_78_with_one_clear_line_and_no_traceback(tmp_path: Path) -> None:
    path = broken_tls_config(tmp_path)
    proc = cli("--config", str(path), dev=True, env={"HOME": str(tmp_path)})
    assert proc.returncode == EX_CONFIG
    output = proc.stdout + proc.stderr
    assert "cannot use the [mqtt.tls] files" in output
    for leak in LEAKS:
        assert leak not in output


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


def test_the_daemon_does_not_import_the_trial_broker() -> None:
    loaded = top_level_packages_after(
        "import bridge.cli.main, bridge.runtime.daemon, bridge.runtime.logs"
    )
    assert not loaded & {"amqtt", "typer", "psutil"}
