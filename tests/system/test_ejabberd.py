"""ejabberd's mod_mqtt (a node of its own): its CONNACK says it cannot share and grants 300 s of
session expiry (issue 23). A shared group is refused with one line (exit 78), never `ready`; a
single bridge starts, warns about the shorter expiry and shows it in its retained info."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.bridge_runner import BridgeThread, make_config, private_state
from support.ejabberd import PASSWORD, USER, EjabberdNode
from support.mqtt_client import TestClient
from support.standin import Standin

from bridge.errors import EX_CONFIG

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def ejabberd() -> Iterator[EjabberdNode]:
    with EjabberdNode() as node:
        yield node


def _config(tmp_path: Path, node: EjabberdNode, standin: Standin, **mqtt: object) -> Path:
    path, _ = make_config(
        tmp_path,
        broker_port=node.port,
        api_base=standin.url,
        prefix="ejd",
        mqtt={"username": USER, "instance": "ejd", **mqtt},
    )
    return path


def test_a_shared_group_on_ejabberd_exits_78_with_one_line(
    tmp_path: Path, ejabberd: EjabberdNode, standin: Standin
) -> None:
    path = _config(tmp_path, ejabberd, standin, shared_group="pool")
    done = subprocess.run(
        [sys.executable, "-m", "bridge", "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        env={
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "PYTHONPATH": str(REPO),
            **private_state(path, {"MQTT_PASSWORD": PASSWORD, "OPENAI_API_KEY": "sk-test"}),
        },
        check=False,
    )
    log = done.stdout + done.stderr
    assert done.returncode == EX_CONFIG, log
    errors = [json.loads(line) for line in log.splitlines() if '"level": "error"' in line]
    assert len(errors) == 1, log
    assert "has no shared subscriptions (its CONNACK says so)" in errors[0]["event"]
    assert '"event": "ready"' not in log and "still trying" not in log


def test_the_granted_session_expiry_is_warned_about_and_shown_in_info(
    tmp_path: Path, ejabberd: EjabberdNode, standin: Standin
) -> None:
    path = _config(tmp_path, ejabberd, standin)
    env = {"MQTT_PASSWORD": PASSWORD, "OPENAI_API_KEY": "sk-test"}
    with (
        BridgeThread.from_file(path, env) as bridge,
        TestClient(
            "127.0.0.1", ejabberd.port, prefix="ejd", username=USER, password=PASSWORD
        ) as client,
    ):
        client.subscribe("ejd/bridge/ejd/info")
        info = client.wait_for_one("ejd/bridge/ejd/info", timeout=20).json()
    warning = "the broker keeps the session 300 s, not the configured 86400 s"
    assert warning in bridge.log_text()
    assert info["broker"]["session_expiry"] == 300
    assert info["broker"]["shared_available"] is False
    assert any(warning in w for w in info["broker_warnings"])
