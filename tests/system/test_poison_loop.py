"""No poison loop: a request that killed the bridge twice is refused, across real restarts.

The bridge process is killed (SIGKILL, as the kernel's OOM killer or a memory cgroup would) at
the moment the stand-in receives the request, twice; the broker redelivers the unacknowledged
request after each restart; the third start answers it with `poison_request` instead of calling
the service host a third time, and goes on serving.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from support.bridge_runner import BridgeProcess
from support.bridges import spawn_process
from support.broker import MosquittoBroker
from support.mqtt_client import durable_client
from support.standin import RecordedRequest, Reply, Standin

POISON = "answer at great length"


def hang_on_poison(record: RecordedRequest) -> Reply:
    """Never answer the poison request (the bridge dies first); echo anything else."""
    body = record.json() or {}
    if body.get("input") == POISON:
        return Reply(hang=True)
    return Reply(json={"id": "modr-1", "results": [{"flagged": False}], "echo": body})


def durable(journal_scope: str) -> dict[str, Any]:
    """Bridge settings: a persistent session (requests survive a kill) and the journal."""
    return {"mqtt": {"session_expiry": 600}, "extra": {"journal": {"scope": journal_scope}}}


def test_a_request_that_killed_the_bridge_twice_is_answered_poison_request(
    tmp_path: Path,
    own_mosquitto: MosquittoBroker,
    standin: Standin,
    topic_prefix: str,
    processes: list[BridgeProcess],
) -> None:
    standin.set_default(hang_on_poison)
    options = durable("answers")
    client = durable_client(own_mosquitto, topic_prefix)
    try:
        for run in (1, 2):
            proc = spawn_process(
                tmp_path, processes, own_mosquitto, standin, topic_prefix, **options
            )
            if run == 1:
                client.publish(
                    client.topic("request", "createModeration", "door"),
                    {"transaction": 7, "input": POISON},
                )
            standin.wait_for_requests(run, timeout=20)
            proc.kill()  # as the OOM killer would, while the call is in flight
        third = spawn_process(tmp_path, processes, own_mosquitto, standin, topic_prefix, **options)
        reply = client.wait_for_one(f"{topic_prefix}/response/createModeration/door", timeout=20)
        assert reply.json()["status"] == "error"
        assert reply.json()["transaction"] == 7
        error = reply.json()["error"]
        assert error["code"] == "poison_request"
        assert error["retryable"] is False
        assert "stopped 2 times" in error["message"]
        assert '"event": "poison request refused"' in third.log_text()
        # The bridge goes on serving the next request normally.
        mark = client.mark()
        client.publish(
            client.topic("request", "createModeration", "hall"), {"transaction": 8, "input": "hi"}
        )
        served = client.wait_for_one(
            f"{topic_prefix}/response/createModeration/hall", timeout=20, after=mark
        )
        assert served.json()["status"] == "ok"
        poisoned = [r for r in standin.requests if (r.json() or {}).get("input") == POISON]
        assert len(poisoned) == 2  # two paid calls, not one per restart forever
    finally:
        client.disconnect()


def test_a_request_the_bridge_survives_is_not_counted_against_a_later_repeat(
    tmp_path: Path,
    own_mosquitto: MosquittoBroker,
    standin: Standin,
    topic_prefix: str,
    processes: list[BridgeProcess],
) -> None:
    standin.set_default(hang_on_poison)
    client = durable_client(own_mosquitto, topic_prefix)
    try:
        # No `transaction`: each repeat is a new request with the same key, executed again.
        spawn_process(
            tmp_path, processes, own_mosquitto, standin, topic_prefix, **durable("answers")
        )
        for n in range(1, 5):
            mark = client.mark()
            client.publish(client.topic("request", "createModeration", "x"), {"input": "same"})
            served = client.wait_for_one(
                f"{topic_prefix}/response/createModeration/x", timeout=20, after=mark
            )
            assert served.json()["status"] == "ok", n
        assert len(standin.requests) == 4
    finally:
        client.disconnect()
