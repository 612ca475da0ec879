"""Realtime sessions in a group of bridge processes (docs/scaling.md#realtime-sessions): two
bridges in one `$share` group, and a supervisor with two workers, on a real Mosquitto with the
realtime stand-in. Each session is served by one process, in order, answered once."""

from __future__ import annotations

import contextlib
import json
import os
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from support.bridge_runner import TEST_API_KEY, BridgeProcess, make_config
from support.broker import MosquittoBroker
from support.mqtt_client import Received, TestClient
from support.realtime_standin import RealtimeStandin, pcm_of, wav_file

CHUNK = 960
"""20 ms of 24 kHz mono PCM16."""
SESSIONS = 4


@pytest.fixture
def upstream() -> Iterator[RealtimeStandin]:
    """A fresh realtime stand-in."""
    with RealtimeStandin() as server:
        yield server


class Device:
    """A device on one session; after `open` it publishes where the state's `input` says."""

    def __init__(self, client: TestClient, prefix: str, session: str) -> None:
        self.client, self.session, self.prefix = client, session, prefix
        self.inp = f"{prefix}/request/realtime/{session}"
        self.out = f"{prefix}/response/realtime/{session}"
        client.subscribe(f"{self.out}/#")

    def open(self) -> None:
        self.client.publish(
            f"{self.prefix}/request/realtime/{self.session}/open",
            {"outputs": ["audio", "error", "done"], "chunk_bytes": 4800},
        )

    def opened(self, after: int = 0) -> dict[str, Any]:
        """Wait for `open` (after `after`, a mark); publish to its `input` from now on."""
        state = self.client.wait_for_one(
            f"{self.out}/state", 15, after=after, where=lambda m: m.json()["state"] == "open"
        ).json()
        self.inp = state["input"]
        body: dict[str, Any] = state
        return body

    def state(self, state: str, timeout: float = 15.0) -> dict[str, Any]:
        found = self.client.wait_for_one(
            f"{self.out}/state", timeout, where=lambda m: m.json()["state"] == state
        )
        body: dict[str, Any] = found.json()
        return body

    def error(self, code: str) -> dict[str, Any]:
        found = self.client.wait_for_one(
            f"{self.out}/error", 10, where=lambda m: m.json()["code"] == code
        )
        body: dict[str, Any] = found.json()
        return body

    def received(self, output: str, after: int = 0) -> list[Received]:
        return self.client.messages(f"{self.out}/{output}", after=after)

    def event(self, event: Any) -> None:
        self.client.publish(f"{self.inp}/event", event)

    def ask(self, pcm: bytes) -> None:
        """Stream `pcm` in 20 ms chunks, commit, ask for the answer."""
        for at in range(0, len(pcm), CHUNK):
            self.client.publish(f"{self.inp}/audio", pcm[at : at + CHUNK])
        self.event({"type": "input_audio_buffer.commit"})
        self.event({"type": "response.create"})

    def answer(self, after: int = 0) -> bytes:
        """The answer's audio, once `done` came."""
        self.client.wait_for_one(f"{self.out}/done", 15, after=after)
        return b"".join(m.payload for m in self.received("audio", after))


def _questions(tmp_path: Path, count: int) -> list[bytes]:
    """`count` different 0.2 s questions (10 chunks each)."""
    return [pcm_of(wav_file(tmp_path / f"q{n}.wav", 0.2, 200.0 + 150 * n)) for n in range(count)]


def _serve_sessions(
    client: TestClient, prefix: str, upstream: RealtimeStandin, tmp_path: Path
) -> tuple[list[Device], dict[str, dict[str, Any]]]:
    """Open SESSIONS sessions through the group, stream a question on each (interleaved), and
    check each answer comes back byte-exact; the devices and their `open` states."""
    devices = [Device(client, prefix, f"s{n}") for n in range(SESSIONS)]
    for device in devices:
        device.open()
    states = {d.session: d.opened() for d in devices}
    for device in devices:
        state = states[device.session]
        assert device.inp == f"{prefix}/pinned/{state['member']}/realtime/{device.session}"
    questions = _questions(tmp_path, SESSIONS)
    for at in range(0, len(questions[0]), CHUNK):  # the sessions' chunks interleaved
        for device, pcm in zip(devices, questions, strict=True):
            client.publish(f"{device.inp}/audio", pcm[at : at + CHUNK])
    for device in devices:
        device.event({"type": "input_audio_buffer.commit"})
        device.event({"type": "response.create"})
    for device, pcm in zip(devices, questions, strict=True):
        assert device.answer() == pcm
        assert device.received("error") == []
    # One upstream socket per session, every chunk byte-exact and in order, nothing mixed.
    assert len(upstream.connections) == SESSIONS
    assert sorted(bytes(c.audio) for c in upstream.connections) == sorted(questions)
    assert all(c.invalid == [] for c in upstream.connections)
    return devices, states


def _member(tmp_path: Path, mosquitto: MosquittoBroker, url: str, prefix: str, name: str) -> Any:
    path, env = make_config(
        tmp_path,
        broker_port=mosquitto.port,
        api_base=url,
        prefix=prefix,
        mqtt={
            "shared_group": "voice",
            "instance": name,
            "client_id": f"bridge-{prefix}-{name}",
            "session_expiry": 60,
        },
        extra={"logging": {"level": "info"}},
    )
    return BridgeProcess(path.rename(tmp_path / f"{name}.toml"), env, tmp_path / f"{name}.log")


def test_a_share_group_pins_each_session_to_one_bridge_and_reaps_a_dead_ones(
    tmp_path: Path,
    mosquitto: MosquittoBroker,
    client: TestClient,
    topic_prefix: str,
    upstream: RealtimeStandin,
    processes: list[BridgeProcess],
) -> None:
    members: dict[str, BridgeProcess] = {}
    for name in ("east", "west"):
        members[name] = _member(tmp_path, mosquitto, upstream.url, topic_prefix, name)
        processes.append(members[name])
        members[name].start()
    devices, states = _serve_sessions(client, topic_prefix, upstream, tmp_path)
    # Mosquitto hands the opens round-robin: both bridges serve, each its own sessions.
    assert {s["member"] for s in states.values()} == {"east", "west"}
    assert all(s["instance"] == s["member"] for s in states.values())
    opened = {
        n: p.log_text().count('"event": "realtime session opening"') for n, p in members.items()
    }
    assert sum(opened.values()) == SESSIONS and opened == {
        n: sum(s["member"] == n for s in states.values()) for n in members
    }

    # The old topic in a group: one member answers, naming the input topic.
    first = devices[0]
    client.publish(f"{topic_prefix}/request/realtime/{first.session}/audio", b"\0" * CHUNK)
    assert first.inp in first.error("use_input_topic")["message"]

    # Hostile input on a member's input topic: a clear error, answered by that member only.
    client.subscribe(f"{topic_prefix}/response/realtime/error")
    client.publish(f"{topic_prefix}/pinned/east/realtime/../audio", b"\0")
    bad = client.wait_for_one(f"{topic_prefix}/response/realtime/error")
    assert bad.json()["code"] == "bad_session_name"
    ghost = Device(client, topic_prefix, "ghost")
    client.publish(f"{topic_prefix}/pinned/west/realtime/ghost/audio", b"\0" * CHUNK)
    ghost.error("unknown_session")

    # One open published twice: one session, one session_exists, from whichever got the second.
    dup = Device(client, topic_prefix, "dup")
    dup.open()
    dup.open()
    dup.error("session_exists")
    dup.opened()
    dup.client.publish(f"{dup.inp}/close", b"")
    assert dup.state("closed")["reason"] == "client_close"
    assert len(dup.received("error")) == 1
    assert [m.json()["state"] for m in dup.received("state")] == ["connecting", "open", "closed"]
    assert len(upstream.connections) == SESSIONS + 1
    assert len(first.received("error")) == 1  # the wrong-topic audio: answered once
    assert len(ghost.received("error")) == 1
    assert len(client.messages(f"{topic_prefix}/response/realtime/error")) == 1

    # kill -9 the owner of the first session: the survivor publishes its `closed`.
    victim = states[first.session]["member"]
    survivor = next(n for n in members if n != victim)
    members[victim].kill()
    for device in devices:
        if states[device.session]["member"] == victim:
            closed = device.state("closed")
            assert (closed["reason"], closed["member"]) == ("bridge_lost", victim)
    with TestClient.for_broker(mosquitto, prefix=topic_prefix) as late:
        late.subscribe(f"{first.out}/state")
        assert late.wait_for_one(f"{first.out}/state").json()["reason"] == "bridge_lost"
    # ... and the name is free: reopened, the survivor serves it.
    mark = client.mark()
    first.open()
    assert first.opened(after=mark)["member"] == survivor
    question = _questions(tmp_path, 1)[0]
    first.ask(question)
    assert first.answer(after=mark) == question
    for device in devices:  # the survivor's own sessions never closed
        if states[device.session]["member"] == survivor:
            assert [m.json()["state"] for m in device.received("state")][-1] == "open"
    for message in client.messages(f"{topic_prefix}/#"):
        assert TEST_API_KEY.encode() not in message.payload


def _worker_pids(proc: BridgeProcess) -> dict[int, int]:
    """The latest pid of each worker, from the supervisor's `worker started` lines."""
    pids: dict[int, int] = {}
    for line in proc.log_text().splitlines():
        if '"event": "worker started"' in line:
            record = json.loads(line)
            pids[record["worker"]] = record["pid"]
    return pids


def test_workers_pin_each_session_to_one_worker_and_reap_a_killed_ones(
    tmp_path: Path,
    mosquitto: MosquittoBroker,
    client: TestClient,
    topic_prefix: str,
    upstream: RealtimeStandin,
) -> None:
    path, env = make_config(
        tmp_path,
        broker_port=mosquitto.port,
        api_base=upstream.url,
        prefix=topic_prefix,
        mqtt={"instance": "pool", "session_expiry": 300},
        extra={"runtime": {"workers": 2}, "logging": {"level": "info"}},
    )
    pool = BridgeProcess(path, env, tmp_path / "bridge.log")
    try:
        pool.start()
        devices, states = _serve_sessions(client, topic_prefix, upstream, tmp_path)
        assert {s["member"] for s in states.values()} == {"pool.1", "pool.2"}
        assert {s["instance"] for s in states.values()} == {"pool"}

        first = devices[0]
        victim = states[first.session]["member"]
        os.kill(_worker_pids(pool)[int(victim.rpartition(".")[2])], signal.SIGKILL)
        for device in devices:
            if states[device.session]["member"] == victim:
                closed = device.state("closed")
                assert (closed["reason"], closed["member"]) == ("bridge_lost", victim)
        mark = client.mark()
        first.open()
        first.opened(after=mark)
        question = _questions(tmp_path, 1)[0]
        first.ask(question)
        assert first.answer(after=mark) == question
        assert len(upstream.connections) == SESSIONS + 1
    finally:
        pool.close()
        for pid in _worker_pids(pool).values():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    assert TEST_API_KEY not in pool.log_text()
