"""Checks that need a process of their own: the CLI's exit, what a process imports, the layer
contracts run by `lint-imports`, a journal key under another hash seed."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from support.bridge_runner import broken_tls_config
from support.cli import LEAKS, cli
from support.imports import top_level_packages_after

from bridge.errors import EX_CONFIG
from bridge.pipeline.dedup import request_key

REPO = Path(__file__).resolve().parents[2]


def test_the_command_exits_78_with_one_clear_line_and_no_traceback(tmp_path: Path) -> None:
    path = broken_tls_config(tmp_path)
    proc = cli("--config", str(path), dev=True, env={"HOME": str(tmp_path)})
    assert proc.returncode == EX_CONFIG
    output = proc.stdout + proc.stderr
    assert "cannot use the [mqtt.tls] files" in output
    for leak in LEAKS:
        assert leak not in output


def test_the_daemon_does_not_import_the_trial_broker() -> None:
    loaded = top_level_packages_after(
        "import bridge.cli.main, bridge.runtime.daemon, bridge.runtime.logs"
    )
    assert not loaded & {"amqtt", "typer", "psutil"}


def test_the_layer_contracts_hold() -> None:
    lint = Path(sys.executable).with_name("lint-imports")
    out = subprocess.run(
        [str(lint), "--no-cache"], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "0 broken" in out.stdout


def test_the_supervisor_and_call_load_no_http_client_nor_transport() -> None:
    code = (
        "import sys, bridge.runtime.supervisor, bridge.cli.call\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('aiohttp', 'httptools')"
        " or m.startswith('bridge.service')))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_request_key_is_the_same_in_every_process() -> None:
    code = "from bridge.pipeline.dedup import request_key; print(request_key('a/b', b'{}').hex())"
    root = Path(__file__).resolve().parents[2]
    out = {
        subprocess.run(
            [sys.executable, "-c", code],
            capture_output=True,
            text=True,
            check=True,
            cwd=root,
            env={"PYTHONHASHSEED": seed, "PATH": os.environ.get("PATH", "")},
        ).stdout.strip()
        for seed in ("1", "2")
    }
    assert out == {request_key("a/b", b"{}").hex()}
    assert request_key("a", b"b") != request_key("ab", b"")
