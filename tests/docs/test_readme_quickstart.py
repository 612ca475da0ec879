"""README.md's Quick start, run as written: only the broker port is moved off 1883."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.broker import free_port
from support.lines import OutputLines
from support.standin import Reply, Standin

REPO = Path(__file__).resolve().parents[2]


def _quick_start_blocks() -> list[list[str]]:
    """The `sh` blocks of the Quick start section, each as commands (continuations joined)."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    section = text.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    blocks = []
    for block in re.findall(r"```sh\n(.*?)```", section, re.S):
        joined = block.replace("\\\n", " ")
        blocks.append([line for line in joined.splitlines() if line.strip()])
    return blocks


@pytest.fixture
def processes() -> Iterator[list[subprocess.Popen[str]]]:
    started: list[subprocess.Popen[str]] = []
    yield started
    for proc in started:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
        if proc.stdout is not None:
            proc.stdout.close()


def test_readme_quick_start_as_written(
    standin: Standin, processes: list[subprocess.Popen[str]], tmp_path: Path
) -> None:
    port = str(free_port())
    standin.script("POST", "/chat/completions", Reply(json={"object": "chat.completion"}))
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": os.environ.get("HOME", "/tmp"),
        "OMB_MQTT__PORT": port,  # the one change: off 1883, where a system broker may listen
        "OMB_SERVICE__API_BASE": standin.url,
        "OMB_HOMEASSISTANT__DISCOVERY": "false",
        # A journal of its own: the default one under HOME would answer a second run's request
        # from the first run's answer, without calling the stand-in.
        "XDG_STATE_HOME": str(tmp_path),
    }

    def spawn(argv: list[str]) -> OutputLines:
        proc = subprocess.Popen(
            argv, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        processes.append(proc)
        return OutputLines(proc)

    def mqtt_tool(command: str) -> list[str]:
        argv = shlex.split(command)
        return [argv[0], "-p", port, *argv[1:]]

    ask, call = _quick_start_blocks()[1:3]
    bridge = sub = None
    for command in ask:
        command = command.split("  #", 1)[0].strip()
        if command.startswith("export "):
            name, _, value = command[len("export ") :].partition("=")
            env[name] = value
        elif command == "./start.sh &":
            bridge = spawn(["./start.sh"])
            bridge.wait_for('"event": "ready"')
        elif command.startswith("mosquitto_sub") and command.endswith("&"):
            # Subscribed once a retained marker arrives (mosquitto_sub prints nothing before).
            subprocess.run(
                mqtt_tool("mosquitto_pub -q 1 -r -t openai/response/marker -m here"), check=True
            )
            sub = spawn(mqtt_tool(command[:-1]))
            sub.wait_for("openai/response/marker here")
            subprocess.run(
                mqtt_tool("mosquitto_pub -q 1 -r -t openai/response/marker -n"), check=True
            )
        elif command.startswith("mosquitto_pub"):
            subprocess.run(mqtt_tool(command), check=True, timeout=30)
        else:
            raise AssertionError(
                f"README Quick start has a command this test does not know: {command}"
            )
    assert bridge is not None and sub is not None
    line = sub.wait_for("openai/response/createChatCompletion/kitchen ")
    reply = json.loads(line.split(" ", 1)[1])
    assert reply["status"] == "ok" and reply["transaction"] == 7
    assert reply["data"] == {"object": "chat.completion"}
    assert standin.last.json()["messages"] == [{"role": "user", "content": "hi"}]

    (command,) = call
    out = subprocess.run(
        shlex.split(command), cwd=REPO, env=env, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["status"] == "ok"
    assert "config: config/bridge.toml" in out.stderr
    for text in [bridge.text(), out.stderr]:
        assert "Traceback" not in text and "sk-..." not in text
