"""The request pipeline's stages, each on its own: decide, render, the stream sink, deliver."""

from __future__ import annotations

import asyncio
import json
import logging

import pytest
from pydantic import SecretStr
from support.fakehttp import Clock, FakeResponse, FakeTransport, answer
from support.fakes import FakeLog, FakePublisher, message
from support.imports import top_level_packages_after

from bridge.config import BridgeConfig, ServiceConfig
from bridge.errors import ReplyTooLarge, StreamInterrupted, UpstreamError
from bridge.messages import PublishFailed
from bridge.methods.catalog import default_table
from bridge.pipeline import render
from bridge.pipeline.access import AccessRules, ReplyTopicRules
from bridge.pipeline.build import RequestBuilder
from bridge.pipeline.decide import Call, Decider, Rejection, Route
from bridge.pipeline.dedup import ReplyCache
from bridge.pipeline.deliver import Deliverer
from bridge.pipeline.dispatch import Dispatcher
from bridge.pipeline.model import MISSING
from bridge.pipeline.options import parse_options
from bridge.pipeline.sink import TopicStreamSink
from bridge.pipeline.stats import Stats
from bridge.redact import Redactor
from bridge.service.client import ServiceClient, ServiceResult
from bridge.service.sse import SseEvent
from bridge.service.transport import TransportError
from bridge.topics import Topics

TABLE = default_table()
TOPICS = Topics("home/openai", "test")
SECRET = "sk-test-secret-key"


def decider(allow: list[str] | None = None, deny: list[str] | None = None) -> Decider:
    """A Decider over the default table, with a 1000-byte request limit."""
    return Decider(
        topics=TOPICS,
        table=TABLE,
        access=AccessRules(allow or ["*"], deny or []),
        builder=RequestBuilder(ServiceConfig(api_key=SecretStr(SECRET))),
        max_request_bytes=1000,
        log=FakeLog().bound,
    )


def decide(topic: str, payload: bytes, deny: list[str] | None = None) -> Call | Rejection:
    """Route and decide one message; the route must exist."""
    d = decider(deny=deny)
    msg = message(topic, payload)
    route = d.route(msg)
    assert route is not None
    return d.decide(msg, route)


# --- decide -------------------------------------------------------------------------------------


def test_route_drops_foreign_topics_and_unusable_response_topics() -> None:
    d = decider()
    assert d.route(message("elsewhere/request/listModels", b"{}")) is None
    bad = message("home/openai/request/listModels", b"{}", response_topic="a/+/b")
    assert d.route(bad) is None
    own = "home/openai/response/listModels/k/me"
    good = message(
        "home/openai/request/listModels/k", b"{}", response_topic=own, correlation_data=b"c"
    )
    route = d.route(good)
    assert route is not None
    assert (route.reply_topic, route.correlation, route.topic.suffix) == (own, b"c", "k")
    assert route.refused_reply_topic is None


@pytest.mark.parametrize(
    "response_topic",
    [
        "me/r",  # outside the response prefix
        "home/openai/response/listModels/hall",  # another device's reply topic
        "home/openai/request/listModels/k",  # a request topic: one request would become many
        "home/openai/bridge/test/state",  # the bridge's own state
        "homeassistant/lock/x/config",  # discovery (protected when the dispatcher sets it up)
        "$SYS/broker/x",
    ],
)
def test_a_response_topic_outside_the_reply_topics_is_answered_on_the_default_one(
    response_topic: str,
) -> None:
    d = decider()
    d.reply_topics = ReplyTopicRules(TOPICS, ["homeassistant/#"], protected=["homeassistant/#"])
    route = d.route(
        message("home/openai/request/listModels/k", b"{}", response_topic=response_topic)
    )
    assert route is not None
    assert (route.reply_topic, route.refused_reply_topic) == (
        "home/openai/response/listModels/k",
        response_topic,
    )
    decision = d.decide(message("home/openai/request/listModels/k", b'{"transaction": 3}'), route)
    assert isinstance(decision, Rejection)
    assert (decision.error.code, decision.transaction) == ("reply_topic_refused", 3)


def test_extra_reply_topics_come_from_the_config_filters() -> None:
    rules = ReplyTopicRules(TOPICS, ["replies/+/me", "dev/#"])
    assert rules.allows("replies/x/me", "k") and rules.allows("dev/a/b", "k")
    assert not rules.allows("replies/x/you", "k") and not rules.allows("home/openai/request/m", "")


def test_by_default_a_device_may_name_only_its_own_reply_topics() -> None:
    rules = ReplyTopicRules(TOPICS)
    assert rules.allows("home/openai/response/listModels/kitchen", "kitchen")
    assert rules.allows("home/openai/response/createSpeech/kitchen/1/x", "kitchen/1")
    assert not rules.allows("home/openai/response/listModels/hall", "kitchen")
    assert not rules.allows("home/openai/response/listModels/kitchen", "kitchen/1")
    assert not rules.allows("home/openai/response/listModels", "kitchen")
    assert rules.allows("home/openai/response/anything/at/all", "")  # no suffix: the prefix


@pytest.mark.parametrize(
    ("payload", "code"),
    [
        (b"", "bad_json"),
        (b"  \n", "bad_json"),
        (b"{", "bad_json"),
        (b"\xff", "bad_json"),
        (b"[1]", "not_an_object"),
        (b"{" + b" " * 1000 + b"}", "payload_too_large"),
    ],
)
def test_decide_rejects_payloads_before_reading_a_transaction(payload: bytes, code: str) -> None:
    decision = decide("home/openai/request/listModels", payload)
    assert isinstance(decision, Rejection)
    assert decision.error.code == code
    assert decision.transaction is MISSING
    assert decision.method == "listModels"


def test_decide_rejections_keep_the_transaction_and_the_method_label() -> None:
    unknown = decide("home/openai/request/noSuchThing", b'{"transaction": 5}')
    assert isinstance(unknown, Rejection)
    assert (unknown.error.code, unknown.method, unknown.transaction) == (
        "unknown_method",
        "noSuchThing",
        5,
    )
    denied = decide("home/openai/request/LISTMODELS", b'{"transaction": null}', deny=["list*"])
    assert isinstance(denied, Rejection)
    # The operation's own spelling, not the topic's.
    assert (denied.error.code, denied.method, denied.transaction) == (
        "method_not_allowed",
        "listModels",
        None,
    )
    missing = decide("home/openai/request/retrieveModel", b"{}")
    assert isinstance(missing, Rejection) and missing.error.code == "missing_parameter"


def test_decide_pops_the_transaction_and_decides_the_stream_once() -> None:
    payload = {"transaction": "t", "model": "m", "messages": [], "stream": True}
    call = decide("home/openai/request/createChatCompletion/x", json.dumps(payload).encode())
    assert isinstance(call, Call)
    assert call.transaction == "t"
    assert call.stream_topic == "home/openai/stream/createChatCompletion/x"
    request = call.take_request()
    assert request.json_body is not None and b"transaction" not in request.json_body
    assert call.request is None
    plain = decide("home/openai/request/createChatCompletion", b'{"model": "m", "messages": []}')
    assert isinstance(plain, Call) and plain.stream_topic is None


def test_decide_takes_the_payload_off_the_message() -> None:
    d = decider()
    msg = message("home/openai/request/listModels", b"{}")
    route = d.route(msg)
    assert route is not None
    assert isinstance(d.decide(msg, route), Call)
    assert msg.payload == b""


# --- render -------------------------------------------------------------------------------------


def test_render_answer_moves_the_body_into_the_envelope() -> None:
    op = TABLE.find("createSpeech")
    assert op is not None
    result = ServiceResult(b"\x00\x01", "audio/mpeg", 200, "req-1", attempts=2)
    outcome = render.answer(op, "t", result, None)
    assert result.body == b""
    reply = json.loads(outcome.payload)
    assert reply["data"] == {"base64": "AAE=", "content_type": "audio/mpeg", "size": 2}
    assert (outcome.http_status, outcome.request_id, outcome.attempts) == (200, "req-1", 2)


def test_render_failure_reports_the_error_and_its_attempts() -> None:
    exc = UpstreamError("boom", http_status=503, upstream=None)
    exc.attempts = 3
    outcome = render.failure("listModels", MISSING, exc)
    reply = json.loads(outcome.payload)
    assert "transaction" not in reply and reply["error"]["code"] == exc.code
    assert (outcome.error, outcome.http_status, outcome.attempts) == (exc, 503, 3)


# --- the stream sink ----------------------------------------------------------------------------


def chunk_event(text: str) -> SseEvent:
    """A chat completion chunk carrying `text` as its delta."""
    data = {
        "id": "c",
        "object": "chat.completion.chunk",
        "created": 1,
        "model": "m",
        "choices": [{"index": 0, "delta": {"content": text}, "finish_reason": None}],
    }
    return SseEvent(None, json.dumps(data), None)


def sink(publisher: FakePublisher) -> TopicStreamSink:
    """A chat sink publishing to `s/t` with transaction 7, redacting SECRET."""
    return TopicStreamSink("createChatCompletion", publisher, "s/t", 7, b"corr", Redactor([SECRET]))


async def test_sink_forwards_events_in_order_and_redacts_them() -> None:
    publisher = FakePublisher()
    events = sink(publisher)
    assert not events.forwarded
    await events.on_event(chunk_event("a"))
    await events.on_event(chunk_event(SECRET))
    await events.on_event(SseEvent(None, "[DONE]", None))
    await events.flushed()
    assert events.forwarded and not events.stopped
    assert [json.loads(p)["seq"] for _, p, _ in publisher.published] == [0, 1]
    assert all(t == "s/t" and c == b"corr" for t, _, c in publisher.published)
    assert SECRET.encode() not in publisher.published[1][1]
    assert json.loads(publisher.published[0][1])["transaction"] == 7


async def test_sink_stops_on_an_event_the_broker_would_refuse_and_finish_says_why() -> None:
    publisher = FakePublisher(max_size=300)
    events = sink(publisher)
    await events.on_event(chunk_event("a"))
    await events.on_event(chunk_event("x" * 400))  # no exception into the HTTP read loop
    assert events.stopped
    await events.on_event(chunk_event("b"))  # ignored once stopped
    assert len(publisher.published) == 1
    with pytest.raises(ReplyTooLarge, match="stream event 1"):
        events.finish()


async def test_sink_finish_without_the_end_of_the_stream_is_interrupted() -> None:
    events = sink(FakePublisher())
    await events.on_event(chunk_event("a"))
    with pytest.raises(StreamInterrupted):
        events.finish()


# --- deliver ------------------------------------------------------------------------------------


def deliverer(publisher: FakePublisher) -> tuple[Deliverer, ReplyCache, Stats]:
    """A Deliverer with a fresh cache and stats."""
    cache, stats = ReplyCache(10, 60), Stats()
    return (
        Deliverer(
            publisher=publisher,
            cache=cache,
            stats=stats,
            redactor=Redactor([SECRET]),
            log=FakeLog().bound,
        ),
        cache,
        stats,
    )


def route_for(topic: str = "home/openai/request/listModels") -> Route:
    """The default route of `topic`."""
    parsed = TOPICS.parse(topic)
    assert parsed is not None
    return Route(parsed, parsed.reply, None)


async def test_deliver_redacts_publishes_acks_and_remembers() -> None:
    publisher = FakePublisher()
    deliver, cache, stats = deliverer(publisher)
    outcome = render.Outcome("listModels", "t", render.ok("listModels", "t", SECRET))
    sent = await deliver.deliver(message("x", b"", mid=9), route_for(), outcome, key=b"k42")
    assert publisher.acked == [9]
    ((topic, payload, _),) = publisher.published
    assert topic == "home/openai/response/listModels" and SECRET.encode() not in payload
    assert cache.get(b"k42") == (topic, payload, None) and sent.payload == payload
    deliver.account(message("x", b""), route_for(), sent, 1.5)
    assert (stats.requests_total, stats.errors_total, stats.last_latency_ms) == (1, 0, 1.5)


async def test_deliver_replaces_a_reply_too_large_with_an_error_reply() -> None:
    publisher = FakePublisher(max_size=200)
    deliver, _, stats = deliverer(publisher)
    big = render.Outcome("listModels", 1, render.ok("listModels", 1, "x" * 500), request_id="r")
    sent = await deliver.deliver(message("x", b""), route_for(), big, key=None)
    reply = json.loads(publisher.published[0][1])
    assert reply["error"]["code"] == "reply_too_large" and reply["transaction"] == 1
    assert sent.request_id == "r" and isinstance(sent.error, ReplyTooLarge)
    deliver.account(message("x", b""), route_for(), sent, 1.0)
    assert stats.by_code == {"reply_too_large": 1}


@pytest.mark.parametrize("level", [logging.INFO, logging.WARNING])
def test_account_logs_one_line_per_request_at_its_level(level: int) -> None:
    log = FakeLog(level)
    deliver, _, stats = deliverer(FakePublisher())
    deliver.log = log.bound
    ok = render.Outcome("listModels", "t", b"{}", http_status=200, request_id="r1")
    deliver.account(message("x", b""), route_for(), ok, 2.5)
    failed = render.failure("listModels", 7, ReplyTooLarge("too large"))
    deliver.account(message("x", b""), route_for(), failed, 3.0)
    assert stats.requests_total == 2  # counted whether logged or not
    fields: dict[str, object] = {"method": "listModels", "suffix": "", "transaction": "t"}
    fields.update(status="ok", http_status=200, request_id="r1", duration_ms=2.5)
    ok_line = ("info", "request", fields)
    error_line = log.lines[-1]
    assert log.lines[:-1] == ([ok_line] if level == logging.INFO else [])
    assert error_line[:2] == ("warning", "request") and error_line[2]["code"] == "reply_too_large"


@pytest.mark.parametrize(("retry_later", "acked"), [(True, []), (False, [3])])
async def test_deliver_acks_an_unpublished_reply_only_when_retrying_cannot_help(
    retry_later: bool, acked: list[int]
) -> None:
    publisher = FakePublisher()
    publisher.fail = PublishFailed("no", retry_later=retry_later)
    deliver, cache, _ = deliverer(publisher)
    outcome = render.Outcome("listModels", 1, render.ok("listModels", 1, None))
    await deliver.deliver(message("x", b"", mid=3), route_for(), outcome, key=b"k5")
    assert publisher.acked == acked
    assert cache.get(b"k5") is None


# --- reply options (_bridge) through the stages -------------------------------------------------


def test_decide_pops_the_options_and_keeps_them_for_the_error_reply() -> None:
    call = decide(
        "home/openai/request/createChatCompletion",
        b'{"model":"m","messages":[],"_bridge":{"format":"plain","max_bytes":64}}',
    )
    assert isinstance(call, Call)
    assert (call.options.format, call.options.max_bytes) == ("plain", 64)
    assert call.request is not None and call.request.json_body is not None
    assert b"_bridge" not in call.request.json_body
    bad = decide(
        "home/openai/request/createChatCompletion",
        b'{"transaction":4,"model":"m","_bridge":{"format":"plain","select":"a["}}',
    )
    assert isinstance(bad, Rejection) and bad.error.code == "invalid_parameter"
    assert (bad.options.format, bad.transaction) == ("plain", 4)
    reply = render.failure(bad.method, bad.transaction, bad.error, bad.options)
    assert reply.payload.startswith(b"ERROR invalid_parameter: _bridge.select is not a JMESPath")


def raw_chunked(body: bytes, size: int) -> render.Outcome:
    options = parse_options({"format": "raw", "chunk_bytes": size})
    result = ServiceResult(body, "audio/mpeg", 200, "req_1")
    op = TABLE.find("createSpeech")
    assert op is not None
    return render.answer(op, 1, result, None, options)


async def test_deliver_publishes_the_chunks_then_the_end_message_and_remembers_neither() -> None:
    publisher = FakePublisher()
    deliver, cache, _ = deliverer(publisher)
    body = bytes(range(256)) * 2
    route = route_for("home/openai/request/createSpeech/hall")
    await deliver.deliver(message("x", b"", mid=2), route, raw_chunked(body, 200), key=b"k8")
    topics = [topic for topic, _, _ in publisher.published]
    base = "home/openai/response/createSpeech/hall"
    assert topics == [f"{base}/0", f"{base}/1", f"{base}/2", base]
    assert b"".join(payload for _, payload, _ in publisher.published[:3]) == body
    assert json.loads(publisher.published[3][1])["chunks"] == 3
    assert publisher.acked == [2] and cache.get(b"k8") is None


async def test_deliver_answers_a_chunk_too_large_for_the_broker_in_the_raw_error_form() -> None:
    publisher = FakePublisher(max_size=150)
    deliver, _, _ = deliverer(publisher)
    route = route_for("home/openai/request/createSpeech")
    sent = await deliver.deliver(message("x", b""), route, raw_chunked(b"a" * 1000, 400), None)
    [(topic, payload, _)] = publisher.published
    assert topic == "home/openai/response/createSpeech"
    assert payload.startswith(b"ERROR reply_too_large: the reply (400 bytes) exceeds")
    assert payload.endswith(b"; a smaller chunk_bytes fits")
    assert isinstance(sent.error, ReplyTooLarge)


@pytest.mark.parametrize(("retry_later", "acked"), [(True, []), (False, [6])])
async def test_deliver_stops_after_a_chunk_is_refused(retry_later: bool, acked: list[int]) -> None:
    publisher = FakePublisher()
    publisher.fail = PublishFailed("no", retry_later=retry_later)
    deliver, _, _ = deliverer(publisher)
    route = route_for("home/openai/request/createSpeech")
    await deliver.deliver(message("x", b"", mid=6), route, raw_chunked(b"a" * 300, 128), None)
    assert publisher.published == []  # no end message after a failed chunk
    assert publisher.acked == acked


def test_home_assistant_module_imports_no_transport_or_logging_library() -> None:
    loaded = top_level_packages_after("import bridge.ha.discovery")
    assert not loaded & {"paho", "aiohttp", "structlog"}


# --- the orchestrator, with fakes on both sides -------------------------------------------------


def dispatcher(
    script: list[FakeResponse | TransportError], publisher: FakePublisher
) -> tuple[Dispatcher, FakeTransport]:
    """A Dispatcher over a fake HTTP transport and a fake publisher."""
    config = BridgeConfig.model_validate(
        {"service": {"api_base": "http://upstream.invalid/v1", "api_key": SECRET}}
    )
    transport, clock = FakeTransport(script), Clock()
    service = ServiceClient(config.service, transport=transport, sleep=clock.sleep, clock=clock)
    return (
        Dispatcher(
            config=config,
            table=TABLE,
            service=service,
            publisher=publisher,
            topics=TOPICS,
            log=FakeLog().bound,
        ),
        transport,
    )


async def test_dispatcher_answers_acks_and_replays_a_redelivery_from_the_cache() -> None:
    publisher = FakePublisher()
    models = json.dumps({"object": "list", "data": [], "key": SECRET}).encode()
    bridge, transport = dispatcher([answer(200, models)], publisher)
    topic = "home/openai/request/listModels/k"
    bridge.submit(message(topic, b'{"transaction": 1}', mid=4))
    await asyncio.wait_for(bridge.idle.wait(), 5)
    bridge.submit(message(topic, b'{"transaction": 1}', mid=4, dup=True))
    await asyncio.wait_for(bridge.idle.wait(), 5)
    assert len(transport.sent) == 1  # the redelivery never reached the service host
    (topic_1, first, _), (topic_2, again, _) = publisher.published
    assert topic_1 == topic_2 == "home/openai/response/listModels/k" and first == again
    reply = json.loads(first)
    assert reply["status"] == "ok" and reply["data"]["key"] == "**********"
    assert publisher.acked == [4, 4]
    assert bridge.stats.requests_total == 1


async def test_dispatcher_answers_a_rejection_without_calling_the_service_host() -> None:
    publisher = FakePublisher()
    bridge, transport = dispatcher([], publisher)
    bridge.submit(message("home/openai/request/retrieveModel", b'{"transaction": "t"}', mid=2))
    await asyncio.wait_for(bridge.idle.wait(), 5)
    assert transport.sent == []
    reply = json.loads(publisher.published[0][1])
    assert (reply["error"]["code"], reply["transaction"]) == ("missing_parameter", "t")
    assert publisher.acked == [2] and bridge.stats.by_code == {"missing_parameter": 1}


def test_a_select_that_matches_nothing_answers_null_with_a_warning() -> None:
    op = TABLE.find("createChatCompletion")
    assert op is not None
    answer = b'{"choices": [{"message": {"content": "hi"}}]}'
    typo = parse_options({"select": "choices[0].mesage.content"})
    reply = json.loads(
        render.answer(
            op, "t", ServiceResult(answer, "application/json", 200, "r"), None, typo
        ).payload
    )
    assert reply["status"] == "ok" and reply["data"] is None
    assert reply["warning"]["code"] == "select_no_match"
    right = parse_options({"select": "choices[0].message.content"})
    good = json.loads(
        render.answer(
            op, "t", ServiceResult(answer, "application/json", 200, "r"), None, right
        ).payload
    )
    assert good["data"] == "hi" and "warning" not in good
