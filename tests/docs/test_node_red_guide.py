"""docs/coming-from-node-red.md: its function nodes run in Node.js as Node-RED runs them, and the
messages they make are answered by a real bridge (3.1.1 by topic and transaction, v5 on the
Response Topic with the Correlation Data)."""

from __future__ import annotations

import base64
import json
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
from support.bridges import StartBridge
from support.mqtt_client import TestClient
from support.standin import Reply, Standin

REPO = Path(__file__).resolve().parents[2]
GUIDE = (REPO / "docs" / "coming-from-node-red.md").read_text(encoding="utf-8")
FUNCTIONS = re.findall(r"```javascript\n(.*?)```", GUIDE, re.S)

# Runs a function node's body the way Node-RED does: `msg` in, the returned msg out.
_RUNNER = """
const body = require('fs').readFileSync(0, 'utf8');
const msg = {payload: process.argv[1], _msgid: process.argv[2]};
const out = new Function('msg', 'Buffer', body)(msg, Buffer);
if (Buffer.isBuffer(out.correlationData)) {
  out.correlationData = {base64: out.correlationData.toString('base64')};
}
process.stdout.write(JSON.stringify(out));
"""


def run_function_node(body: str, payload: str, msgid: str) -> dict[str, Any]:
    """The msg a function node with `body` returns for `msg.payload = payload`."""
    done = subprocess.run(
        ["node", "-e", _RUNNER, payload, msgid],
        input=body,
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    msg: dict[str, Any] = json.loads(done.stdout)
    return msg


def test_the_guide_has_a_311_and_a_v5_function_node() -> None:
    assert len(FUNCTIONS) == 2
    assert "msg.responseTopic" in FUNCTIONS[1] and "msg.correlationData" in FUNCTIONS[1]


@pytest.mark.parametrize("which", [0, 1], ids=["mqtt-3.1.1", "mqtt-v5"])
def test_a_function_node_of_the_guide_gets_its_answer(
    which: int,
    start_bridge: StartBridge,
    standin: Standin,
    topic_prefix: str,
    client: TestClient,
) -> None:
    start_bridge()
    body = FUNCTIONS[which].replace('"openai/', f'"{topic_prefix}/')
    msg = run_function_node(body, "Is 30 °C too warm for basil?", "7e1a3b")
    standin.script("POST", "/chat/completions", Reply(json={"id": "c", "choices": []}))
    standin.script("POST", "/responses", Reply(json={"id": "r", "output": []}))
    correlation = None
    if "correlationData" in msg:
        correlation = base64.b64decode(msg["correlationData"]["base64"])
    reply_topic = msg.get("responseTopic") or msg["topic"].replace("/request/", "/response/", 1)
    client.subscribe(reply_topic)
    client.publish(
        msg["topic"],
        msg["payload"],
        response_topic=msg.get("responseTopic"),
        correlation_data=correlation,
    )
    reply = client.wait_for_one(reply_topic, timeout=20)
    answer = reply.json()
    assert answer["status"] == "ok", answer
    assert answer["transaction"] == "7e1a3b"
    assert reply.correlation_data == correlation
    sent = standin.last.json()
    assert "Is 30 °C too warm for basil?" in json.dumps(sent, ensure_ascii=False)
