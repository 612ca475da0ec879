"""ServiceClient's retry rules and answer reading, with a fake transport and an injected clock."""

from __future__ import annotations

import json

import pytest
from support.fakehttp import Clock, FakeBody, FakeResponse, FakeTransport, answer

from bridge.config import ServiceConfig
from bridge.errors import (
    AnswerTooLarge,
    StreamInterrupted,
    UpstreamBadResponse,
    UpstreamError,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from bridge.service.client import ServiceClient
from bridge.service.models import HttpRequest
from bridge.service.sse import SseEvent
from bridge.service.transport import TransportError

REQUEST = HttpRequest("POST", "http://upstream.invalid/v1/chat/completions", {}, b"{}")


def client(
    script: list[FakeResponse | TransportError], **config: float
) -> tuple[ServiceClient, FakeTransport, Clock]:
    """A ServiceClient over a fake transport and clock."""
    transport, clock = FakeTransport(script), Clock()
    service = ServiceClient(
        ServiceConfig.model_validate({"api_base": "http://upstream.invalid/v1", **config}),
        transport=transport,
        sleep=clock.sleep,
        clock=clock,
        max_answer_bytes=1000,
    )
    return service, transport, clock


async def test_a_5xx_then_success_is_retried_with_backoff() -> None:
    service, transport, clock = client([answer(503), answer(200, b'{"ok":1}')])
    result = await service.send(REQUEST)
    assert (result.body, result.attempts, len(transport.sent)) == (b'{"ok":1}', 2, 2)
    assert len(clock.sleeps) == 1 and 0.25 <= clock.sleeps[0] <= 0.5  # first step, jittered


async def test_retry_after_is_honoured() -> None:
    service, _, clock = client([answer(429, headers={"Retry-After": "3"}), answer(200)])
    assert (await service.send(REQUEST)).attempts == 2
    assert clock.sleeps == [3.0]


async def test_a_retry_after_beyond_the_maximum_delay_is_not_waited_for() -> None:
    service, _, clock = client([answer(429, headers={"Retry-After": "60"})], retry_max_delay=20)
    with pytest.raises(UpstreamError) as caught:
        await service.send(REQUEST)
    assert (caught.value.http_status, caught.value.attempts, clock.sleeps) == (429, 1, [])
    assert caught.value.retry_after == 60


async def test_no_retry_past_the_deadline() -> None:
    service, _, clock = client(
        [answer(503, headers={"Retry-After": "5"}), answer(503, headers={"Retry-After": "5"})],
        total_timeout=8,
    )
    with pytest.raises(UpstreamError):
        await service.send(REQUEST)
    assert clock.sleeps == [5.0]  # a second 5 s wait would end after the 8 s deadline


@pytest.mark.parametrize("status", [400, 401, 404, 422])
async def test_other_4xx_are_never_retried(status: int) -> None:
    body = json.dumps({"error": {"message": "no", "type": "invalid_request_error"}}).encode()
    service, transport, clock = client([answer(status, body)])
    with pytest.raises(UpstreamError) as caught:
        await service.send(REQUEST)
    assert (len(transport.sent), clock.sleeps) == (1, [])
    assert caught.value.upstream == {"message": "no", "type": "invalid_request_error"}


async def test_retries_stop_after_max_retries() -> None:
    failures: list[FakeResponse | TransportError] = [
        TransportError("unreachable", "ClientConnectorError") for _ in range(3)
    ]
    service, transport, clock = client(failures, max_retries=2)
    with pytest.raises(
        UpstreamUnavailable,
        match=r"cannot reach service host upstream\.invalid:80: ClientConnectorError",
    ):
        await service.send(REQUEST)
    assert (len(transport.sent), len(clock.sleeps)) == (3, 2)


async def test_a_timeout_is_retried_and_reported_as_such() -> None:
    service, _, _ = client([TransportError("timeout", "x"), TransportError("timeout", "x")])
    service.config = service.config.model_copy(update={"max_retries": 1})
    with pytest.raises(UpstreamTimeout) as caught:
        await service.send(REQUEST)
    assert caught.value.attempts == 2


class Sink:
    """A stream sink that records events; `forwarded` once it took a non-[DONE] event."""

    def __init__(self) -> None:
        self.events: list[SseEvent] = []

    async def on_event(self, event: SseEvent) -> None:
        """Record the event."""
        self.events.append(event)

    @property
    def forwarded(self) -> bool:
        """Whether an event went out."""
        return any(e.data != "[DONE]" for e in self.events)

    @property
    def stopped(self) -> bool:
        """Never stops."""
        return False


def stream(chunks: list[bytes], cut: bool = False) -> FakeResponse:
    """An event-stream response."""
    return FakeResponse(200, FakeBody(chunks, cut), {"Content-Type": "text/event-stream"})


async def test_a_stream_cut_after_an_event_went_out_is_not_sent_again() -> None:
    service, transport, _ = client([stream([b"data: 1\n\n"], cut=True), stream([b"data: 2\n\n"])])
    sink = Sink()
    with pytest.raises(StreamInterrupted):
        await service.send(REQUEST, sink)
    assert len(transport.sent) == 1 and [e.data for e in sink.events] == ["1"]


async def test_a_stream_that_fails_before_any_event_is_retried() -> None:
    script: list[FakeResponse | TransportError] = [
        TransportError("unreachable", "ServerDisconnectedError"),
        stream([b"data: 1\n\ndata: [DONE]\n\n"]),
    ]
    service, _, _ = client(script)
    sink = Sink()
    result = await service.send(REQUEST, sink)
    assert (result.streamed, result.attempts) == (True, 2)
    assert [e.data for e in sink.events] == ["1", "[DONE]"]


async def test_an_unasked_for_stream_is_a_bad_response_and_not_retried() -> None:
    service, transport, _ = client([stream([b"data: 1\n\n"])])
    with pytest.raises(UpstreamBadResponse):
        await service.send(REQUEST)
    assert len(transport.sent) == 1


async def test_a_plain_body_cut_short_is_retried_as_unavailable() -> None:
    cut = FakeResponse(200, FakeBody([b"{"], cut=True), {"Content-Type": "application/json"})
    service, _, _ = client([cut, answer(200, b"[]")])
    result = await service.send(REQUEST)
    assert (result.body, result.attempts, result.content_type) == (b"[]", 2, "application/json")


async def test_an_answer_declared_larger_than_the_limit_is_refused_unread() -> None:
    body = FakeBody([b"x" * 600, b"x" * 600])
    big = FakeResponse(200, body, {"Content-Type": "audio/mpeg", "Content-Length": "1200"})
    service, transport, _ = client([big])
    with pytest.raises(AnswerTooLarge, match="answered 1200 bytes, more than") as caught:
        await service.send(REQUEST)
    assert (body.taken, len(transport.sent), caught.value.is_retryable) == (0, 1, False)
    assert caught.value.code == "answer_too_large"


async def test_an_undeclared_answer_is_read_only_until_it_passes_the_limit() -> None:
    body = FakeBody([b"x" * 400] * 10)  # chunked: 4000 bytes, no Content-Length
    service, _, _ = client([FakeResponse(200, body, {"Content-Type": "application/json"})])
    with pytest.raises(AnswerTooLarge, match="more than 1000 bytes"):
        await service.send(REQUEST)
    assert body.taken == 3


async def test_an_answer_of_exactly_the_limit_is_read_and_an_error_body_is_cut() -> None:
    service, _, _ = client([answer(200, b"y" * 1000)])
    assert len((await service.send(REQUEST)).body) == 1000
    huge_error = FakeResponse(
        400, FakeBody([b"e" * (1 << 20)] * 100), {"Content-Type": "text/plain"}
    )
    service, _, _ = client([huge_error])
    with pytest.raises(UpstreamError) as caught:
        await service.send(REQUEST)
    assert caught.value.http_status == 400
    assert huge_error.content.taken == 1
