"""The web console's HTTP API, through aiohttp's test server: every page and every refusal."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer
from pydantic import SecretStr
from support.fakes import FakeLog

from bridge.config import BridgeConfig, ConsoleConfig
from bridge.console.app import MAX_STREAMS, Console
from bridge.console.model import PREVIEW_BYTES, Guard, RequestLog
from bridge.pipeline.model import Observed
from bridge.redact import Redactor

KEY = "sk-console-test-9f8e7d6c5b"
TOKEN = "console-token-31415926"


CHUNKS = ["Hel", "lo ", KEY]


class Source:
    """A ConsoleSource that answers every try itself, as the dispatcher's observer would; a try
    followed on its stream topic gets CHUNKS as chat deltas there, then its reply, as the
    broker would hand them back. A method in `denied` is refused as [access] refuses it."""

    topic_prefix = "home/openai"
    denied = frozenset({"deleteFile"})
    broker_down = False

    def __init__(self) -> None:
        self.console: Console | None = None
        self.published: list[tuple[str, bytes]] = []
        self.following: list[tuple[list[str], Callable[[str, bytes], None]]] = []

    async def status(self) -> dict[str, Any]:
        return {"state": "online", "service": "https://api.example/v1", "key": KEY}

    @contextlib.asynccontextmanager
    async def follow(
        self, topics: Sequence[str], deliver: Callable[[str, bytes], None]
    ) -> AsyncIterator[None]:
        if self.broker_down:
            raise TimeoutError("not connected")
        entry = (list(topics), deliver)
        self.following.append(entry)
        try:
            yield
        finally:
            self.following.remove(entry)

    def config_view(self) -> dict[str, Any]:
        return {"source": "x.toml", "overrides": [], "findings": [], "config": {"k": KEY}}

    def methods(self) -> list[dict[str, Any]]:
        return [{"name": "listModels", "group": "models", "verb": "GET", "path": "/models"}]

    def describe(self, name: str) -> dict[str, Any] | None:
        return {"name": name, "text": "...", "example": {}} if name == "listModels" else None

    def publish(self, topic: str, payload: bytes) -> Awaitable[None]:
        self.published.append((topic, payload))
        method, suffix = topic.split("/request/", 1)[1].split("/", 1)
        assert self.console is not None
        loop = asyncio.get_running_loop()
        code = "method_not_allowed" if method in self.denied else None
        if code is None:
            reply = json.dumps({"status": "ok", "data": {"echo": KEY}}).encode()
        else:
            reply = json.dumps({"status": "error", "error": {"code": code}}).encode()
        for topics, deliver in self.following:
            if code is None and json.loads(payload).get("stream"):
                for seq, chunk in enumerate(CHUNKS):
                    data = {"choices": [{"index": 0, "delta": {"content": chunk}}]}
                    event = {"seq": seq, "event": None, "data": data}
                    loop.call_soon(deliver, topics[0], json.dumps(event).encode())
            loop.call_soon(deliver, topics[1], reply)
        seen = Observed(method, suffix, None, code, 200, 1.0, payload, len(payload), reply, None)
        loop.call_soon(self.console.observe, seen)
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        done.set_result(None)
        return done


async def serve(token: str = "") -> AsyncIterator[tuple[TestClient[Any, Any], Console, Source]]:
    source = Source()
    config = ConsoleConfig(token=SecretStr(token), port=0)
    console = Console(config, source, Redactor([KEY, TOKEN]), FakeLog().bound)
    source.console = console
    client = TestClient(TestServer(console.app()))
    await client.start_server()
    assert client.port is not None
    console.guard = Guard("127.0.0.1", client.port, token)  # what start() does for port 0
    try:
        yield client, console, source
    finally:
        await client.close()


@pytest.fixture
async def open_console() -> AsyncIterator[tuple[TestClient[Any, Any], Console, Source]]:
    async for served in serve():
        yield served


@pytest.fixture
async def token_console() -> AsyncIterator[tuple[TestClient[Any, Any], Console, Source]]:
    async for served in serve(TOKEN):
        yield served


def own(client: TestClient[Any, Any]) -> dict[str, str]:
    return {"Origin": f"http://127.0.0.1:{client.port}", "X-OMB-Console": "1"}


async def test_every_page_answers_and_none_shows_a_secret(
    open_console: tuple[TestClient[Any, Any], Console, Source],
) -> None:
    client, console, _ = open_console
    seen = Observed("listModels", "kitchen", 7, "upstream_error", 500, 3.5, b'{"k": 1}', 8,
                    f"ERROR {KEY}".encode(), "text/plain")  # fmt: skip
    console.observe(seen)
    for path in ("/", "/static/console.js", "/static/console.css", "/api/status",
                 "/api/requests", "/api/requests/1", "/api/config", "/api/methods",
                 "/api/describe/listModels"):  # fmt: skip
        response = await client.get(path)
        assert response.status == 200, path
        body = await response.text()
        assert KEY not in body and TOKEN not in body, path
        assert response.headers["X-Frame-Options"] == "DENY"
    rows = (await (await client.get("/api/requests?since=0")).json())["requests"]
    assert [(r["seq"], r["code"], r["suffix"]) for r in rows] == [(1, "upstream_error", "kitchen")]
    assert (await client.get("/api/describe/nope")).status == 404
    assert (await client.get("/static/other.js")).status == 404


async def test_try_publishes_through_the_source_and_shows_the_reply_redacted(
    open_console: tuple[TestClient[Any, Any], Console, Source],
) -> None:
    client, _, source = open_console
    response = await client.post(
        "/api/try", json={"method": "listModels", "payload": {"a": 1}}, headers=own(client)
    )
    assert response.status == 200
    result = await response.json()
    assert result["topic"] == "home/openai/request/listModels/console/1"
    assert source.published == [(result["topic"], b'{"a": 1}')]
    assert KEY not in json.dumps(result) and "**********" in result["reply"]["text"]


@pytest.mark.parametrize(
    ("headers", "status"),
    [
        ({"X-OMB-Console": "1"}, 403),  # no Origin
        ({"X-OMB-Console": "1", "Origin": "http://evil.example"}, 403),
        ({"Origin": "own"}, 403),  # no custom header: a cross-site form
        ({"X-OMB-Console": "1", "Origin": "own", "Host": "evil.example:80"}, 421),
    ],
)
async def test_a_foreign_or_headerless_post_is_refused(
    open_console: tuple[TestClient[Any, Any], Console, Source], headers: dict[str, str], status: int
) -> None:
    client, _, source = open_console
    if headers.get("Origin") == "own":
        headers = {**headers, "Origin": f"http://127.0.0.1:{client.port}"}
    response = await client.post(
        "/api/try", json={"method": "listModels", "payload": {}}, headers=headers
    )
    assert response.status == status
    assert source.published == []


async def test_a_renamed_host_is_refused_even_for_reading(
    open_console: tuple[TestClient[Any, Any], Console, Source],
) -> None:
    client, _, _ = open_console
    assert (await client.get("/api/status", headers={"Host": "rebound.example:8733"})).status == 421
    assert (await client.get("/", headers={"Host": "rebound.example:8733"})).status == 421


async def test_the_try_endpoint_is_rate_limited(
    open_console: tuple[TestClient[Any, Any], Console, Source],
) -> None:
    client, _, _ = open_console
    statuses = []
    for _ in range(7):
        response = await client.post(
            "/api/try", json={"method": "listModels", "payload": {}}, headers=own(client)
        )
        statuses.append(response.status)
    assert statuses[:5] == [200] * 5 and 429 in statuses[5:]


async def test_with_a_token_the_api_needs_it_and_the_page_asks_for_it(
    token_console: tuple[TestClient[Any, Any], Console, Source],
) -> None:
    client, _, _ = token_console
    assert (await client.get("/")).status == 200  # the page loads, then asks for the token
    assert (await client.get("/api/status")).status == 401
    wrong = {"Authorization": "Bearer nope"}
    assert (await client.get("/api/status", headers=wrong)).status == 401
    right = {"Authorization": f"Bearer {TOKEN}"}
    response = await client.get("/api/status", headers=right)
    assert response.status == 200 and TOKEN not in await response.text()


def test_beyond_loopback_the_console_needs_a_token() -> None:
    with pytest.raises(ValueError, match=r"needs \[console\] token"):
        ConsoleConfig(host="0.0.0.0")
    assert ConsoleConfig(host="0.0.0.0", token=SecretStr(TOKEN)).host == "0.0.0.0"
    assert ConsoleConfig(host="0.0.0.0", enabled=False).enabled is False
    config = BridgeConfig.model_validate({"console": {"token": TOKEN}})
    assert TOKEN in config.secrets() and TOKEN not in json.dumps(config.redacted())


def test_recording_keeps_raw_cut_fields_and_redacts_only_when_a_page_asks() -> None:
    # Recording runs for every request: no redaction, decoding or JSON there (issue 26).
    log = RequestLog(2)
    request_head = b'{"transaction": "t", "key": "' + KEY.encode() + b'"}'
    log.add("m", "s", f"t {KEY}", None, 200, 1.0, request_head, 9000, b"r" * 9000, None)
    log.add("m", "s", 2, "upstream_error", 500, 1.0, b"{}", 2, b"\x00\xff" * 10, "audio/mpeg")
    log.add("m", "s", 3, None, 200, 1.0, b"{}", 2, b"{}", None)
    first, last = log.since(0)[0], log.since(0)[-1]
    assert (first.seq, last.seq) == (2, 3)  # bounded: the oldest went
    assert log.find(2) is not None and log.find(1) is None
    binary = first.detail(Redactor([KEY]))
    assert binary["reply"] == {"binary": True, "size": 20, "type": "audio/mpeg"}
    log = RequestLog(1)
    log.add("m", "s", f"t {KEY}", None, 200, 1.0, request_head, 9000, b"r" * 9000, None)
    (record,) = log.since(0)
    assert len(record.reply_head) == PREVIEW_BYTES and record.bytes_out == 9000
    assert KEY.encode() in record.request_head  # kept as given ...
    shown = record.detail(Redactor([KEY]))  # ... and redacted when shown
    assert KEY not in json.dumps(shown)
    assert shown["request"]["size"] == 9000 and shown["request"]["truncated"] is True
    assert shown["reply"]["truncated"] is True and shown["transaction"] == "t **********"


def test_the_config_view_shows_override_values_redacted_and_check_configs_findings(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from bridge.config import load_config
    from bridge.methods.catalog import default_table
    from bridge.runtime.console_source import BridgeSource

    path = tmp_path / "bridge.toml"
    path.write_text(f'[service]\napi_key = "{KEY}"\n', encoding="utf-8")
    monkeypatch.setenv("OMB_MQTT__PASSWORD", "mqtt-pass-271828")
    monkeypatch.setenv("OMB_LIMITS__MAX_CONCURRENCY", "8")
    config = load_config(path)
    source = BridgeSource(config, str(path), default_table(), lambda: None, lambda: None)
    view = source.config_view()
    assert {"variable": "OMB_LIMITS__MAX_CONCURRENCY", "value": 8} in view["overrides"]
    assert {"variable": "OMB_MQTT__PASSWORD", "value": "**********"} in view["overrides"]
    assert any("api_key is set in the config file" in f for f in view["findings"])
    shown = json.dumps(view)
    assert KEY not in shown and "mqtt-pass-271828" not in shown
    path.write_text("[limits]\nmax_concurency = 3\n", encoding="utf-8")  # edited since the start
    assert any(
        f.startswith("error: limits.max_concurency") for f in source.config_view()["findings"]
    )


def events_of(body: str) -> list[tuple[str, Any]]:
    """The server-sent events of a streamed try: (name, data)."""
    out = []
    for frame in body.split("\n\n"):
        if not frame:
            continue
        name, data = frame.split("\n")
        out.append((name.removeprefix("event: "), json.loads(data.removeprefix("data: "))))
    return out


async def stream_try(
    client: TestClient[Any, Any],
    payload: dict[str, Any],
    headers: dict[str, str],
    method: str = "createChatCompletion",
) -> tuple[int, str]:
    response = await client.post(
        "/api/try/stream", json={"method": method, "payload": payload}, headers=headers
    )
    return response.status, await response.text()


async def test_a_streamed_try_sends_each_event_redacted_then_the_reply(
    open_console: tuple[TestClient[Any, Any], Console, Source],
) -> None:
    client, _, source = open_console
    status, body = await stream_try(client, {"stream": True}, own(client))
    assert status == 200
    events = events_of(body)
    topic = "home/openai/request/createChatCompletion/console/1"
    assert events[0] == ("published", {"topic": topic})
    deltas = [
        e["event"]["data"]["choices"][0]["delta"]["content"] for n, e in events if n == "event"
    ]
    assert deltas == ["Hel", "lo ", "**********"]
    assert [e["event"]["seq"] for n, e in events if n == "event"] == [0, 1, 2]
    name, reply = events[-1]
    assert name == "reply" and reply["code"] is None and reply["events_dropped"] == 0
    assert KEY not in body
    assert source.following == []  # unsubscribed
    response = await client.post(
        "/api/try/stream", json={"method": "x", "payload": {}}, headers=own(client)
    )
    assert response.headers["X-Frame-Options"] == "DENY"
    assert response.headers["Content-Type"].startswith("text/event-stream")


async def test_a_streamed_try_of_a_denied_method_gets_its_refusal_and_no_event(
    open_console: tuple[TestClient[Any, Any], Console, Source],
) -> None:
    client, _, _ = open_console
    status, body = await stream_try(client, {"stream": True}, own(client), method="deleteFile")
    assert status == 200
    names = [name for name, _ in events_of(body)]
    assert names == ["published", "reply"]
    assert events_of(body)[-1][1]["code"] == "method_not_allowed"


@pytest.mark.parametrize(
    ("headers", "status"),
    [
        ({}, 401),  # no token
        ({"Authorization": "Bearer nope"}, 401),
        ({"Authorization": f"Bearer {TOKEN}", "Origin": "http://evil.example"}, 403),
        ({"Authorization": f"Bearer {TOKEN}", "Origin": None}, 403),  # no Origin
        ({"Authorization": f"Bearer {TOKEN}", "X-OMB-Console": None}, 403),  # a form's post
        ({"Authorization": f"Bearer {TOKEN}", "Host": "rebound.example:8733"}, 421),
    ],
)
async def test_a_streamed_try_refuses_whoever_the_api_refuses(
    token_console: tuple[TestClient[Any, Any], Console, Source],
    headers: dict[str, str | None],
    status: int,
) -> None:
    client, _, source = token_console
    sent = {**own(client), **headers}
    got, body = await stream_try(
        client, {"stream": True}, {k: v for k, v in sent.items() if v is not None}
    )
    assert got == status and "error" in json.loads(body)
    assert source.published == [] and source.following == []
    right = {**own(client), "Authorization": f"Bearer {TOKEN}"}
    assert (await stream_try(client, {"stream": True}, right))[0] == 200


async def test_streamed_tries_are_rate_limited_with_the_other_tries(
    open_console: tuple[TestClient[Any, Any], Console, Source],
) -> None:
    client, _, source = open_console
    statuses = []
    for n in range(7):
        path = "/api/try" if n % 2 else "/api/try/stream"
        response = await client.post(
            path, json={"method": "listModels", "payload": {}}, headers=own(client)
        )
        statuses.append(response.status)
        await response.read()
    assert statuses[:5] == [200] * 5 and 429 in statuses[5:]
    assert len(source.published) == 5


async def test_streamed_tries_open_at_once_are_bounded(
    open_console: tuple[TestClient[Any, Any], Console, Source],
) -> None:
    client, console, _ = open_console
    console.streaming = MAX_STREAMS  # as many as allowed are still streaming
    status, body = await stream_try(client, {"stream": True}, own(client))
    assert status == 429 and "at once" in json.loads(body)["error"]
    console.streaming = 0


async def test_a_stream_past_its_bytes_is_cut_and_says_so(
    open_console: tuple[TestClient[Any, Any], Console, Source], monkeypatch: pytest.MonkeyPatch
) -> None:
    client, _, _ = open_console
    monkeypatch.setattr("bridge.console.app.MAX_STREAM_BYTES", 100)
    _, body = await stream_try(client, {"stream": True}, own(client))
    names = [name for name, _ in events_of(body)]
    assert names == ["published", "event", "truncated", "reply"]
    assert events_of(body)[-1][1]["events_dropped"] == 2


def test_a_stream_message_shown_is_redacted_and_odd_ones_are_only_text() -> None:
    console = Console(ConsoleConfig(port=0), Source(), Redactor([KEY]), FakeLog().bound)
    event = {"seq": 0, "event": None, "data": {"text": KEY}}
    assert console._event(json.dumps(event).encode()) == {  # noqa: SLF001
        "event": {"seq": 0, "event": None, "data": {"text": "**********"}}
    }
    for odd in (b"[" * 2000 + b"]" * 2000, b"plain " + KEY.encode(), b"\xff\xfe", b"x" * 5000):
        shown = console._event(odd)  # noqa: SLF001
        assert set(shown) == {"preview"} and KEY not in json.dumps(shown)


async def test_a_streamed_try_without_a_broker_to_read_is_503_and_publishes_nothing(
    open_console: tuple[TestClient[Any, Any], Console, Source],
) -> None:
    client, console, source = open_console
    source.broker_down = True
    status, body = await stream_try(client, {"stream": True}, own(client))
    assert status == 503 and "broker" in json.loads(body)["error"]
    assert source.published == [] and console.streaming == 0


def append_to_tail(folder: Path, data: bytes) -> None:
    """Append `data` to the one tail file in `folder`, as a write still under way would."""
    (tail,) = folder.glob("journal.sqlite3-tail*.*")
    with tail.open("ab") as file:
        file.write(data)


async def test_the_journal_shown_counts_what_waits_in_tail_files_once(tmp_path: Path) -> None:
    from support.fakes import RecordingLog

    from bridge.journal.sqlite import Journal, TailKeys, read_size
    from bridge.pipeline.dedup import request_key

    def key(i: int) -> bytes:
        return request_key("home/openai/request/listModels", b"%d" % i)

    def opened() -> Journal:
        journal = Journal.open(
            path, scope="answers", max_bytes=1 << 20, max_age=3600.0, max_answer_bytes=1 << 16,
            synchronous="normal", log=RecordingLog(),
        )  # fmt: skip
        assert journal is not None
        return journal

    path = tmp_path / "journal.sqlite3"
    kept = TailKeys()  # read on from where it stopped, as the console's status does
    assert read_size(path) == (None, 0) == read_size(path, kept)
    journal = opened()
    assert read_size(path)[0] == 0 == read_size(path, kept)[0]
    for i in range(3):
        assert await journal.begin_attempt(key(i), "r") == 1
        assert read_size(path, kept)[0] == i + 1  # a start is an entry already
        assert await journal.record_answer(key(i), "r", b'{"status":"ok"}')
        assert await journal.settle_attempt(key(i))
    assert await journal.begin_attempt(key(3), "r") == 1  # an unfinished start is an entry too
    entries, size = read_size(path)  # all of them in this process's tail file so far
    assert entries == 4 and size > 0 and read_size(path, kept) == (entries, size)
    append_to_tail(tmp_path, b"\x01\x02\x03")  # half a record: not counted, not skipped
    assert read_size(path, kept) == (4, size) == read_size(path)
    await journal.close()  # the tail goes to SQLite and is removed
    assert read_size(path)[0] == 4 == read_size(path, kept)[0]
    journal = opened()  # a new tail file, maybe under the same name
    assert await journal.record_answer(key(0), "r", b'{"status":"ok"}')  # in both: counted once
    assert await journal.record_answer(key(9), "r", b'{"status":"ok"}')
    assert read_size(path)[0] == 5 == read_size(path, kept)[0]
    await journal.close()
