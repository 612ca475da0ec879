"""JobWaiter with its injected clock and sleep: polling schedule, progress, the end, the timeout."""

from __future__ import annotations

import json
from typing import Any

import pytest
from pydantic import SecretStr
from support.fakehttp import Clock, FakeTransport, answer
from support.fakes import FakeLog, FakePublisher, message

from bridge.config import JobsConfig, ServiceConfig
from bridge.errors import JobFailed, JobTimeout
from bridge.methods.catalog import default_table
from bridge.pipeline.access import AccessRules
from bridge.pipeline.build import RequestBuilder
from bridge.pipeline.decide import Call, Decider, Route
from bridge.pipeline.waiting import JobWaiter
from bridge.redact import Redactor
from bridge.service.client import ServiceClient
from bridge.topics import Topics

SERVICE = ServiceConfig(api_base="http://upstream.invalid/v1", api_key=SecretStr("sk-waiter"))
BATCH = {"input_file_id": "file-1", "endpoint": "/v1/chat/completions", "completion_window": "24h"}


def batch(status: str, done: int = 0) -> bytes:
    """A Batch object as the spec shapes it, with `done` of 10 requests completed."""
    counts = {"total": 10, "completed": done, "failed": 0}
    return json.dumps(
        {"id": "batch_1", "object": "batch", "status": status, "request_counts": counts}
    ).encode()


def waiter(
    statuses: list[bytes], clock: Clock, publisher: FakePublisher, **jobs: float
) -> tuple[JobWaiter, Call, Route, FakeTransport]:
    """A JobWaiter over a scripted service host and the decided createBatch call."""
    table = default_table()
    builder = RequestBuilder(SERVICE)
    transport = FakeTransport([answer(200, body) for body in statuses])
    service = ServiceClient(SERVICE, transport, sleep=clock.sleep, clock=clock)
    job_waiter = JobWaiter(
        table=table,
        builder=builder,
        service=service,
        publisher=publisher,
        redactor=Redactor(["sk-waiter"]),
        journal=None,
        config=JobsConfig.model_validate({"poll_min": 2.0, "poll_max": 5.0, **jobs}),
        log=FakeLog().bound,
        sleep=clock.sleep,
        clock=clock,
    )
    decider = Decider(
        topics=Topics("home/openai", "test"),
        table=table,
        access=AccessRules(["*"], []),
        builder=builder,
        max_request_bytes=10_000,
        log=FakeLog().bound,
    )
    payload: dict[str, Any] = {**BATCH, "transaction": 7, "_bridge": {"wait": {"timeout": 60}}}
    inbound = message("home/openai/request/createBatch/k", json.dumps(payload).encode())
    route = decider.route(inbound)
    assert route is not None
    call = decider.decide(inbound, route)
    assert isinstance(call, Call)
    return job_waiter, call, route, transport


async def test_a_job_is_polled_on_the_growing_schedule_to_its_end() -> None:
    clock, publisher = Clock(), FakePublisher()
    statuses = [batch("validating"), batch("in_progress", 3), batch("in_progress", 3)]
    statuses += [batch("in_progress", 8), batch("completed", 10)]
    job_waiter, call, route, transport = waiter(statuses, clock, publisher)
    outcome = await job_waiter.follow(call, route, None, None)
    assert clock.sleeps == [2.0, 3.0, 4.5, 5.0]  # poll_min, half again each time, poll_max
    assert [r.method for r in transport.sent] == ["POST"] + ["GET"] * 4
    assert transport.sent[1].url == "http://upstream.invalid/v1/batches/batch_1"
    progress = [json.loads(p) for _, p, _ in publisher.published]
    assert [(p["seq"], p["data"]["status"], p["data"].get("progress")) for p in progress] == [
        (0, "validating", 0),
        (1, "in_progress", 30),
        (2, "in_progress", 80),
        (3, "completed", 100),
    ]  # an unchanged poll publishes nothing
    assert all(p["transaction"] == 7 for p in progress)
    reply = json.loads(outcome.payload)
    assert reply["status"] == "ok" and reply["data"]["status"] == "completed"


async def test_a_job_that_outlives_the_wait_times_out_on_the_clock_not_the_wall() -> None:
    clock, publisher = Clock(), FakePublisher()
    statuses = [batch("validating")] + [batch("in_progress", 1)] * 40
    job_waiter, call, route, _ = waiter(statuses, clock, publisher)
    with pytest.raises(JobTimeout, match=r"batch_1 did not end within 60 s") as caught:
        await job_waiter.follow(call, route, None, None)
    assert caught.value.code == "job_timeout"
    assert sum(clock.sleeps) <= 60 and clock.now - 1000.0 <= 60


async def test_a_failed_job_is_an_error_with_the_job_attached() -> None:
    clock, publisher = Clock(), FakePublisher()
    job_waiter, call, route, _ = waiter([batch("validating"), batch("failed")], clock, publisher)
    with pytest.raises(JobFailed, match="batch_1 ended failed"):
        await job_waiter.follow(call, route, None, None)
