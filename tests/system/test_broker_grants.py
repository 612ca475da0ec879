"""What the broker grants decides whether the bridge may start: a shared group (or workers) on a
broker without shared subscriptions exits 78 with one line, never `ready` (issue 23).

aedes is the broker of node-red-contrib-aedes (MQTT 3.1.1, `$share` matches nothing); Mosquitto
in 3.1.1 mode shares, and the probe through `$share` proves it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from support.aedes import AedesBroker
from support.bridge_runner import BridgeProcess, make_config, private_state
from support.broker import MosquittoBroker
from support.standin import Standin

from bridge.errors import EX_CONFIG

REPO = Path(__file__).resolve().parents[2]


def _run_until_exit(config: Path, env: dict[str, str], timeout: float = 60.0) -> tuple[int, str]:
    """`python -m bridge --config FILE` run to its end: exit status and every log line."""
    done = subprocess.run(
        [sys.executable, "-m", "bridge", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "PYTHONPATH": str(REPO),
            **private_state(config, env),
        },
        check=False,
    )
    return done.returncode, done.stdout + done.stderr


def _events(log: str) -> list[dict[str, object]]:
    return [json.loads(line) for line in log.splitlines() if line.startswith("{")]


def _refused(log: str) -> list[dict[str, object]]:
    return [e for e in _events(log) if "shared group" in str(e.get("event", ""))]


def _refused_on_aedes(tmp_path: Path, standin: Standin, **sections: dict[str, object]) -> str:
    """Run a bridge with `sections` against aedes: it exits 78, never ready; its log."""
    with AedesBroker() as aedes:
        config, env = make_config(
            tmp_path,
            broker_port=aedes.port,
            api_base=standin.url,
            prefix="grants/aedes",
            mqtt=sections.pop("mqtt", None),
            extra=sections,
        )
        code, log = _run_until_exit(config, env)
    assert code == EX_CONFIG, log
    assert not [e for e in _events(log) if e.get("event") == "ready"], log
    assert "Traceback" not in log
    return log


def test_shared_group_on_aedes_exits_78_with_one_line(tmp_path: Path, standin: Standin) -> None:
    log = _refused_on_aedes(tmp_path, standin, mqtt={"shared_group": "pool"})
    refusals = _refused(log)
    assert len(refusals) == 1, log
    assert "delivered nothing" in str(refusals[0]["event"])
    assert refusals[0]["level"] == "error"


def test_workers_on_aedes_exit_78_never_ready(tmp_path: Path, standin: Standin) -> None:
    log = _refused_on_aedes(tmp_path, standin, runtime={"workers": 2})
    assert _refused(log), log


def test_shared_group_check_can_be_turned_off(tmp_path: Path, standin: Standin) -> None:
    """`shared_group_check = false` is the user's word: the bridge starts (and says `ready`)."""
    with AedesBroker() as aedes:
        config, env = make_config(
            tmp_path,
            broker_port=aedes.port,
            api_base=standin.url,
            prefix="grants/aedes-off",
            mqtt={"shared_group": "pool", "shared_group_check": False},
        )
        proc = BridgeProcess(config, env, tmp_path / "bridge.log")
        try:
            proc.start()
            assert proc.terminate() == 0
        finally:
            proc.close()


def test_shared_group_on_mosquitto_311_passes_the_probe(
    tmp_path: Path, mosquitto: MosquittoBroker, standin: Standin
) -> None:
    config, env = make_config(
        tmp_path,
        broker_port=mosquitto.port,
        api_base=standin.url,
        prefix="grants/mosq311",
        mqtt={"shared_group": "pool", "protocol": "3.1.1"},
    )
    proc = BridgeProcess(config, env, tmp_path / "bridge.log")
    try:
        proc.start()
        assert '"shared subscriptions checked"' in proc.log_text()
        assert proc.terminate() == 0
    finally:
        proc.close()
