"""The journal on PostgreSQL (asyncpg): one journal shared by every bridge of a group.

Selected by `[journal] url = "postgresql://..."`. Same contract as the SQLite journal
(bridge/journal/sqlite.py): answers and job ids per request key, committed before the reply goes
out, bounded by age and size, and a database that cannot be reached at start is reported and then
skipped. Because every instance reads the same table, a request redelivered to *another* member of a
shared group (a replacement host, a broker that re-dispatches) is still answered from it and a
waited job is still resumed, never created twice.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import yarl

from bridge.jsoncodec import dumps, loads
from bridge.pipeline.model import JournalEntry, Scope

if TYPE_CHECKING:
    from structlog.typing import FilteringBoundLogger

_PRUNE_EVERY = 60.0
_LOCK_ID = 0x4F4D424A  # advisory lock serialising the schema set-up of instances starting at once

_SCHEMA = """
CREATE TABLE IF NOT EXISTS omb_journal (
    id BIGSERIAL PRIMARY KEY,
    key BYTEA NOT NULL UNIQUE,
    created DOUBLE PRECISION NOT NULL,
    reply_topic TEXT NOT NULL,
    answer BYTEA,
    content_type TEXT,
    job BYTEA
);
ALTER TABLE omb_journal ADD COLUMN IF NOT EXISTS attempts INTEGER NOT NULL DEFAULT 0;
ALTER TABLE omb_journal ADD COLUMN IF NOT EXISTS waiting BOOLEAN NOT NULL DEFAULT false;
ALTER TABLE omb_journal ADD COLUMN IF NOT EXISTS owner TEXT;
ALTER TABLE omb_journal ADD COLUMN IF NOT EXISTS lease DOUBLE PRECISION
"""
_ENTRY_COLUMNS = "key, created, reply_topic, answer, content_type, job, waiting"


def _entry(row: Any) -> JournalEntry:
    job = loads(row["job"]) if row["job"] is not None else None
    return JournalEntry(
        row["key"],
        row["created"],
        row["reply_topic"],
        row["answer"],
        row["content_type"],
        job,
        row["waiting"],
    )


def shown_url(url: str) -> str:
    """The URL as logs may show it: without its password."""
    try:
        return str(yarl.URL(url).with_password(None))
    except (ValueError, TypeError):
        return "(unparsable URL)"


class PgJournal:
    """The journal in a PostgreSQL table, through a small asyncpg pool."""

    def __init__(
        self,
        pool: Any,
        *,
        scope: Scope,
        max_bytes: int,
        max_age: float,
        max_answer_bytes: int,
        log: FilteringBoundLogger,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.pool = pool
        self.scope = scope
        self.max_bytes = max_bytes
        self.max_age = max_age
        self.max_answer_bytes = max_answer_bytes
        self.recent: frozenset[bytes] | None = None
        """Shared by a group: any repeat may have been answered by another member since."""
        self.log = log
        self.failed_writes = 0
        self._clock = clock
        self._last_prune = 0.0
        self._closed = False

    @classmethod
    async def open(
        cls,
        url: str,
        *,
        scope: Scope,
        max_bytes: int,
        max_age: float,
        max_answer_bytes: int,
        log: FilteringBoundLogger,
    ) -> PgJournal | None:
        """The journal at `url`, or None (after logging why) when it cannot be used."""
        if scope == "off":
            log.info("journal off", hint="[journal] scope = off")
            return None
        try:
            import asyncpg  # optional: only a PostgreSQL journal needs it
        except ImportError:
            log.error(
                "journal unavailable; running without it",
                reason="[journal] url needs asyncpg: pip install 'openai-mqtt-bridge[postgres]'",
                consequence="a request redelivered after a crash calls the API again",
            )
            return None
        pool = None
        try:
            pool = await asyncpg.create_pool(
                url, min_size=1, max_size=4, timeout=10, command_timeout=10
            )
            async with pool.acquire() as conn, conn.transaction():
                await conn.execute("SELECT pg_advisory_xact_lock($1)", _LOCK_ID)
                await conn.execute(_SCHEMA)
            count = await pool.fetchval("SELECT count(*) FROM omb_journal")
        except (OSError, TimeoutError, ValueError, asyncpg.PostgresError) as exc:
            if pool is not None:
                await pool.close()
            log.error(
                "journal unavailable; running without it",
                reason=f"cannot use the PostgreSQL journal {shown_url(url)}: "
                f"{type(exc).__name__}: {str(exc)[:200]}",
                consequence="a request redelivered after a crash calls the API again",
            )
            return None
        log.info("journal open", url=shown_url(url), scope=scope, entries=count)
        return cls(
            pool,
            scope=scope,
            max_bytes=max_bytes,
            max_age=max_age,
            max_answer_bytes=max_answer_bytes,
            log=log,
        )

    async def lookup(self, key: bytes) -> JournalEntry | None:
        """The journaled entry for `key` (None when absent, too old, or on a read error)."""
        if self._closed:
            return None
        try:
            row = await self.pool.fetchrow(
                f"SELECT {_ENTRY_COLUMNS} FROM omb_journal WHERE key = $1", key
            )
        except Exception as exc:  # noqa: BLE001  (a journal error must never fail a request)
            self.log.warning("journal read failed", error=str(exc)[:200])
            return None
        if row is None or (row["created"] < self._clock() - self.max_age and not row["waiting"]):
            return None
        return _entry(row)

    async def record_answer(
        self, key: bytes, reply_topic: str, answer: bytes, content_type: str | None = None
    ) -> bool:
        """Commit an answer before its reply goes out; False when it was not journaled."""
        if len(answer) > self.max_answer_bytes:
            return False
        return await self._write(
            "INSERT INTO omb_journal (key, created, reply_topic, answer, content_type) "
            "VALUES ($1, $2, $3, $4, $5) ON CONFLICT (key) DO UPDATE SET "
            "answer = EXCLUDED.answer, reply_topic = EXCLUDED.reply_topic, "
            "content_type = EXCLUDED.content_type",
            key,
            self._clock(),
            reply_topic,
            answer,
            content_type,
        )

    async def record_job(
        self,
        key: bytes,
        reply_topic: str,
        job: Mapping[str, Any],
        owner: str | None = None,
        lease_until: float = 0.0,
    ) -> bool:
        """Commit a waited job's state; False when not journaled. With `owner`, the entry becomes
        a detached wait held by `owner` until `lease_until` (wall clock)."""
        return await self._write(
            "INSERT INTO omb_journal (key, created, reply_topic, job, waiting, owner, lease) "
            "VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT (key) DO UPDATE SET "
            "job = EXCLUDED.job, answer = NULL, waiting = omb_journal.waiting OR EXCLUDED.waiting, "
            "owner = coalesce(EXCLUDED.owner, omb_journal.owner), "
            "lease = coalesce(EXCLUDED.lease, omb_journal.lease)",
            key,
            self._clock(),
            reply_topic,
            dumps(dict(job)),
            owner is not None,
            owner,
            lease_until if owner is not None else None,
        )

    async def claim_waits(
        self, owner: str, lease_until: float, key: bytes | None = None, limit: int | None = None
    ) -> list[JournalEntry] | None:
        """Take the detached waits (only `key`'s when given) that nobody holds, `owner` holds,
        or whose holder's lease ran out, `owner`'s own first, at most `limit`; those taken
        (None on a journal error).

        Rows another member is taking at the same moment are skipped (`SKIP LOCKED`), and the
        condition is checked again on the row as committed: each wait goes to one member.
        """
        if self._closed:
            return None
        try:
            rows = await self.pool.fetch(
                "UPDATE omb_journal SET owner = $1, lease = $2 WHERE id IN (SELECT id FROM "
                "omb_journal WHERE waiting AND (owner IS NULL OR owner = $1 OR lease < $3) "
                "AND ($4::bytea IS NULL OR key = $4) "
                "ORDER BY owner IS NOT DISTINCT FROM $1 DESC, id LIMIT $5 "
                "FOR UPDATE SKIP LOCKED) "
                "AND waiting AND (owner IS NULL OR owner = $1 OR lease < $3) "
                f"RETURNING {_ENTRY_COLUMNS}",
                owner,
                lease_until,
                self._clock(),
                key,
                limit,
            )
        except Exception as exc:  # noqa: BLE001  (a journal error must never fail a request)
            self.log.warning("journal write failed", error=str(exc)[:200])
            return None
        return [_entry(row) for row in rows]

    async def renew_waits(self, owner: str, lease_until: float) -> frozenset[bytes] | None:
        """Extend `owner`'s leases; the keys it still holds (None on a journal error)."""
        if self._closed:
            return None
        try:
            rows = await self.pool.fetch(
                "UPDATE omb_journal SET lease = $1 WHERE owner = $2 AND waiting RETURNING key",
                lease_until,
                owner,
            )
        except Exception as exc:  # noqa: BLE001  (a journal error must never fail a request)
            self.log.warning("journal write failed", error=str(exc)[:200])
            return None
        return frozenset(bytes(row["key"]) for row in rows)

    async def end_wait(self, key: bytes, owner: str, *, delivered: bool) -> bool:
        """Mark `key`'s detached wait answered (`delivered`), or only give it up for another
        member or a later scan to finish."""
        return await self._write(
            "UPDATE omb_journal SET owner = NULL, lease = NULL, waiting = $1 "
            "WHERE key = $2 AND owner = $3",
            not delivered,
            key,
            owner,
        )

    async def begin_attempt(
        self, key: bytes, reply_topic: str, *, redelivered: bool = False
    ) -> int | None:
        """Commit one more start of `key`'s upstream call before it is made; the number of
        starts not yet settled, this one included, whichever member counted them (None when
        not journaled)."""
        if self._closed:
            return None
        try:
            count = await self.pool.fetchval(
                "INSERT INTO omb_journal (key, created, reply_topic, attempts) "
                "VALUES ($1, $2, $3, 1) ON CONFLICT (key) DO UPDATE SET "
                "attempts = omb_journal.attempts + 1 RETURNING attempts",
                key,
                self._clock(),
                reply_topic,
            )
        except Exception as exc:  # noqa: BLE001  (a journal error must never fail a request)
            self.log.warning("journal write failed", error=str(exc)[:200])
            return None
        return int(count)

    async def settle_attempt(self, key: bytes) -> bool:
        """Record that `key`'s request was answered (its starts no longer count)."""
        return await self._write(
            "UPDATE omb_journal SET attempts = 0 WHERE key = $1 AND attempts > 0", key
        )

    async def close(self) -> None:
        """Close the pool; later calls answer as if there were no journal."""
        if not self._closed:
            self._closed = True
            await self.pool.close()

    async def _write(self, sql: str, *args: Any) -> bool:
        if self._closed:
            return False
        try:
            await self.pool.execute(sql, *args)
            if self._clock() - self._last_prune >= _PRUNE_EVERY:
                self._last_prune = self._clock()
                await self._prune()
        except Exception as exc:  # noqa: BLE001  (a journal error must never fail a request)
            self.failed_writes += 1
            if self.failed_writes == 1 or self.failed_writes % 100 == 0:
                self.log.error(
                    "journal write failed; answering without it",
                    error=str(exc)[:200],
                    failed_writes=self.failed_writes,
                    consequence="these answers are bought again if a bridge crashes before "
                    "replying",
                )
            return False
        return True

    async def _prune(self) -> None:
        """Drop entries older than `max_age`, then the oldest while the table exceeds max_bytes."""
        await self.pool.execute(
            "DELETE FROM omb_journal WHERE created < $1 AND NOT waiting",
            self._clock() - self.max_age,
        )
        for _ in range(8):
            size = await self.pool.fetchval("SELECT pg_total_relation_size('omb_journal')")
            if size <= self.max_bytes:
                return
            deleted = await self.pool.execute(
                "DELETE FROM omb_journal WHERE id IN (SELECT id FROM omb_journal "
                "WHERE (answer IS NOT NULL OR job IS NULL) AND NOT waiting ORDER BY id "
                "LIMIT greatest(1, (SELECT count(*) FROM omb_journal) / 8))"
            )
            if deleted.endswith(" 0"):
                return
            # Dead rows only give their space back after a vacuum.
            await self.pool.execute("VACUUM omb_journal")


class PgSize:
    """A PostgreSQL journal's entries and bytes over one connection of its own (the web
    console's status page), opened when first asked, opened again after a failure."""

    def __init__(self, url: str) -> None:
        self._url = url
        self._conn: Any = None

    async def read(self) -> tuple[int, int] | None:
        """(entries, bytes of the table and its indexes), None when the database cannot tell."""
        try:
            import asyncpg
        except ImportError:
            return None
        try:
            if self._conn is None or self._conn.is_closed():
                self._conn = await asyncpg.connect(self._url, timeout=5, command_timeout=5)
            row = await self._conn.fetchrow(
                "SELECT count(*), pg_total_relation_size('omb_journal') FROM omb_journal"
            )
        except Exception:  # noqa: BLE001  (the status page says "unknown", never the error's URL)
            await self.close()
            return None
        return int(row[0]), int(row[1])

    async def close(self) -> None:
        """Close the connection, if open."""
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(Exception):
                await conn.close(timeout=5)
