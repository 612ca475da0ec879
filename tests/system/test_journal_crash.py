"""The journal in a running bridge: kill -9 under load never re-buys an answer; bad journals."""

from __future__ import annotations

import base64
import contextlib
import json
import os
import signal
import sqlite3
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from support.bridge_runner import (
    BridgeProcess,
    BridgeThread,
    make_config,
)
from support.bridge_runner import _Deadline as Deadline
from support.bridges import spawn_process
from support.broker import MosquittoBroker
from support.mqtt_client import TestClient, durable_client
from support.standin import RecordedRequest, Reply, Standin

from bridge.journal import tail as tails

TOTAL = 200


def spread_latency(record: RecordedRequest) -> Reply:
    """The echo answer after 0.8-1.6 s, spread by arrival number (a chat answer's latency).

    A fixed latency would answer the requests in bursts of `max_concurrency`; a real service's
    answers arrive spread out, and so does a kill. At about 50 answers a second, an answer
    waits unread in its socket only when the bridge is far behind (a machine busy with other
    work), which is what the bound of 5 allows for.
    """
    echo = {"object": "standin", "method": record.method, "path": record.path}
    return Reply(json={**echo, "echo": record.json()}, delay=0.8 + (record.index * 37 % 101) / 125)


def spawn(
    tmp_path: Path,
    processes: list[BridgeProcess],
    broker: MosquittoBroker,
    standin: Standin,
    prefix: str,
    journal: dict[str, Any],
) -> BridgeProcess:
    return spawn_process(
        tmp_path,
        processes,
        broker,
        standin,
        prefix,
        mqtt={"session_expiry": 600},
        # 64 calls open at once: the stall test waits for 64 journaled answers before the kill.
        limits={"max_concurrency": 64},
        extra={"journal": journal},
    )


def wait_for_every_transaction(client: TestClient, prefix: str) -> Counter[Any]:
    """Replies per transaction once all TOTAL have one (a redelivered one may come twice)."""
    replies: Counter[Any] = Counter()
    for _ in range(2 * TOTAL):  # each round waits for at least one more reply
        if len(replies) >= TOTAL:
            break
        client.wait_for(f"{prefix}/response/#", sum(replies.values()) + 1, timeout=30)
        replies = Counter(m.json()["transaction"] for m in client.messages(f"{prefix}/response/#"))
    return replies


@dataclass
class CrashRun:
    answered_before_kill: set[str]
    """Inputs whose answer the stand-in had finished writing when the bridge was killed."""
    calls: Counter[str]
    """How often each input reached the stand-in, over both runs."""
    replies: Counter[Any]
    """Replies per transaction seen by the client."""

    @property
    def bought_twice(self) -> set[str]:
        """Answers the stand-in had delivered before the kill and was asked for again."""
        return {name for name in self.answered_before_kill if self.calls[name] > 1}


def kill_mid_load(
    tmp_path: Path,
    broker: MosquittoBroker,
    standin: Standin,
    prefix: str,
    processes: list[BridgeProcess],
    journal: dict[str, Any],
) -> CrashRun:
    """200 requests (0.8-1.6 s upstream), kill -9 after 80 were answered, restart, drain."""
    standin.set_default(spread_latency)
    client = durable_client(broker, prefix)
    try:
        first = spawn(tmp_path, processes, broker, standin, prefix, journal)
        for i in range(TOTAL):
            client.publish(
                client.topic("request", "createModeration", f"r{i}"),
                {"transaction": i, "input": f"in-{i}"},
            )
        standin.wait_for_answers(TOTAL * 2 // 5, timeout=30)
        killed_at = time.monotonic()
        first.kill()
        answered = {
            str(r.json()["input"])
            for r in standin.requests
            if (at := standin.answered_at(r)) is not None and at < killed_at
        }
        standin.set_default(None)
        spawn(tmp_path, processes, broker, standin, prefix, journal)
        replies = wait_for_every_transaction(client, prefix)
        calls = Counter(str((r.json() or {}).get("input")) for r in standin.requests)
        return CrashRun(answered, calls, replies)
    finally:
        client.disconnect()


def test_kill_9_mid_load_never_rebuys_a_delivered_answer(
    tmp_path: Path,
    own_mosquitto: MosquittoBroker,
    standin: Standin,
    topic_prefix: str,
    processes: list[BridgeProcess],
) -> None:
    run = kill_mid_load(
        tmp_path, own_mosquitto, standin, topic_prefix, processes, {"scope": "answers"}
    )
    print(
        f"journal=answers answered_before_kill={len(run.answered_before_kill)}"
        f" bought_twice={len(run.bought_twice)} calls={sum(run.calls.values())}"
    )
    assert set(run.replies) == set(range(TOTAL))  # nothing unanswered
    assert set(run.calls) == {f"in-{i}" for i in range(TOTAL)}
    assert len(run.answered_before_kill) >= 20  # the kill really hit answered requests
    assert len(run.bought_twice) <= 5, sorted(run.bought_twice)
    assert max(run.calls.values()) <= 2


def journaled_answers(path: Path) -> int:
    """Keys with an answer in the journal at `path`, read the way a second process would: in
    SQLite or in a tail file next to it (with `synchronous = "normal"` an answer stays there
    until the file holds 1 MiB; both survive kill -9)."""
    keys: set[bytes] = set()
    # The tail files first: a hand-over moves their answers to SQLite, never the other way.
    for file in path.parent.glob(f"{path.name}-tail*.*"):
        with contextlib.suppress(FileNotFoundError):  # handed over and removed meanwhile
            data = file.read_bytes()
            keys.update(key for _, kind, key, _ in tails.records(data) if kind == tails.ANSWER)
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        keys.update(k for (k,) in db.execute("SELECT key FROM entries WHERE answer IS NOT NULL"))
    except sqlite3.OperationalError:  # the bridge has not created the table yet
        pass
    finally:
        db.close()
    return len(keys)


def outage_then_kill(
    tmp_path: Path,
    broker: MosquittoBroker,
    standin: Standin,
    prefix: str,
    processes: list[BridgeProcess],
    scope: str,
) -> CrashRun:
    """The broker stalls while 64 calls are open; their answers arrive; kill -9; all resumes."""
    standin.set_latency(0.3)
    client = durable_client(broker, prefix)
    journal = tmp_path / "outage.sqlite3"
    config = {"scope": scope, "path": str(journal)}
    assert broker.pid is not None
    try:
        first = spawn(tmp_path, processes, broker, standin, prefix, config)
        for i in range(TOTAL):
            client.publish(
                client.topic("request", "createModeration", f"r{i}"),
                {"transaction": i, "input": f"in-{i}"},
            )
        standin.wait_for_requests(64, timeout=30)
        os.kill(broker.pid, signal.SIGSTOP)  # replies can no longer be acknowledged
        try:
            standin.wait_for_answers(64, timeout=30)
            if scope != "off":  # wait until the bridge has read and journaled every answer
                deadline = Deadline(30)
                while journaled_answers(journal) < 64 and not deadline.expired():
                    deadline.pause()
                assert journaled_answers(journal) >= 64, "the answers never reached the journal"
            killed_at = time.monotonic()
            first.kill()
        finally:
            os.kill(broker.pid, signal.SIGCONT)
        answered = {
            str(r.json()["input"])
            for r in standin.requests
            if (at := standin.answered_at(r)) is not None and at < killed_at
        }
        standin.set_latency(0.0)
        spawn(tmp_path, processes, broker, standin, prefix, config)
        replies = wait_for_every_transaction(client, prefix)
        calls = Counter(str((r.json() or {}).get("input")) for r in standin.requests)
        return CrashRun(answered, calls, replies)
    finally:
        client.disconnect()


@pytest.mark.parametrize("scope", ["answers", "off"])
def test_answers_received_during_a_broker_stall_survive_kill_9(
    tmp_path: Path,
    own_mosquitto: MosquittoBroker,
    standin: Standin,
    topic_prefix: str,
    processes: list[BridgeProcess],
    scope: str,
) -> None:
    run = outage_then_kill(tmp_path, own_mosquitto, standin, topic_prefix, processes, scope)
    print(
        f"stall journal={scope} answered_before_kill={len(run.answered_before_kill)}"
        f" bought_twice={len(run.bought_twice)} calls={sum(run.calls.values())}"
    )
    assert set(run.replies) == set(range(TOTAL))
    assert len(run.answered_before_kill) >= 64
    if scope == "off":
        assert len(run.bought_twice) > 5  # the control: (nearly) all were bought again
    else:
        assert run.bought_twice == set()
        assert max(run.calls.values()) <= 2  # only a call still open at the kill may repeat
        assert processes[1].log_text().count('"status": "journaled"') >= 60


# --- a journal that cannot be used -------------------------------------------------------------


def start_with_journal(
    tmp_path: Path, mosquitto: MosquittoBroker, standin: Standin, prefix: str, journal_path: Path
) -> BridgeThread:
    path, env = make_config(
        tmp_path,
        broker_port=mosquitto.port,
        api_base=standin.url,
        prefix=prefix,
        extra={"journal": {"path": str(journal_path)}},
    )
    return BridgeThread.from_file(path, env).start()


def test_corrupt_journal_bridge_runs_and_says_why(
    tmp_path: Path, mosquitto: MosquittoBroker, standin: Standin, topic_prefix: str
) -> None:
    journal = tmp_path / "state" / "journal.sqlite3"
    journal.parent.mkdir()
    journal.write_bytes(b"\x00garbage, not SQLite\x00" * 1000)
    bridge = start_with_journal(tmp_path, mosquitto, standin, topic_prefix, journal)
    try:
        with TestClient.for_broker(mosquitto, prefix=topic_prefix) as client:
            assert client.request("listModels", {})["status"] == "ok"
    finally:
        bridge.stop()
    log = bridge.log_text()
    assert '"event": "journal unavailable; running without it"' in log
    assert "move it away" in log and str(journal) in log


def test_unwritable_state_directory_bridge_runs_and_says_why(
    tmp_path: Path, mosquitto: MosquittoBroker, standin: Standin, topic_prefix: str
) -> None:
    blocker = tmp_path / "state"
    blocker.write_text("a file where the state directory should be")
    bridge = start_with_journal(tmp_path, mosquitto, standin, topic_prefix, blocker / "j.sqlite3")
    try:
        with TestClient.for_broker(mosquitto, prefix=topic_prefix) as client:
            assert client.request("listModels", {})["status"] == "ok"
    finally:
        bridge.stop()
    log = bridge.log_text()
    assert '"event": "journal unavailable; running without it"' in log
    assert "cannot create the state directory" in log


def test_full_journal_prunes_the_oldest_and_keeps_answering(
    tmp_path: Path, mosquitto: MosquittoBroker, standin: Standin, topic_prefix: str
) -> None:
    journal = tmp_path / "journal.sqlite3"
    path, env = make_config(
        tmp_path,
        broker_port=mosquitto.port,
        api_base=standin.url,
        prefix=topic_prefix,
        extra={"journal": {"path": str(journal), "max_bytes": 128 * 1024}},
    )
    bridge = BridgeThread.from_file(path, env).start()
    big = base64.b64encode(os.urandom(6000)).decode()  # 8,000 characters zlib cannot shrink much
    try:
        with TestClient.for_broker(mosquitto, prefix=topic_prefix) as client:
            for i in range(60):  # about 480 KB of answers through a 128 KiB journal
                reply = client.request("createModeration", {"transaction": i, "input": big})
                assert reply["status"] == "ok"
    finally:
        bridge.stop()
    assert journal.stat().st_size <= 2 * 128 * 1024

    with sqlite3.connect(journal) as db:
        kept = db.execute("SELECT count(*) FROM entries").fetchone()[0]
    db.close()
    assert 0 < kept < 60


def test_a_repeat_after_a_restart_is_answered_from_the_journal(
    tmp_path: Path, mosquitto: MosquittoBroker, standin: Standin, topic_prefix: str
) -> None:
    path, env = make_config(
        tmp_path, broker_port=mosquitto.port, api_base=standin.url, prefix=topic_prefix
    )
    request = {"transaction": "t-1", "input": "hello"}
    with TestClient.for_broker(mosquitto, prefix=topic_prefix) as client:
        with BridgeThread.from_file(path, env):
            first = client.request("createModeration", request, suffix="door")
        with BridgeThread.from_file(path, env) as second:
            # The same request again (not a redelivery): the reply cache died with the first
            # process; the journal knows it was answered within dedup_seconds.
            again = client.request("createModeration", request, suffix="door")
            other = client.request("createModeration", {"transaction": "t-2", "input": "x"})
    assert again == first and other["status"] == "ok"
    assert [r.json()["input"] for r in standin.requests] == ["hello", "x"]
    [served] = [
        json.loads(line)
        for line in second.log_text().splitlines()
        if '"status": "journaled"' in line
    ]
    # The journal-served line names the request like every other: suffix and transaction.
    assert served["transaction"] == "t-1" and served["suffix"] == "door"
