"""RabbitMQ 3.10 (a node of its own, never the machine's): MQTT 3.1.1 only, `$share/...` taken as
a plain topic, retained messages only to exact-topic subscriptions (issue 23). A single bridge
answers there and `call` sees its retained `online`; a shared group is refused (exit 78)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.bridge_runner import BridgeThread, make_config
from support.cli import cli
from support.rabbitmq import RabbitMqNode
from support.standin import Reply, Standin

from bridge.errors import EX_CONFIG


@pytest.fixture(scope="module")
def rabbit() -> Iterator[RabbitMqNode]:
    with RabbitMqNode() as node:
        yield node


def test_call_finds_the_bridge_online_on_rabbitmq(
    tmp_path: Path, standin: Standin, rabbit: RabbitMqNode
) -> None:
    path, env = make_config(
        tmp_path,
        broker_port=rabbit.port,
        api_base=standin.url,
        prefix="rmq",
        mqtt={"instance": "test"},
    )
    standin.script("POST", "/moderations", Reply(json={"flagged": False}))
    with BridgeThread.from_file(path, env) as bridge:
        out = cli("call", "createModeration", '{"input": "hi"}', "--config", str(path))
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["data"] == {"flagged": False}
    assert '"protocol": "3.1.1"' in bridge.log_text()  # RabbitMQ 3.10 speaks 3.1.1 only


def test_a_shared_group_on_rabbitmq_is_refused(
    tmp_path: Path, standin: Standin, rabbit: RabbitMqNode
) -> None:
    path, env = make_config(
        tmp_path,
        broker_port=rabbit.port,
        api_base=standin.url,
        prefix="rmq-shared",
        mqtt={"shared_group": "pool"},
    )
    out = cli("--config", str(path), env=env)
    assert out.returncode == EX_CONFIG, out.stderr
    assert "delivered nothing through it" in out.stderr
    assert '"event": "ready"' not in out.stderr + out.stdout
