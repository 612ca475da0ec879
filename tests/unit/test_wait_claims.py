"""Detached waits in the dispatcher over a real SQLite journal: acknowledged once journaled, a
redelivered copy joins the wait, the next start (same owner) resumes it, another owner waits for
the lease; the journal's claims on their own."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from pathlib import Path

from support.fakehttp import Clock, FakeTransport, answer
from support.fakes import FakeLog, FakePublisher, RecordingLog, message

from bridge.config import BridgeConfig
from bridge.journal.sqlite import Journal
from bridge.methods.catalog import default_table
from bridge.pipeline.dedup import request_key
from bridge.pipeline.dispatch import Dispatcher
from bridge.pipeline.model import JournalEntry
from bridge.service.client import ServiceClient
from bridge.topics import Topics

TABLE = default_table()
TOPICS = Topics("home/openai", "test")
TOPIC = "home/openai/request/createVideo/hall"
PAYLOAD = b'{"prompt": "a cat", "transaction": 3, "_bridge": {"wait": {"timeout": 7200}}}'


def taken(entries: list[JournalEntry] | None) -> list[bytes]:
    """The keys of the waits a claim took (it must not have failed)."""
    assert entries is not None
    return [entry.key for entry in entries]


async def until(condition: Callable[[], bool]) -> None:
    """Let the loop run until `condition` holds (at most 10,000 turns: no timing involved)."""
    for _ in range(10_000):
        if condition():
            return
        await asyncio.sleep(0)
    raise AssertionError("condition never held")


def open_journal(path: Path) -> Journal:
    journal = Journal.open(
        path,
        scope="answers",
        max_bytes=1 << 20,
        max_age=3600.0,
        max_answer_bytes=1 << 16,
        synchronous="normal",
        log=RecordingLog(),
    )
    assert journal is not None
    return journal


def dispatcher(
    journal: Journal, publisher: FakePublisher, owner: str, script: list[bytes]
) -> tuple[Dispatcher, FakeTransport]:
    config = BridgeConfig.model_validate(
        {
            "service": {"api_base": "http://upstream.invalid/v1", "api_key": "sk-test-x"},
            # Polled once an hour: the wait is still running whenever the test looks.
            "jobs": {"poll_min": 3600, "poll_max": 3600},
        }
    )
    transport, clock = FakeTransport([answer(200, body) for body in script]), Clock()
    service = ServiceClient(config.service, transport=transport, sleep=clock.sleep, clock=clock)
    bridge = Dispatcher(
        config=config,
        table=TABLE,
        service=service,
        publisher=publisher,
        topics=TOPICS,
        log=FakeLog().bound,
        journal=journal,
        owner=owner,
    )
    return bridge, transport


async def test_a_wait_is_acknowledged_once_journaled_and_a_redelivered_copy_joins_it(
    tmp_path: Path,
) -> None:
    journal = open_journal(tmp_path / "journal.sqlite3")
    publisher = FakePublisher()
    queued = json.dumps({"id": "video_1", "object": "video", "status": "queued"}).encode()
    bridge, transport = dispatcher(journal, publisher, "bridge-a", [queued])
    bridge.online()
    bridge.submit(message(TOPIC, PAYLOAD, mid=1, correlation_data=b"c1"))
    await asyncio.wait_for(bridge.idle.wait(), 5)
    assert publisher.acked == [1]  # acknowledged while the job runs on
    assert [r.method for r in transport.sent] == ["POST"]
    await until(lambda: bool(publisher.published))  # the detached wait's first progress
    assert [t for t, _, _ in publisher.published] == ["home/openai/stream/createVideo/hall"]

    entry = await journal.lookup(request_key(TOPIC, PAYLOAD))
    assert entry is not None and entry.waiting and entry.answer is None
    assert entry.job is not None
    wait = entry.job["wait"]
    assert wait["reply_topic"] == "home/openai/response/createVideo/hall"
    assert wait["correlation"] == "YzE=" and wait["transaction"] == 3
    assert wait["caller"] == "hall" and wait["options"] == {"wait": {"timeout": 7200}}

    bridge.submit(message(TOPIC, PAYLOAD, mid=2, dup=True, correlation_data=b"c1"))
    await asyncio.wait_for(bridge.idle.wait(), 5)
    assert publisher.acked == [1, 2]  # joined the running wait: acknowledged, nothing created
    assert [r.method for r in transport.sent] == ["POST"]
    assert len(publisher.published) == 1  # no reply yet: the one wait answers once
    await bridge.cancel_all()  # a shutdown: the wait stays in the journal

    again, _ = dispatcher(journal, FakePublisher(), "bridge-b", [])
    assert await again.resume_waits() == 0  # bridge-a's lease still holds
    same, transport_2 = dispatcher(journal, FakePublisher(), "bridge-a", [])
    assert await same.resume_waits() == 1  # its own restart takes it back at once
    redelivered = FakePublisher()
    other, _ = dispatcher(journal, redelivered, "bridge-b", [])
    other.submit(message(TOPIC, PAYLOAD, mid=7, dup=True))
    await asyncio.wait_for(other.idle.wait(), 5)
    assert redelivered.acked == [7]  # held by bridge-a: acknowledged here, answered there
    await same.cancel_all()
    await other.cancel_all()
    assert transport_2.sent == []  # resumed, never created again
    await journal.close()


async def test_claims_go_to_one_owner_until_its_lease_runs_out(tmp_path: Path) -> None:
    journal = open_journal(tmp_path / "journal.sqlite3")
    job = {"operation": "createVideo", "id": "video_1", "params": {"video_id": "video_1"}}
    assert await journal.record_job(b"k1", "t", job, "a", lease_until=1e12)
    assert await journal.record_job(b"k2", "t", job)  # not detached: nobody claims it
    assert await journal.claim_waits("b", 2e12) == []
    assert taken(await journal.claim_waits("a", 2e12)) == [b"k1"]
    assert await journal.renew_waits("a", 3e12) == frozenset({b"k1"})
    assert await journal.record_job(b"k3", "t", job, "a", lease_until=1.0)  # long expired
    assert taken(await journal.claim_waits("b", 2e12, limit=5)) == [b"k3"]
    assert await journal.renew_waits("a", 3e12) == frozenset({b"k1"})  # k3 is b's now
    assert await journal.end_wait(b"k1", "a", delivered=True)
    assert not await journal.end_wait(b"k3", "a", delivered=True)  # not a's to end
    entry = await journal.lookup(b"k1")
    assert entry is not None and not entry.waiting
    assert await journal.claim_waits("a", 2e12) == []
    assert await journal.end_wait(b"k3", "b", delivered=False)  # given up: anyone takes it
    assert taken(await journal.claim_waits("c", 2e12)) == [b"k3"]
    await journal.close()


async def test_without_a_journal_a_wait_holds_its_request_until_the_reply() -> None:
    publisher = FakePublisher()
    config = BridgeConfig.model_validate(
        {
            "service": {"api_base": "http://upstream.invalid/v1", "api_key": "sk-test-x"},
            "jobs": {"poll_min": 3600, "poll_max": 3600},
        }
    )
    queued = json.dumps({"id": "video_1", "object": "video", "status": "queued"}).encode()
    transport, clock = FakeTransport([answer(200, queued)]), Clock()
    service = ServiceClient(config.service, transport=transport, sleep=clock.sleep, clock=clock)
    bridge = Dispatcher(
        config=config,
        table=TABLE,
        service=service,
        publisher=publisher,
        topics=TOPICS,
        log=FakeLog().bound,
    )
    bridge.online()
    bridge.submit(message(TOPIC, PAYLOAD, mid=1))
    await until(lambda: bool(publisher.published))  # created, its first progress published
    assert [r.method for r in transport.sent] == ["POST"] and len(publisher.published) == 1
    assert publisher.acked == []  # nothing remembers the wait but its unacknowledged request
    assert bridge.in_flight == 1
    await bridge.cancel_all()
    assert publisher.acked == []  # left for redelivery
