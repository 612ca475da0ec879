"""Detached waits: with the journal on, a `_bridge` `wait` request is acknowledged once its job is
journaled, so waits never hold the broker's in-flight window, and they survive a restart.

Each test starts its own Mosquitto (a small in-flight window, or persistence for the restarts),
the stand-in plays the service host, and the bridge runs as a process where it is killed.
"""

from __future__ import annotations

import itertools
import json
import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.bridge_runner import TEST_API_KEY, BridgeProcess, BridgeThread, make_config
from support.broker import MosquittoBroker
from support.mqtt_client import TestClient, durable_client
from support.standin import RecordedRequest, Reply, Standin

from bridge.jsoncodec import loads

FAST_POLLING = {"poll_min": 0.05, "poll_max": 0.2}
WINDOW = 5
"""The broker's in-flight window toward the bridge in the flood test."""


class Created(list[str]):
    """The ids of the jobs created so far, in order."""

    def __init__(self) -> None:
        super().__init__()
        self.changed = threading.Condition()

    def wait_for(self, n: int, timeout: float = 10.0) -> list[str]:
        """The ids once `n` jobs were created (TimeoutError after `timeout` s)."""
        with self.changed:
            if not self.changed.wait_for(lambda: len(self) >= n, timeout):
                raise TimeoutError(f"{len(self)} of {n} jobs created within {timeout} s")
            return list(self)


def endless_videos(standin: Standin) -> Created:
    """Scripts createVideo to start a new job each time, in progress at every poll; the ids."""
    ids = itertools.count(1)
    created = Created()

    def create(record: RecordedRequest) -> Reply:
        with created.changed:
            created.append(f"video_{next(ids)}")
            created.changed.notify_all()
        return Reply(json={"id": created[-1], "object": "video", "status": "queued"})

    standin.script("POST", "/videos", create)
    standin.script(
        "GET", "/videos/.*", Reply(json={"id": "v", "object": "video", "status": "in_progress"})
    )
    return created


def posts(standin: Standin) -> int:
    return [r.method for r in standin.requests].count("POST")


@pytest.fixture
def small_window(tmp_path: Path) -> Iterator[MosquittoBroker]:
    """A Mosquitto that lets at most WINDOW unacknowledged QoS 1 messages to a 3.1.1 client."""
    broker = MosquittoBroker(tmp_path / "mosquitto", max_inflight_messages=WINDOW)
    broker.start()
    try:
        yield broker
    finally:
        broker.close()


def test_a_flood_of_waits_larger_than_the_in_flight_window_does_not_stop_other_requests(
    tmp_path: Path, small_window: MosquittoBroker, standin: Standin, topic_prefix: str
) -> None:
    created = endless_videos(standin)
    path, env = make_config(
        tmp_path,
        broker_port=small_window.port,
        api_base=standin.url,
        prefix=topic_prefix,
        # MQTT 3.1.1 has no Receive Maximum: the broker's max_inflight_messages (5) is the window.
        mqtt={"protocol": "3.1.1"},
        extra={"jobs": {"max_waiting": 16, "max_waiting_per_caller": 4, **FAST_POLLING}},
    )
    floods = 12
    with (
        BridgeThread.from_file(path, env) as bridge,
        TestClient.for_broker(small_window, prefix=topic_prefix) as client,
    ):
        client.subscribe(f"{topic_prefix}/response/#")
        for i in range(floods):  # three callers, four waits each: all within the bounds
            client.publish(
                client.topic("request", "createVideo", f"dev{i % 3}/{i}"),
                {"prompt": f"cat {i}", "_bridge": {"wait": {"timeout": 600}}},
            )
        # On main the first five waits held the window and the rest were never delivered.
        reply = client.request("listModels", {"transaction": "after"}, suffix="kitchen", timeout=10)
        assert reply["status"] == "ok" and reply["transaction"] == "after"
        assert len(created.wait_for(floods)) == floods  # every wait reached the bridge
        assert client.messages(f"{topic_prefix}/response/createVideo/#") == []  # still waiting
    assert TEST_API_KEY not in bridge.log_text()


def journaled_deadline(journal: Path) -> float:
    """The deadline of the one detached wait in a bridge's SQLite journal."""
    with sqlite3.connect(f"file:{journal}?mode=ro", uri=True) as db:
        (job,) = db.execute("SELECT job FROM entries WHERE waiting = 1").fetchone()
    deadline: float = loads(job)["wait"]["deadline"]
    return deadline


def test_kill_9_during_a_detached_wait_replies_after_the_restart_to_the_original_request(
    tmp_path: Path, own_mosquitto: MosquittoBroker, standin: Standin, topic_prefix: str
) -> None:
    done = threading.Event()
    job = {"id": "video_8", "object": "video"}

    def state(record: RecordedRequest) -> Reply:
        return Reply(json={**job, "status": "completed" if done.is_set() else "in_progress"})

    standin.script("POST", "/videos", Reply(json={**job, "status": "queued"}))
    standin.script("GET", "/videos/video_8", state)
    path, env = make_config(
        tmp_path,
        broker_port=own_mosquitto.port,
        api_base=standin.url,
        prefix=topic_prefix,
        mqtt={"session_expiry": 600},
        extra={"jobs": FAST_POLLING},
    )
    client = durable_client(own_mosquitto, topic_prefix)
    inbox = f"{topic_prefix}/response/createVideo/v/inbox"  # under the subscribed response/#
    bridges = [BridgeProcess(path, env, tmp_path / f"bridge-{n}.log") for n in range(2)]
    try:
        bridges[0].start()
        client.publish(
            client.topic("request", "createVideo", "v"),
            {"prompt": "x", "transaction": 1, "_bridge": {"wait": True, "format": "json"}},
            response_topic=inbox,
            correlation_data=b"\x00corr-42\xff",
        )
        standin.wait_for_requests(3)  # created, then polled twice: detached and acknowledged
        bridges[0].kill()
        assert client.messages(f"{topic_prefix}/response/#") == []
        done.set()
        bridges[1].start()
        reply = client.wait_for_one(inbox, timeout=15)
        assert reply.correlation_data == b"\x00corr-42\xff"
        body = reply.json()
        assert body["status"] == "ok" and body["transaction"] == 1
        assert body["data"]["status"] == "completed"
        assert posts(standin) == 1  # created once, resumed from the journal
        log = bridges[1].log_text()
        assert '"event": "job waits resumed from the journal"' in log
        # The request was acknowledged before the kill: the broker did not hand it over again.
        assert '"dup": true' not in log
        assert len(client.messages(f"{topic_prefix}/response/#")) == 1
    finally:
        for bridge in bridges:
            bridge.close()
        client.disconnect()
    for bridge in bridges:
        assert TEST_API_KEY not in bridge.log_text()


def test_a_deadline_that_passes_while_the_bridge_is_down_gives_job_timeout_on_restart(
    tmp_path: Path, own_mosquitto: MosquittoBroker, standin: Standin, topic_prefix: str
) -> None:
    release = threading.Event()
    job = {"id": "video_2", "object": "video"}

    def stuck_poll(record: RecordedRequest) -> Reply:
        release.wait(30)  # the poll is still open when the bridge is killed
        return Reply(json={**job, "status": "in_progress"})

    standin.script("POST", "/videos", Reply(json={**job, "status": "queued"}))
    standin.script("GET", "/videos/video_2", stuck_poll)
    path, env = make_config(
        tmp_path,
        broker_port=own_mosquitto.port,
        api_base=standin.url,
        prefix=topic_prefix,
        mqtt={"session_expiry": 600},
        extra={"jobs": FAST_POLLING, "journal": {"path": str(tmp_path / "journal.sqlite3")}},
    )
    client = durable_client(own_mosquitto, topic_prefix)
    bridges = [BridgeProcess(path, env, tmp_path / f"bridge-{n}.log") for n in range(2)]
    try:
        bridges[0].start()
        client.publish(
            client.topic("request", "createVideo", "v"),
            {"prompt": "x", "_bridge": {"wait": {"timeout": 1}}},
        )
        standin.wait_for_requests(2)  # created, and the first poll hangs
        bridges[0].kill()
        deadline = journaled_deadline(tmp_path / "journal.sqlite3")
        # The wait's deadline is wall-clock time: it has to pass while the bridge is down.
        time.sleep(max(0.0, deadline - time.time()) + 0.05)
        bridges[1].start()
        reply = client.wait_for_one(f"{topic_prefix}/response/createVideo/v", timeout=15).json()
        assert reply["error"]["code"] == "job_timeout"
        assert reply["error"]["job_id"] == "video_2"
        assert reply["error"]["job_status"] == "queued"  # the last status the journal knew
        assert posts(standin) == 1
        assert [r.method for r in standin.requests].count("GET") == 1  # not polled again
    finally:
        release.set()
        for bridge in bridges:
            bridge.close()
        client.disconnect()


def resumed(bridge: BridgeProcess) -> int:
    """How many waits the bridge's start resumed from the journal (its log line says)."""
    for line in bridge.log_text().splitlines():
        if '"job waits resumed from the journal"' in line:
            count: int = json.loads(line)["jobs"]
            return count
    return 0


def test_the_wait_bounds_count_detached_and_resumed_waits(
    tmp_path: Path, own_mosquitto: MosquittoBroker, standin: Standin, topic_prefix: str
) -> None:
    created = endless_videos(standin)
    path, env = make_config(
        tmp_path,
        broker_port=own_mosquitto.port,
        api_base=standin.url,
        prefix=topic_prefix,
        mqtt={"session_expiry": 600},
        extra={"jobs": {"max_waiting": 4, "max_waiting_per_caller": 2, **FAST_POLLING}},
    )
    client = durable_client(own_mosquitto, topic_prefix)
    wait = {"_bridge": {"wait": {"timeout": 600}}}

    def ask(caller: str, n: int) -> None:
        client.publish(
            client.topic("request", "createVideo", f"{caller}/{n}"), {"prompt": str(n), **wait}
        )

    def refused(caller: str, n: int) -> str:
        message = client.wait_for_one(f"{topic_prefix}/response/createVideo/{caller}/{n}")
        error = message.json()["error"]
        assert error["code"] == "too_many_waits" and error["retryable"] is True
        return str(error["message"])

    bridges = [BridgeProcess(path, env, tmp_path / f"bridge-{n}.log") for n in range(2)]
    try:
        bridges[0].start()
        for n, caller in enumerate(["a", "a", "b"]):
            ask(caller, n)
        created.wait_for(3)
        ask("a", 3)  # a third for caller a: refused while its two are detached
        assert "max_waiting_per_caller = 2" in refused("a", 3)
        assert len(created) == 3
        bridges[0].kill()
        bridges[1].start()  # resumes the three from the journal before it serves
        assert resumed(bridges[1]) == 3
        ask("a", 4)
        assert "max_waiting_per_caller = 2" in refused("a", 4)
        ask("c", 5)  # the fourth place in the pool
        ask("d", 6)
        assert "max_waiting = 4" in refused("d", 6)
        assert created.wait_for(4) == ["video_1", "video_2", "video_3", "video_4"]  # c's
        assert client.messages(f"{topic_prefix}/response/createVideo/c/#") == []
        # Served meanwhile: the waits hold nothing the other requests need.
        assert client.request("listModels", {}, suffix="a")["status"] == "ok"
        assert created == ["video_1", "video_2", "video_3", "video_4"]  # d's wait started none
    finally:
        for bridge in bridges:
            bridge.close()
        client.disconnect()
