"""The test infrastructure itself: private Mosquitto, MQTT test client, OpenAI stand-in."""

from __future__ import annotations

import asyncio
import re
import socket
import threading
import time
from pathlib import Path

import aiohttp
import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from support.broker import MosquittoBroker, MosquittoError
from support.mqtt_client import MQTTv311, TestClient
from support.standin import Reply, Standin
from yarl import URL

# ------------------------------------------------------------------------ broker


def test_session_broker_is_private(mosquitto: MosquittoBroker) -> None:
    assert mosquitto.running
    assert mosquitto.host == "127.0.0.1"
    assert mosquitto.port not in (0, 1883)
    assert f"listen socket on port {mosquitto.port}" in mosquitto.log_text()
    config = mosquitto.config_path.read_text()
    assert "set_tcp_nodelay true" in config
    assert f"listener {mosquitto.port} 127.0.0.1" in config


def test_broker_stop_start_restart_keeps_retained_with_persistence(
    own_mosquitto: MosquittoBroker,
) -> None:
    broker = own_mosquitto
    port = broker.port
    with TestClient.for_broker(broker) as publisher:
        publisher.publish("keep/me", {"kept": True}, retain=True)
    broker.restart()  # SIGTERM saves the database
    assert broker.port == port
    assert "Saving in-memory database" in broker.log_text()
    with TestClient.for_broker(broker) as reader:
        reader.subscribe("keep/#")
        [message] = reader.wait_for("keep/#")
    assert message.retain
    assert message.json() == {"kept": True}

    broker.stop()
    assert not broker.running
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection((broker.host, port), timeout=2).close()
    broker.start()
    assert broker.port == port


def test_broker_stops_cleanly_right_after_start(tmp_path: Path) -> None:
    """Mosquitto 2.0 loses a SIGTERM that arrives just after it logged "running"."""
    broker = MosquittoBroker(tmp_path, persistence=True)
    try:
        for _ in range(10):
            broker.start()
            assert broker.stop(timeout=5) == 0
    finally:
        broker.close()


def test_broker_kill_loses_unsaved_state(own_mosquitto: MosquittoBroker) -> None:
    broker = own_mosquitto
    with TestClient.for_broker(broker) as publisher:
        publisher.publish("lost/me", "x", retain=True)
    assert broker.kill() == -9
    broker.start()
    with TestClient.for_broker(broker) as reader:
        reader.subscribe("lost/#")
        reader.subscribe("sync")  # a round trip after which a retained one would be in
        reader.publish("sync", "s")
        reader.wait_for("sync")
        assert reader.messages("lost/#") == []


def test_broker_reports_a_failed_start(tmp_path: Path) -> None:
    broker = MosquittoBroker(tmp_path, extra_config=["no_such_option 1"])
    try:
        with pytest.raises(MosquittoError, match="no_such_option"):
            broker.start(timeout=10)
        assert not broker.running
    finally:
        broker.close()


# ----------------------------------------------------------------- MQTT client


def test_paho_publish_reaches_test_client(mosquitto: MosquittoBroker, client: TestClient) -> None:
    client.subscribe(f"{client.prefix}/+/x")
    published = threading.Event()
    raw = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=MQTTProtocolVersion.MQTTv5)
    raw.on_publish = lambda *_: published.set()
    raw.connect(mosquitto.host, mosquitto.port)
    raw.loop_start()
    try:
        raw.publish(f"{client.prefix}/a/x", b"\x00\xffbinary", qos=1)
        assert published.wait(10)
        [message] = client.wait_for(f"{client.prefix}/#")
    finally:
        raw.disconnect()
        raw.loop_stop()
    sock = client.paho.socket()
    assert isinstance(sock, socket.socket)
    assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
    assert message.topic == f"{client.prefix}/a/x"
    assert message.payload == b"\x00\xffbinary"
    assert message.qos == 1
    assert not message.retain


def test_properties_pass_through_and_request_helper(
    mosquitto: MosquittoBroker, client: TestClient
) -> None:
    """A thread answering like the bridge would: reply topic and MQTT 5 properties."""
    with TestClient.for_broker(mosquitto, prefix=client.prefix) as responder:
        responder.subscribe(f"{client.prefix}/request/#")
        done = threading.Event()

        def answer() -> None:
            for index in range(2):
                request = responder.wait_for(f"{client.prefix}/request/#", index + 1)[index]
                reply = {"echo": request.json(), "topic": request.topic}
                if request.response_topic:
                    responder.publish(
                        request.response_topic, reply, correlation_data=request.correlation_data
                    )
                else:
                    responder.publish(request.topic.replace("/request/", "/response/"), reply)
            done.set()

        worker = threading.Thread(target=answer, daemon=True)
        worker.start()
        by_topic = client.request("createThing", {"n": 1}, suffix="kitchen")
        assert by_topic == {
            "echo": {"n": 1},
            "topic": f"{client.prefix}/request/createThing/kitchen",
        }
        by_property = client.request_raw(
            "createThing",
            {"n": 2},
            response_topic=f"{client.prefix}/replies/me",
            correlation_data=b"\x01corr",
        )
        assert by_property.topic == f"{client.prefix}/replies/me"
        assert by_property.correlation_data == b"\x01corr"
        assert by_property.json()["echo"] == {"n": 2}
        assert done.wait(10)
        worker.join(10)


def test_mqtt311_client(mosquitto: MosquittoBroker, topic_prefix: str) -> None:
    with TestClient.for_broker(mosquitto, protocol=MQTTv311) as old:
        old.subscribe(f"{topic_prefix}/#")
        old.publish(f"{topic_prefix}/t", "plain", qos=0)
        [message] = old.wait_for(f"{topic_prefix}/#")
        assert message.text() == "plain"
        assert message.properties is None or message.response_topic is None
        with pytest.raises(ValueError, match=r"3\.1\.1"):
            old.publish(f"{topic_prefix}/t", "x", response_topic="r")


def test_wait_for_times_out_with_a_clear_message(client: TestClient) -> None:
    client.subscribe(f"{client.prefix}/#")
    started = time.monotonic()
    with pytest.raises(TimeoutError, match="0 of 1 messages"):
        client.wait_for(f"{client.prefix}/nothing", timeout=0.2)
    assert time.monotonic() - started < 5


def test_client_reconnects_and_resubscribes(own_mosquitto: MosquittoBroker) -> None:
    with TestClient.for_broker(own_mosquitto) as subscriber:
        subscriber.subscribe("again/#")
        own_mosquitto.restart()
        subscriber.wait_connected(connects=2)
        with TestClient.for_broker(own_mosquitto) as publisher:
            publisher.publish("again/x", "hello")
            assert subscriber.wait_for("again/#")[0].text() == "hello"


# -------------------------------------------------------------------- stand-in


async def test_standin_records_requests(standin: Standin) -> None:
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            URL(standin.url + "/chat/completions?b=2&a=1&b=%2F%20x&empty=", encoded=True),
            json={"model": "m", "messages": []},
            headers={"Authorization": "Bearer sk-test", "OpenAI-Beta": "assistants=v2"},
        ) as response,
    ):
        assert response.status == 200
        assert response.headers["x-request-id"] == "req_1"
        body = await response.json()
    assert body == {
        "object": "standin",
        "method": "POST",
        "path": "/chat/completions",
        "echo": {"model": "m", "messages": []},
    }
    [request] = standin.requests
    assert request.method == "POST"
    assert request.path == "/chat/completions"
    assert request.raw_path == "/v1/chat/completions?b=2&a=1&b=%2F%20x&empty="
    assert request.query == [("b", "2"), ("a", "1"), ("b", "/ x"), ("empty", "")]
    assert request.headers["authorization"] == "Bearer sk-test"
    assert request.headers["openai-beta"] == "assistants=v2"
    assert request.json() == {"model": "m", "messages": []}
    assert request.parts is None
    assert request.done.is_set()


async def test_standin_keeps_percent_encoding_and_flags_outside_base(standin: Standin) -> None:
    async with aiohttp.ClientSession() as session:
        url = standin.origin + "/v1/files/file%2Fa%20b/content"
        async with session.get(URL(url, encoded=True)) as response:
            assert (await response.json())["path"] == "/files/file%2Fa%20b/content"
        async with session.get(standin.origin + "/v2/models") as response:
            assert response.status == 404
            assert (await response.json())["error"]["code"] == "standin_outside_base"
    first, second = standin.requests
    assert first.path == "/files/file%2Fa%20b/content"
    assert second.path == "/v2/models"


async def test_standin_parses_multipart_byte_exact(standin: Standin) -> None:
    audio = bytes(range(256)) * 3 + b"\r\n--not-the-boundary\r\n"
    boundary = "b0und4ry"
    body = b"".join(
        [
            b"--b0und4ry\r\n",
            b'Content-Disposition: form-data; name="model"\r\n\r\n',
            b"whisper-1\r\n",
            b"--b0und4ry\r\n",
            b'Content-Disposition: form-data; name="file"; filename="a b.wav"\r\n',
            b"Content-Type: audio/wav\r\n\r\n",
            audio + b"\r\n",
            b"--b0und4ry\r\n",
            b'Content-Disposition: form-data; name="timestamp_granularities[]"\r\n\r\n',
            b"word\r\n",
            b"--b0und4ry\r\n",
            b'Content-Disposition: form-data; name="timestamp_granularities[]"\r\n',
            b"Content-Type: text/plain; charset=utf-8\r\n\r\n",
            "ségment".encode() + b"\r\n",
            b"--b0und4ry--\r\n",
        ]
    )
    headers = {"Content-Type": f"multipart/form-data; boundary={boundary}"}
    async with (
        aiohttp.ClientSession() as session,
        session.post(standin.url + "/audio/transcriptions", data=body, headers=headers) as response,
    ):
        assert response.status == 200
        assert (await response.json())["echo"] is None
    [request] = standin.wait_for_requests(1)
    assert request.body == body
    assert request.parts is not None
    assert [(p.name, p.filename, p.content_type) for p in request.parts] == [
        ("model", None, None),
        ("file", "a b.wav", "audio/wav"),
        ("timestamp_granularities[]", None, None),
        ("timestamp_granularities[]", None, "text/plain; charset=utf-8"),
    ]
    assert request.part("file").data == audio
    assert request.form() == [
        ("model", "whisper-1"),
        ("timestamp_granularities[]", "word"),
        ("timestamp_granularities[]", "ségment"),
    ]


async def test_standin_records_malformed_multipart(standin: Standin) -> None:
    headers = {"Content-Type": "multipart/form-data; boundary=xyz"}
    async with (
        aiohttp.ClientSession() as session,
        session.post(standin.url + "/files", data=b"garbage", headers=headers) as response,
    ):
        assert response.status == 200
    assert standin.last.body == b"garbage"
    assert standin.last.parts is None
    assert standin.last.multipart_error


async def test_standin_parses_aiohttp_formdata(standin: Standin) -> None:
    form = aiohttp.FormData()
    form.add_field("purpose", "assistants")
    form.add_field("file", b"\x00{}\xff", filename="x.jsonl", content_type="application/jsonl")
    async with (
        aiohttp.ClientSession() as session,
        session.post(standin.url + "/files", data=form) as response,
    ):
        assert response.status == 200
    assert standin.last.parts == [
        ("purpose", None, "text/plain; charset=utf-8", b"assistants"),
        ("file", "x.jsonl", "application/jsonl", b"\x00{}\xff"),
    ]


async def test_standin_scripts_replies_in_order(standin: Standin) -> None:
    script = standin.script(
        "POST",
        "/embeddings",
        Reply.error(429, "slow down", type="rate_limit_error", headers={"retry-after": "0"}),
        Reply(json={"data": [1]}),
        Reply(json={"data": [2]}, headers={"x-request-id": "req_custom"}),
    )
    standin.script("GET", re.compile(r"/files/[^/]+/content"), Reply(body=b"\x00\x01raw"))
    standin.script("*", "/dynamic", lambda r: Reply(status=201, text=f"got {r.method}"))
    answers = []
    async with aiohttp.ClientSession() as session:
        for _ in range(4):
            async with session.post(standin.url + "/embeddings", json={}) as response:
                answers.append((response.status, await response.json(), response.headers))
        async with session.get(standin.url + "/files/f1/content") as response:
            assert response.content_type == "application/octet-stream"
            assert await response.read() == b"\x00\x01raw"
        async with session.delete(standin.url + "/dynamic") as response:
            assert response.status == 201
            assert await response.text() == "got DELETE"
        async with session.get(standin.url + "/models") as response:
            assert (await response.json())["object"] == "standin"
    assert [(status, body) for status, body, _ in answers] == [
        (
            429,
            {
                "error": {
                    "message": "slow down",
                    "type": "rate_limit_error",
                    "param": None,
                    "code": None,
                }
            },
        ),
        (200, {"data": [1]}),
        (200, {"data": [2]}),
        (200, {"data": [2]}),
    ]
    assert answers[0][2]["retry-after"] == "0"
    assert answers[1][2]["x-request-id"] == "req_2"
    assert answers[2][2]["x-request-id"] == "req_custom"
    assert script.calls == 4
    assert len(await standin.wait_for_requests_async(7)) == 7


async def test_standin_default_reply_and_latency(standin: Standin) -> None:
    standin.set_latency(0.2)
    async with aiohttp.ClientSession() as session:
        started = time.monotonic()
        async with session.get(standin.url + "/models") as response:
            assert (await response.json())["path"] == "/models"
        assert time.monotonic() - started >= 0.2
        standin.set_default(Reply(json={"object": "list", "data": []}))
        async with session.get(standin.url + "/models") as response:
            assert await response.json() == {"object": "list", "data": []}


async def _read_sse(response: aiohttp.ClientResponse) -> list[str]:
    lines = []
    async for raw in response.content:
        lines.append(raw.decode().rstrip("\n"))
    return lines


async def test_standin_sse_stream(standin: Standin) -> None:
    standin.script(
        "POST",
        "/chat/completions",
        Reply(sse=[(None, '{"delta": "Hel"}'), ("thread.message.delta", '{"d": "lo"}')]),
    )
    async with (
        aiohttp.ClientSession() as session,
        session.post(standin.url + "/chat/completions", json={"stream": True}) as response,
    ):
        assert response.content_type == "text/event-stream"
        lines = await _read_sse(response)
    assert lines == [
        'data: {"delta": "Hel"}',
        "",
        "event: thread.message.delta",
        'data: {"d": "lo"}',
        "",
        "data: [DONE]",
        "",
    ]


async def test_standin_cut_stream_closes_early(standin: Standin) -> None:
    standin.script("POST", "/chat/completions", Reply(sse=[(None, '{"n": 1}')], cut=True))
    lines: list[str] = []
    async with (
        aiohttp.ClientSession() as session,
        session.post(standin.url + "/chat/completions", json={}) as response,
    ):
        assert response.status == 200
        with pytest.raises(aiohttp.ClientPayloadError):
            async for raw in response.content:
                lines.append(raw.decode().rstrip("\n"))
    assert lines == ['data: {"n": 1}', ""]


async def test_standin_cut_body_closes_early(standin: Standin) -> None:
    standin.script("GET", "/files/f/content", Reply(body=b"0123456789", cut=True))
    async with (
        aiohttp.ClientSession() as session,
        session.get(standin.url + "/files/f/content") as response,
    ):
        assert response.content_length == 10
        with pytest.raises(aiohttp.ClientPayloadError):
            await response.read()


async def test_standin_hang_until_client_goes_away(standin: Standin) -> None:
    standin.script("POST", "/responses", Reply(hang=True))
    async with aiohttp.ClientSession() as session:
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.3):
                await session.post(standin.url + "/responses", json={})
    [request] = await standin.wait_for_requests_async(1)
    assert await asyncio.to_thread(request.client_gone.wait, 10)


def test_standin_stop_ends_hanging_and_slow_handlers() -> None:
    server = Standin().start()
    server.script("GET", "/slow", Reply(delay=60))
    server.script("GET", "/hang", Reply(hang=True))
    errors: list[BaseException] = []

    def call(path: str) -> None:
        async def go() -> None:
            async with aiohttp.ClientSession() as session, session.get(server.url + path) as r:
                await r.read()

        try:
            asyncio.run(go())
        except aiohttp.ClientError as exc:
            errors.append(exc)

    threads = [threading.Thread(target=call, args=(p,), daemon=True) for p in ("/slow", "/hang")]
    for thread in threads:
        thread.start()
    server.wait_for_requests(2)
    started = time.monotonic()
    server.stop()
    for thread in threads:
        thread.join(10)
        assert not thread.is_alive()
    assert time.monotonic() - started < 5
    assert all(request.done.is_set() for request in server.requests)


def test_wait_for_requests_times_out(standin: Standin) -> None:
    with pytest.raises(TimeoutError, match="0 of 1 requests"):
        standin.wait_for_requests(1, timeout=0.1)
