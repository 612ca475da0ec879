"""The journal on PostgreSQL: its contract, and a group of three that loses one member mid-job.

The tests start their own PostgreSQL cluster (Debian's binaries, a free port, trust auth) and
never use a server already running on the machine; each test gets a fresh database.
"""

from __future__ import annotations

import asyncio
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from support.bridge_runner import TEST_API_KEY, BridgeProcess, make_config
from support.broker import MosquittoBroker
from support.fakes import RecordingLog
from support.mqtt_client import durable_client
from support.postgres import PostgresServer
from support.standin import RecordedRequest, Reply, Standin

from bridge.config import load_config
from bridge.journal.postgres import PgJournal
from bridge.pipeline.dedup import request_key
from bridge.pipeline.model import JournalEntry


@pytest.fixture(scope="module")
def postgres() -> Iterator[PostgresServer]:
    with PostgresServer() as server:
        yield server


@pytest.fixture
def pg_url(postgres: PostgresServer) -> str:
    """A fresh database on the private server."""
    name = f"t_{uuid.uuid4().hex[:12]}"

    async def create() -> None:
        conn = await asyncpg.connect(postgres.url)
        try:
            await conn.execute(f"CREATE DATABASE {name}")
        finally:
            await conn.close()

    asyncio.run(create())
    return postgres.url.rsplit("/", 1)[0] + f"/{name}"


def key(i: int) -> bytes:
    return request_key("openai/request/createVideo", f'{{"prompt": "{i}"}}'.encode())


def taken(entries: list[JournalEntry] | None) -> list[bytes]:
    """The keys of the waits a claim took (it must not have failed)."""
    assert entries is not None
    return [entry.key for entry in entries]


async def open_pg(url: str, log: RecordingLog, **overrides: Any) -> PgJournal | None:
    options: dict[str, Any] = {
        "scope": "answers",
        "max_bytes": 1 << 20,
        "max_age": 3600.0,
        "max_answer_bytes": 64 * 1024,
        **overrides,
    }
    return await PgJournal.open(url, log=log, **options)


async def test_answers_and_jobs_round_trip_between_two_instances(pg_url: str) -> None:
    first = await open_pg(pg_url, RecordingLog())
    second = await open_pg(pg_url, RecordingLog())
    assert first is not None and second is not None
    assert await first.record_job(key(1), "t", {"operation": "createVideo", "id": "video_1"})
    entry = await second.lookup(key(1))  # another instance sees it at once
    assert entry is not None and entry.job == {"operation": "createVideo", "id": "video_1"}
    assert entry.answer is None
    assert await first.record_answer(key(1), "t", b"final", "text/plain")
    entry = await second.lookup(key(1))
    assert entry is not None and (entry.answer, entry.content_type) == (b"final", "text/plain")
    assert not await first.record_answer(key(2), "t", b"x" * (64 * 1024 + 1))  # too large
    assert await second.lookup(key(2)) is None
    await first.close()
    await second.close()
    assert await first.lookup(key(1)) is None  # closed: as if there were none


async def test_unfinished_starts_are_counted_across_a_group(pg_url: str) -> None:
    first = await open_pg(pg_url, RecordingLog())
    second = await open_pg(pg_url, RecordingLog())
    assert first is not None and second is not None
    assert await first.begin_attempt(key(5), "t") == 1
    assert await second.begin_attempt(key(5), "t") == 2  # redelivered to another member
    assert await second.settle_attempt(key(5))
    assert await first.begin_attempt(key(5), "t") == 1
    await first.close()
    await second.close()
    assert await first.begin_attempt(key(5), "t") is None


async def test_old_entries_and_overflow_are_pruned(pg_url: str) -> None:
    opened = await open_pg(pg_url, RecordingLog())
    assert opened is not None
    now = [1_000_000.0]
    journal = PgJournal(
        opened.pool,
        scope="answers",
        max_bytes=256 * 1024,
        max_age=100,
        max_answer_bytes=1 << 20,
        log=RecordingLog(),
        clock=lambda: now[0],
    )
    assert await journal.record_answer(key(0), "t", b"old")
    now[0] += 150
    assert await journal.lookup(key(0)) is None  # too old to answer
    for i in range(1, 200):
        now[0] += 61  # every write may prune
        assert await journal.record_answer(key(i), "t", bytes(8000))
    size = await journal.pool.fetchval("SELECT pg_total_relation_size('omb_journal')")
    count = await journal.pool.fetchval("SELECT count(*) FROM omb_journal")
    assert count < 199 and size <= 2 * 256 * 1024
    assert await journal.lookup(key(199)) is not None
    await journal.close()


async def test_unreachable_database_is_reported_without_its_password() -> None:
    log = RecordingLog()
    url = "postgresql://omb:s3cret-pw@127.0.0.1:1/none"
    assert await open_pg(url, log) is None
    level, event, fields = log.lines[-1]
    assert (level, event) == ("error", "journal unavailable; running without it")
    assert "127.0.0.1:1" in fields["reason"] and "s3cret-pw" not in fields["reason"]


def test_the_url_password_is_a_secret(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text('[journal]\nurl = "postgresql://omb:s3cret-pw@db.lan/omb"\n')
    config = load_config(path, environ={})
    assert "s3cret-pw" in config.secrets()
    assert "s3cret-pw" not in str(config.redacted())


# --- a group of three, one killed mid-job ----------


def test_one_of_three_killed_mid_job_is_replaced_and_the_job_created_once(
    tmp_path: Path,
    own_mosquitto: MosquittoBroker,
    standin: Standin,
    topic_prefix: str,
    pg_url: str,
) -> None:
    done = threading.Event()
    job = {"id": "video_42", "object": "video"}

    def state(record: RecordedRequest) -> Reply:
        return Reply(json={**job, "status": "completed" if done.is_set() else "in_progress"})

    standin.script("POST", "/videos", Reply(json={**job, "status": "queued"}))
    standin.script("GET", "/videos/video_42", state)

    def bridge(name: str, client_id: str) -> BridgeProcess:
        folder = tmp_path / name
        folder.mkdir()
        path, env = make_config(
            folder,
            broker_port=own_mosquitto.port,
            api_base=standin.url,
            prefix=topic_prefix,
            mqtt={
                "shared_group": "workers",
                "instance": name,
                "client_id": client_id,
                "session_expiry": 600,
            },
            extra={
                "journal": {"url": pg_url},
                "jobs": {"poll_min": 0.05, "poll_max": 0.2},
                "logging": {"level": "info"},
            },
        )
        return BridgeProcess(path, env, folder / "bridge.log")

    members = {n: bridge(n, f"omb-{topic_prefix}-{n}") for n in ("alpha", "beta", "gamma")}
    client = durable_client(own_mosquitto, topic_prefix)
    replacement: BridgeProcess | None = None
    try:
        for member in members.values():
            member.start()
        client.publish(
            client.topic("request", "createVideo", "v"),
            {"prompt": "x", "transaction": "v", "_bridge": {"wait": True}},
        )
        standin.wait_for_requests(3)  # created, then polled twice by whoever took it
        (holder,) = [n for n, m in members.items() if '"event": "job started"' in m.log_text()]
        members[holder].kill()
        # Its host is gone for good: a new machine takes over its identity (client id, hence
        # the broker session holding the unacknowledged request) with its own name and disk.
        done.set()
        replacement = bridge("delta", f"omb-{topic_prefix}-{holder}").start()
        for i in range(30):  # the group keeps answering meanwhile
            client.publish(
                client.topic("request", "createModeration", f"m{i}"),
                {"transaction": i, "input": f"in-{i}"},
            )
        video = client.wait_for_one(f"{topic_prefix}/response/createVideo/v").json()
        assert video["status"] == "ok" and video["data"]["status"] == "completed"
        client.wait_for(f"{topic_prefix}/response/createModeration/#", 30, timeout=30)
        assert [r.method for r in standin.requests if r.path == "/videos"] == ["POST"]
        assert '"event": "job resumed"' in replacement.log_text()
        moderations = [r for r in standin.requests if r.path == "/moderations"]
        assert len(moderations) == 30
    finally:
        client.disconnect()
        for member in [*members.values(), *([replacement] if replacement else [])]:
            member.close()
            assert TEST_API_KEY not in member.log_text()


async def test_the_consoles_status_counts_the_shared_tables_entries(
    pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from bridge.config import BridgeConfig
    from bridge.methods.catalog import default_table
    from bridge.runtime.console_source import BridgeSource

    monkeypatch.setattr("bridge.runtime.console_source.JOURNAL_EVERY", 0.0)
    journal = await open_pg(pg_url, RecordingLog())
    assert journal is not None
    config = BridgeConfig.model_validate({"journal": {"url": pg_url}})
    source = BridgeSource(config, None, default_table(), lambda: None, lambda: None, workers=2)
    try:
        shown = (await source.status())["journal"]
        assert (shown["kind"], shown["entries"]) == ("postgresql", 0) and shown["bytes"] > 0
        for i in range(3):
            assert await journal.record_answer(key(i), "t", b"answer", "text/plain")
        shown = (await source.status())["journal"]
        assert shown["entries"] == 3  # the one table a group shares, not counted per worker
    finally:
        await source.close()
        await journal.close()
    unreachable = BridgeConfig.model_validate(
        {"journal": {"url": "postgresql://omb:s3cret-pw@127.0.0.1:1/none"}}
    )
    source = BridgeSource(unreachable, None, default_table(), lambda: None, lambda: None)
    status = await source.status()
    assert status["journal"] == {"scope": "answers", "kind": "postgresql", "entries": None,
                                 "bytes": None}  # fmt: skip
    assert "s3cret-pw" not in str(status)
    await source.close()


# --- detached waits: one member at a time ----------

WAITED = {"operation": "createVideo", "id": "video_1", "params": {"video_id": "video_1"}}


async def test_a_detached_wait_is_claimed_by_one_member_until_its_lease_runs_out(
    pg_url: str,
) -> None:
    first = await open_pg(pg_url, RecordingLog())
    second = await open_pg(pg_url, RecordingLog())
    assert first is not None and second is not None
    assert await first.record_job(key(1), "t", WAITED, "alpha", lease_until=1e12)
    assert await second.claim_waits("beta", 2e12) == []  # alpha's lease holds
    entry = await second.lookup(key(1))
    assert entry is not None and entry.waiting  # visible to the group, held by alpha
    assert taken(await first.claim_waits("alpha", 2e12)) == [key(1)]
    assert await first.renew_waits("alpha", 3e12) == frozenset({key(1)})
    assert await first.record_job(key(2), "t", WAITED, "alpha", lease_until=1.0)  # alpha died
    assert taken(await second.claim_waits("beta", 2e12)) == [key(2)]
    assert await first.renew_waits("alpha", 3e12) == frozenset({key(1)})  # key 2 is beta's
    assert await second.end_wait(key(2), "beta", delivered=True)
    assert await first.claim_waits("alpha", 2e12, key=key(2)) == []  # answered: nobody's
    await first.close()
    await second.close()


async def test_members_claiming_at_once_never_take_the_same_wait(pg_url: str) -> None:
    members = [await open_pg(pg_url, RecordingLog()) for _ in range(4)]
    assert all(m is not None for m in members)
    journals = [m for m in members if m is not None]
    for i in range(40):  # their holder's lease ran out long ago
        assert await journals[0].record_job(key(100 + i), "t", WAITED, "gone", lease_until=1.0)
    for _ in range(3):
        claims = await asyncio.gather(
            *(j.claim_waits(f"m{n}", 2e12, limit=12) for n, j in enumerate(journals))
        )
        keys = [key for batch in claims for key in taken(batch)]
        assert len(keys) == len(set(keys))  # no wait went to two members
        if len(keys) == 40:
            break
    owners = await journals[0].pool.fetch("SELECT owner, count(*) FROM omb_journal GROUP BY 1")
    assert sum(row["count"] for row in owners) == 40
    assert all(row["owner"] != "gone" for row in owners)
    for journal in journals:
        await journal.close()


def test_a_dead_members_wait_is_taken_over_by_another_once_its_lease_runs_out(
    tmp_path: Path,
    own_mosquitto: MosquittoBroker,
    standin: Standin,
    topic_prefix: str,
    pg_url: str,
) -> None:
    done = threading.Event()
    job = {"id": "video_43", "object": "video"}

    def state(record: RecordedRequest) -> Reply:
        return Reply(json={**job, "status": "completed" if done.is_set() else "in_progress"})

    standin.script("POST", "/videos", Reply(json={**job, "status": "queued"}))
    standin.script("GET", "/videos/video_43", state)

    def bridge(name: str) -> BridgeProcess:
        folder = tmp_path / name
        folder.mkdir()
        path, env = make_config(
            folder,
            broker_port=own_mosquitto.port,
            api_base=standin.url,
            prefix=topic_prefix,
            mqtt={
                "shared_group": "workers",
                "instance": name,
                "client_id": f"omb-{topic_prefix}-{name}",
                "session_expiry": 600,
            },
            extra={
                "journal": {"url": pg_url},
                "jobs": {"poll_min": 0.05, "poll_max": 0.2, "claim_lease": 1.5},
                "logging": {"level": "info"},
            },
        )
        return BridgeProcess(path, env, folder / "bridge.log")

    members = {n: bridge(n) for n in ("alpha", "beta")}
    client = durable_client(own_mosquitto, topic_prefix)
    try:
        for member in members.values():
            member.start()
        client.publish(
            client.topic("request", "createVideo", "v"),
            {"prompt": "x", "transaction": "v", "_bridge": {"wait": True}},
            correlation_data=b"corr-v",
        )
        standin.wait_for_requests(3)  # created, then polled twice by whoever took it
        (holder,) = [n for n, m in members.items() if '"event": "job started"' in m.log_text()]
        (other,) = set(members) - {holder}
        members[holder].kill()  # for good: nobody restarts it
        done.set()
        reply = client.wait_for_one(f"{topic_prefix}/response/createVideo/v", timeout=20)
        assert reply.correlation_data == b"corr-v"
        assert reply.json()["data"]["status"] == "completed"
        assert '"event": "job resumed"' in members[other].log_text()
        assert [r.method for r in standin.requests if r.path == "/videos"] == ["POST"]
        assert len(client.messages(f"{topic_prefix}/response/#")) == 1
    finally:
        client.disconnect()
        for member in members.values():
            member.close()
            assert TEST_API_KEY not in member.log_text()
