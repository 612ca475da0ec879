"""Realtime sessions end to end: a real Mosquitto, a real bridge, a real WebSocket stand-in."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from support.bridge_runner import TEST_API_KEY, BridgeProcess, make_config
from support.broker import MosquittoBroker
from support.mqtt_client import Received, TestClient
from support.realtime_standin import RealtimeStandin, pcm_of, wav_file

StartBridge = Callable[..., Any]
CHUNK = 960
"""20 ms of 24 kHz mono PCM16."""


@pytest.fixture
def upstream() -> Iterator[RealtimeStandin]:
    """A fresh realtime stand-in."""
    with RealtimeStandin() as server:
        yield server


class Device:
    """A device on one session: topics, and waiting for the session's outputs."""

    def __init__(self, client: TestClient, prefix: str, session: str, kind: str = "realtime"):
        self.client, self.session = client, session
        self.inp = f"{prefix}/request/{kind}/{session}"
        self.out = f"{prefix}/response/{kind}/{session}"
        client.subscribe(f"{self.out}/#")

    def open(self, **options: Any) -> None:
        self.client.publish(f"{self.inp}/open", options)

    def event(self, event: Any) -> None:
        self.client.publish(f"{self.inp}/event", event)

    def audio(self, data: bytes) -> None:
        self.client.publish(f"{self.inp}/audio", data)

    def close(self) -> None:
        self.client.publish(f"{self.inp}/close", b"")

    def state(self, state: str, timeout: float = 10.0) -> dict[str, Any]:
        found = self.client.wait_for_one(
            f"{self.out}/state", timeout, where=lambda m: m.json()["state"] == state
        )
        body: dict[str, Any] = found.json()
        return body

    def error(self, code: str, timeout: float = 10.0) -> dict[str, Any]:
        found = self.client.wait_for_one(
            f"{self.out}/error", timeout, where=lambda m: m.json()["code"] == code
        )
        body: dict[str, Any] = found.json()
        return body

    def received(self, output: str) -> list[Received]:
        return self.client.messages(f"{self.out}/{output}")

    def stream(self, pcm: bytes) -> None:
        for at in range(0, len(pcm), CHUNK):
            self.audio(pcm[at : at + CHUNK])


def test_wav_in_20ms_chunks_arrives_byte_exact_and_the_answer_comes_back_byte_exact(
    start_bridge: StartBridge,
    client: TestClient,
    topic_prefix: str,
    upstream: RealtimeStandin,
    tmp_path: Path,
) -> None:
    bridge = start_bridge(api_base=upstream.url)
    pcm = pcm_of(wav_file(tmp_path / "question.wav", 1.0))
    device = Device(client, topic_prefix, "kitchen")
    device.open(model="gpt-realtime", session={"type": "realtime"}, chunk_bytes=640)
    assert device.state("open")["model"] == "gpt-realtime"
    device.stream(pcm)
    device.event({"type": "input_audio_buffer.commit"})
    device.event({"type": "response.create"})
    device.client.wait_for(f"{device.out}/event", where=lambda m: b'"response.done"' in m.payload)

    conn = upstream.connections[0]
    assert conn.path == "/v1/realtime" and conn.query == {"model": "gpt-realtime"}
    assert conn.headers["Authorization"] == f"Bearer {TEST_API_KEY}"
    assert conn.invalid == [] and conn.sent_invalid == []
    assert bytes(conn.audio) == pcm
    types = [e["type"] for e in conn.events]
    assert types[0] == "session.update"
    assert types[-2:] == ["input_audio_buffer.commit", "response.create"]
    assert types.count("input_audio_buffer.append") == len(pcm) // CHUNK

    audio = device.received("audio")
    assert all(len(m.payload) <= 640 for m in audio)
    assert b"".join(m.payload for m in audio) == pcm
    text = "".join(m.text() for m in device.received("text"))
    assert text == "you saidecho of your audio"
    events = [m.json()["type"] for m in device.received("event")]
    assert events[0] == "session.created"
    assert events.index("response.created") < events.index("response.output_audio.delta")
    assert events[-3:] == [
        "response.function_call_arguments.done",
        "response.output_item.done",
        "response.done",
    ]
    deltas = [
        m.json()["event_id"] for m in device.received("event") if "_a" in m.json()["event_id"]
    ]
    assert deltas == [f"evt_a{n}" for n in range(len(deltas))]

    device.close()
    assert device.state("closed")["reason"] == "client_close"
    upstream.wait_for(lambda conns: conns[0].closed_by_client)
    for message in client.messages(f"{topic_prefix}/#"):
        assert TEST_API_KEY.encode() not in message.payload
    assert TEST_API_KEY not in bridge.log_text()


def test_two_sessions_at_once_never_mix(
    start_bridge: StartBridge,
    client: TestClient,
    topic_prefix: str,
    upstream: RealtimeStandin,
    tmp_path: Path,
) -> None:
    start_bridge(api_base=upstream.url)
    low = pcm_of(wav_file(tmp_path / "low.wav", 0.4, 200.0))
    high = pcm_of(wav_file(tmp_path / "high.wav", 0.4, 900.0))
    a, b = Device(client, topic_prefix, "a"), Device(client, topic_prefix, "b")
    a.open(outputs=["audio", "error"])
    b.open(outputs=["audio", "error"])
    a.state("open"), b.state("open")
    for at in range(0, len(low), CHUNK):
        a.audio(low[at : at + CHUNK])
        b.audio(high[at : at + CHUNK])
    a.event({"type": "response.create"})
    b.event({"type": "response.create"})
    for device, pcm in ((a, low), (b, high)):
        device.client.wait_for(f"{device.out}/audio", n=len(pcm) // 4800)
        assert b"".join(m.payload for m in device.received("audio")) == pcm
        assert device.received("event") == [] and device.received("text") == []
    assert sorted(bytes(c.audio) for c in upstream.connections) == sorted([low, high])


ULAW = {"format": {"type": "audio/pcmu"}}
PCMU = {"type": "realtime", "audio": {"input": ULAW, "output": ULAW}}


@pytest.mark.parametrize("declared", ["at open", "by session.update"])
def test_g711_pcmu_goes_both_ways_byte_exact_and_counts_at_8_khz(
    start_bridge: StartBridge,
    client: TestClient,
    topic_prefix: str,
    upstream: RealtimeStandin,
    declared: str,
) -> None:
    """Audio in the format the session declares: 1 byte a sample, 8000 a second, in pieces of
    exactly `chunk_bytes` (no PCM16 sample alignment)."""
    start_bridge(api_base=upstream.url, extra={"realtime": {"audio_budget_seconds": 1.05}})
    ulaw = bytes((n * 37 + n // 7) % 256 for n in range(8000))  # 1 s of G.711 u-law
    device = Device(client, topic_prefix, f"ulaw-{declared[:2]}")
    if declared == "at open":
        device.open(session=PCMU, chunk_bytes=333, outputs=["audio", "error", "done"])
    else:
        device.open(chunk_bytes=333, outputs=["audio", "error", "done"])
        device.event({"type": "session.update", "session": PCMU})
    device.state("open")
    for at in range(0, len(ulaw), 160):  # 20 ms each
        device.audio(ulaw[at : at + 160])
    # 0.1 s more at 8 kHz passes the 1.05 s budget (at PCM16's rate all of it is 0.18 s).
    device.audio(b"\xff" * 800)
    assert "1.05 s of input audio" in device.error("audio_budget_spent")["message"]
    device.event({"type": "input_audio_buffer.commit"})
    device.event({"type": "response.create"})
    assert device.client.wait_for_one(f"{device.out}/done").text() == "response.done"

    conn = upstream.connections[0]
    assert conn.invalid == []
    updates = [e for e in conn.events if e["type"] == "session.update"]
    assert updates[0]["session"]["audio"]["input"]["format"] == {"type": "audio/pcmu"}
    assert bytes(conn.audio) == ulaw
    pieces = [m.payload for m in device.received("audio")]
    assert b"".join(pieces) == ulaw
    assert max(map(len, pieces)) == 333


@pytest.mark.parametrize(
    ("behaviour", "reason"), [("close", "upstream_closed"), ("stall", "upstream_lost")]
)
def test_upstream_close_and_stall_publish_closed_with_the_reason(
    start_bridge: StartBridge,
    client: TestClient,
    topic_prefix: str,
    upstream: RealtimeStandin,
    behaviour: str,
    reason: str,
) -> None:
    start_bridge(api_base=upstream.url, extra={"realtime": {"heartbeat": 0.5}})
    upstream.behaviour = behaviour
    device = Device(client, topic_prefix, "s1")
    device.open()
    device.state("open")
    device.event({"type": "response.create"})
    assert device.state("closed", timeout=15)["reason"] == reason


def test_garbage_from_upstream_is_an_error_and_the_session_lives(
    start_bridge: StartBridge, client: TestClient, topic_prefix: str, upstream: RealtimeStandin
) -> None:
    start_bridge(api_base=upstream.url)
    upstream.behaviour = "garbage"
    device = Device(client, topic_prefix, "g")
    device.open()
    device.state("open")
    device.event({"type": "response.create"})
    device.error("upstream_garbage")
    device.close()
    assert device.state("closed")["reason"] == "client_close"


@pytest.mark.parametrize(
    ("behaviour", "shown"),
    [("leak", "my key is **********"), ("leak-split", "my key is sk-te********** ok")],
)
def test_the_key_echoed_by_upstream_is_masked_on_every_topic(
    start_bridge: StartBridge,
    client: TestClient,
    topic_prefix: str,
    upstream: RealtimeStandin,
    behaviour: str,
    shown: str,
) -> None:
    start_bridge(api_base=upstream.url)
    upstream.behaviour = behaviour
    device = Device(client, topic_prefix, "leaky")
    device.open()
    device.state("open")
    device.event({"type": "response.create"})
    assert device.client.wait_for_one(f"{device.out}/done").text() == "response.done"
    # Split over deltas (a middle piece included), the key is masked from its 8th character on.
    text = "".join(m.text() for m in device.received("text"))
    assert text.replace("**********" * 2, "**********") == shown
    deltas = "".join(m.json().get("delta", "") for m in device.received("event"))
    windows = {TEST_API_KEY[i : i + 8] for i in range(len(TEST_API_KEY) - 7)}
    assert not any(w in text or w in deltas for w in windows), (text, deltas)
    for message in client.messages(f"{topic_prefix}/#"):
        assert TEST_API_KEY.encode() not in message.payload


def test_an_event_upstream_refuses_comes_back_as_an_error_and_a_refused_connect_closes(
    start_bridge: StartBridge, client: TestClient, topic_prefix: str, upstream: RealtimeStandin
) -> None:
    start_bridge(api_base=upstream.url)
    device = Device(client, topic_prefix, "picky")
    device.open()
    device.state("open")
    device.event({"type": "response.create", "response": "not an object"})
    refused = device.error("upstream_error")
    assert refused["upstream"]["type"] == "invalid_request_error"
    assert upstream.connections[0].invalid[0].startswith("response.create:")

    start_bridge(api_base="http://127.0.0.1:9/v1", prefix=f"{topic_prefix}-down")
    down = Device(client, f"{topic_prefix}-down", "nowhere")
    down.open()
    closed = down.state("closed")
    assert closed["reason"] == "connect_failed" and "refused" in closed["detail"]


@pytest.mark.parametrize(
    ("limits", "reason"),
    [({"idle_timeout": 0.5}, "idle"), ({"max_session_seconds": 0.7}, "max_duration")],
)
def test_silent_device_and_old_session_close(
    start_bridge: StartBridge,
    client: TestClient,
    topic_prefix: str,
    upstream: RealtimeStandin,
    limits: dict[str, float],
    reason: str,
) -> None:
    start_bridge(api_base=upstream.url, extra={"realtime": limits})
    device = Device(client, topic_prefix, "quiet")
    device.open()
    assert device.state("closed")["reason"] == reason
    upstream.wait_for(lambda conns: conns and conns[0].closed_by_client)


def test_limits_each_have_their_code(
    start_bridge: StartBridge, client: TestClient, topic_prefix: str, upstream: RealtimeStandin
) -> None:
    start_bridge(
        api_base=upstream.url,
        extra={
            "realtime": {
                "max_sessions": 1,
                "max_message_bytes": 2048,
                "max_events_per_second": 5,
                "max_audio_seconds": 0.05,
            }
        },
    )
    device = Device(client, topic_prefix, "one")
    device.open()
    device.state("open")
    other = Device(client, topic_prefix, "two")
    other.open()
    assert other.error("too_many_sessions")["retryable"] is True
    device.audio(b"\0" * 4096)
    device.error("message_too_large")
    for _ in range(3):
        device.audio(b"\1" * 1920)
    assert device.state("closed")["reason"] == "audio_limit"
    busy = Device(client, topic_prefix, "busy")
    busy.open()
    busy.state("open")
    for _ in range(12):
        busy.event({"type": "input_audio_buffer.clear"})
    assert busy.error("rate_limited")["retryable"] is True
    busy.client.wait_for(f"{busy.out}/event")  # the session still answers


def test_the_bridges_audio_budget_covers_all_sessions(
    start_bridge: StartBridge, client: TestClient, topic_prefix: str, upstream: RealtimeStandin
) -> None:
    start_bridge(api_base=upstream.url, extra={"realtime": {"audio_budget_seconds": 0.06}})
    first, second = Device(client, topic_prefix, "first"), Device(client, topic_prefix, "second")
    first.open()
    second.open()
    first.state("open"), second.state("open")
    first.audio(b"\1" * 1920)  # 40 ms of PCM16
    upstream.wait_for(lambda conns: sum(len(c.audio) for c in conns) == 1920)
    second.audio(b"\2" * 1920)
    refused = second.error("audio_budget_spent")
    assert refused["retryable"] is True and "0.06 s of input audio" in refused["message"]
    second.event({"type": "input_audio_buffer.clear"})
    upstream.wait_for(
        lambda conns: any(e["type"] == "input_audio_buffer.clear" for c in conns for e in c.events)
    )
    assert sorted(len(c.audio) for c in upstream.connections) == [0, 1920]


def test_hostile_input_gets_clear_errors_and_the_bridge_lives(
    start_bridge: StartBridge, client: TestClient, topic_prefix: str, upstream: RealtimeStandin
) -> None:
    start_bridge(api_base=upstream.url)
    device = Device(client, topic_prefix, "h")
    device.open()
    device.state("open")
    device.event(b"\xff not json")
    assert device.error("bad_json")["session"] == "h"
    device.event({"type": "session.hack"})
    device.error("unknown_event")
    device.event([1, 2])
    device.error("not_an_object")
    ghost = Device(client, topic_prefix, "ghost")
    ghost.audio(b"\0" * 960)
    ghost.error("unknown_session")
    client.subscribe(f"{topic_prefix}/response/realtime/error")
    for topic in ("..", "-x", "a/b", "a/b/c"):
        client.publish(f"{topic_prefix}/request/realtime/{topic}/audio", b"\0")
    bad = client.wait_for(f"{topic_prefix}/response/realtime/error", 4)
    assert {m.json()["code"] for m in bad} == {"bad_session_name"}
    device.open()
    device.error("session_exists")
    device.event({"type": "response.create"})
    device.client.wait_for(f"{device.out}/event", where=lambda m: b"response.done" in m.payload)
    assert upstream.connections[0].invalid == []


def test_access_rules_cover_realtime(
    start_bridge: StartBridge, client: TestClient, topic_prefix: str, upstream: RealtimeStandin
) -> None:
    start_bridge(api_base=upstream.url, access={"deny_methods": ["realtime"]})
    device = Device(client, topic_prefix, "d")
    device.open()
    device.error("method_not_allowed")
    assert upstream.connections == []


def test_a_bridge_with_realtime_off_refuses_sessions_clearly(
    start_bridge: StartBridge, client: TestClient, topic_prefix: str, upstream: RealtimeStandin
) -> None:
    start_bridge(api_base=upstream.url, extra={"realtime": {"enabled": False}})
    device = Device(client, topic_prefix, "d")
    device.open()
    assert "enabled is off" in device.error("realtime_unavailable")["message"]
    assert upstream.connections == []


def test_a_single_bridges_state_names_its_input_topic(
    start_bridge: StartBridge, client: TestClient, topic_prefix: str, upstream: RealtimeStandin
) -> None:
    start_bridge(api_base=upstream.url)
    device = Device(client, topic_prefix, "here")
    device.open()
    state = device.state("open")
    assert state["input"] == device.inp and "member" not in state


def test_responses_websocket_mode_and_transcription_sessions(
    start_bridge: StartBridge, client: TestClient, topic_prefix: str, upstream: RealtimeStandin
) -> None:
    start_bridge(api_base=upstream.url)
    agent = Device(client, topic_prefix, "agent", kind="responsesWebSocket")
    agent.open(outputs=["text", "error"])
    agent.state("open")
    agent.event({"type": "response.create", "model": "gpt-5", "input": "Say hello."})
    agent.client.wait_for(f"{agent.out}/text", 2)
    assert "".join(m.text() for m in agent.received("text")) == "Hello there"
    agent.audio(b"\0" * 10)
    agent.error("no_audio")

    captions = Device(client, topic_prefix, "captions", kind="realtimeTranscription")
    captions.open(session={"type": "transcription"}, outputs=["text"])
    captions.state("open")
    captions.audio(b"\0" * 960)
    captions.event({"type": "response.create"})
    captions.client.wait_for(f"{captions.out}/text")
    paths = {(c.path, tuple(sorted(c.query.items()))) for c in upstream.connections}
    assert paths == {("/v1/responses", ()), ("/v1/realtime", (("intent", "transcription"),))}
    assert all(c.invalid == [] for c in upstream.connections)


def test_bridge_shutdown_closes_every_session(
    start_bridge: StartBridge, client: TestClient, topic_prefix: str, upstream: RealtimeStandin
) -> None:
    bridge = start_bridge(api_base=upstream.url)
    device = Device(client, topic_prefix, "bye")
    device.open()
    device.state("open")
    bridge.stop()
    assert device.state("closed")["reason"] == "shutdown"
    assert upstream.connections[0].closed_by_client


def test_sigterm_and_kill_9_then_restart_publish_closed(
    tmp_path: Path,
    mosquitto: MosquittoBroker,
    client: TestClient,
    topic_prefix: str,
    upstream: RealtimeStandin,
    processes: list[BridgeProcess],
) -> None:
    path, env = make_config(
        tmp_path, broker_port=mosquitto.port, api_base=upstream.url, prefix=topic_prefix
    )
    proc = BridgeProcess(path, env, tmp_path / "bridge.log")
    processes.append(proc)
    proc.start()
    device = Device(client, topic_prefix, "p")
    device.open()
    device.state("open")
    assert proc.terminate() == 0
    assert device.state("closed")["reason"] == "shutdown"

    proc.start()
    mark = client.mark()
    device.open()
    device.client.wait_for(
        f"{device.out}/state", after=mark, where=lambda m: m.json()["state"] == "open"
    )
    proc.kill()
    mark = client.mark()
    proc.start()
    restarted = client.wait_for_one(
        f"{device.out}/state", after=mark, where=lambda m: m.json()["state"] == "closed"
    )
    assert restarted.json()["reason"] == "bridge_restarted" and restarted.retain is False
    late = TestClient.for_broker(mosquitto, prefix=topic_prefix)
    with late:
        late.subscribe(f"{device.out}/state")
        assert late.wait_for_one(f"{device.out}/state").json()["reason"] == "bridge_restarted"


def test_a_broker_restart_keeps_the_session_and_its_order(
    start_bridge: StartBridge,
    own_mosquitto: MosquittoBroker,
    topic_prefix: str,
    upstream: RealtimeStandin,
    tmp_path: Path,
) -> None:
    start_bridge(api_base=upstream.url, broker_port=own_mosquitto.port)
    pcm = pcm_of(wav_file(tmp_path / "q.wav", 0.4))
    with TestClient.for_broker(own_mosquitto, prefix=topic_prefix) as client:
        device = Device(client, topic_prefix, "steady")
        device.open(outputs=["audio", "state", "error"])
        device.state("open")
        device.stream(pcm[: len(pcm) // 2])
        upstream.wait_for(lambda conns: len(conns[0].audio) == len(pcm) // 2)
        own_mosquitto.restart()
        client.wait_connected(connects=2)
        mark = client.mark()
        device.stream(pcm[len(pcm) // 2 :])
        device.event({"type": "response.create"})
        client.wait_for(f"{device.out}/audio", n=len(pcm) // 4800, after=mark)
        assert bytes(upstream.connections[0].audio) == pcm
        audio = client.messages(f"{device.out}/audio", after=mark)
        assert b"".join(m.payload for m in audio) == pcm
        assert len(upstream.connections) == 1


def test_output_the_broker_does_not_take_is_bounded_then_the_session_closes(
    start_bridge: StartBridge,
    own_mosquitto: MosquittoBroker,
    topic_prefix: str,
    upstream: RealtimeStandin,
    tmp_path: Path,
) -> None:
    start_bridge(
        api_base=upstream.url,
        broker_port=own_mosquitto.port,
        # A loaded machine may hand the bridge all 101 messages at once: more than the default
        # burst of 100 would refuse the response.create (rate_limited, not shown here).
        extra={"realtime": {"max_pending_bytes": 65536, "max_events_per_second": 1000}},
    )
    pcm = pcm_of(wav_file(tmp_path / "long.wav", 2.0))
    upstream.behaviour = "hold"
    with TestClient.for_broker(own_mosquitto, prefix=topic_prefix) as client:
        device = Device(client, topic_prefix, "far")
        device.open(outputs=["audio", "state"])
        device.state("open")
        device.stream(pcm)
        device.event({"type": "response.create"})
        assert upstream.held.wait(10)
        own_mosquitto.stop()
        upstream.release()  # 96 KB of answer while the bridge has no broker
        upstream.wait_for(lambda conns: conns[0].closed_by_client)
        own_mosquitto.start()
        client.wait_connected(connects=2)
        closed = device.state("closed")
        assert closed["reason"] == "device_too_slow"
