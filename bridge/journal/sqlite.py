"""The on-disk journal: upstream answers and job ids per request key, so a crash never bills twice.

One SQLite database (standard library `sqlite3`, WAL mode) in the state directory. The answer
to a request is committed before its reply is published; a request redelivered after a crash,
a restart or a broker outage is answered from the journal without calling the API again. A
waited job's id is committed as soon as it is known, so a redelivered job is polled, never
created again.

All SQLite work runs on one worker thread that owns the connection: the event loop only hands
over work and awaits its result, and writes queued meanwhile are committed together (one WAL
append and one fsync for all of them). A journal that cannot be opened or written to is
reported and then skipped: the bridge answers without it and never refuses to run.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import os
import queue
import sqlite3
import threading
import time
import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from bridge.jsoncodec import dumps, loads
from bridge.pipeline.model import JournalEntry, Scope

if TYPE_CHECKING:
    from structlog.typing import FilteringBoundLogger

"""What is journaled: nothing, waited jobs and job-creating answers only, or every answer."""

SCHEMA_VERSION = 4
"""2 added `packed` (the answer stored zlib-compressed), 3 `attempts` (starts of a request's
call that never finished), 4 answers packed with `_ZDICT` (`packed` = 2). An older file gets
the columns of schema 3 and keeps plain zlib, as it keeps its page size; a new file is 4."""
APPLICATION_ID = 0x4F4D424A  # "OMBJ": a file that is not ours is refused, not overwritten
_BATCH = 256
"""Most queued operations handled per commit."""
_WRITES = frozenset({"answer", "job", "attempt"})
"""Operations committed together in one transaction per batch."""
_PRUNE_EVERY = 60.0
"""Seconds between age prunings (size is checked on every commit)."""
_PAGE_SIZE = 512
"""Page size of a new journal: a commit writes whole pages to the WAL, so small pages write
less per answer (docs/reliability.md#what-it-costs; an existing file keeps its own)."""
_WAL_BYTES = 4 << 20
"""WAL bytes between checkpoints: rarer checkpoints copy the often-changed pages less often."""
_PACK_LEVEL = 1
"""zlib level for stored answers: level 1 already takes a chat answer to about 60 %."""
_ZDICT = (
    b'"embedding","index":0,"object":"list","data":[{"object":"embedding","flagged":false,'
    b'"categories":{"harassment":false,"hate":false,"self-harm":false,"sexual":false,'
    b'"violence":false},"category_scores":{"text":"","bytes":,"object":"response",'
    b'"status":"completed","output":[{"type":"message","id":"msg_","status":"completed",'
    b'"role":"assistant","content":[{"type":"output_text","annotations":[],"text":"'
    b'"input_tokens":,"input_tokens_details":{"cached_tokens":0},"output_tokens":,'
    b'"output_tokens_details":{"reasoning_tokens":0},"tool_calls":[{"id":"call_",'
    b'"type":"function","function":{"name":"","arguments":"{\\""finish_reason":"tool_calls"'
    b'"finish_reason":"length","service_tier":"default","system_fingerprint":"fp_",'
    b'"usage":{"prompt_tokens":,"completion_tokens":,"total_tokens":,'
    b'"prompt_tokens_details":{"cached_tokens":0,"audio_tokens":0},'
    b'"completion_tokens_details":{"reasoning_tokens":0,"audio_tokens":0,'
    b'"accepted_prediction_tokens":0,"rejected_prediction_tokens":0}},'
    b'{"status":"ok","method":"createChatCompletion","transaction":,"data":{"id":"chatcmpl-",'
    b'"object":"chat.completion","created":,"model":"gpt-4o-mini-2024-07-18","choices":[{'
    b'"index":0,"message":{"role":"assistant","content":"","refusal":null,"annotations":[]},'
    b'"logprobs":null,"finish_reason":"stop"}],'
)
"""zlib's preset dictionary for answers of schema 4 (`packed` = 2): the JSON a reply is mostly
made of (the envelope, chat completions, responses, embeddings), so that the keys of a 1 KB chat
answer cost a few bytes (1,150 -> 400 bytes, plain zlib 665). Never change it: stored answers
need it to be read; a different one would be a new `packed` value."""


def unpack(stored: bytes, packed: int) -> bytes:
    """An answer as it was recorded, from its stored bytes and `packed` value."""
    if packed == 2:
        unpacker = zlib.decompressobj(zdict=_ZDICT)
        return unpacker.decompress(stored) + unpacker.flush()
    return zlib.decompress(stored) if packed else stored


class JournalUnavailable(Exception):
    """The journal cannot be used; the message says why (it is logged, the bridge goes on)."""


@dataclass(frozen=True, slots=True)
class JournalStats:
    """Counts and sizes, for logs, tests and the benchmark."""

    entries: int
    answers: int
    jobs: int
    file_bytes: int


# Rows are appended in `id` order (so `created` grows with `id`, and pruning walks from the
# lowest id); only the small `key` index takes random writes. A table keyed by the random request
# key itself wrote about twice the bytes per answer (bench/journal.py, docs/reliability.md).
_SCHEMA = """
CREATE TABLE IF NOT EXISTS entries (
    id INTEGER PRIMARY KEY,
    key BLOB NOT NULL UNIQUE,
    created REAL NOT NULL,
    reply_topic TEXT NOT NULL,
    answer BLOB,
    content_type TEXT,
    job BLOB,
    packed INTEGER NOT NULL DEFAULT 0,
    attempts INTEGER NOT NULL DEFAULT 0
);
"""
_ADD_PACKED = "ALTER TABLE entries ADD COLUMN packed INTEGER NOT NULL DEFAULT 0"
_ADD_ATTEMPTS = "ALTER TABLE entries ADD COLUMN attempts INTEGER NOT NULL DEFAULT 0"


class SqliteStore:
    """The blocking SQLite side; used only from the journal's worker thread (or a test)."""

    def __init__(
        self,
        path: Path,
        *,
        max_bytes: int,
        max_age: float,
        synchronous: Literal["normal", "full"] = "normal",
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.path = path
        self.max_bytes = max_bytes
        self.max_age = max_age
        self._clock = clock
        self._last_age_prune = 0.0
        self.pruned = 0
        try:
            # Answers may hold anything a device asked: only this user reads them, whatever the
            # umask (SQLite gives its -wal and -shm files the database file's mode). Every
            # folder made on the way is 0700 too: one left 0777 by umask 0 would let anyone
            # swap the journal's folder.
            for folder in reversed([path.parent, *path.parent.parents]):
                if not folder.is_dir():
                    folder.mkdir(mode=0o700, exist_ok=True)
        except OSError as exc:
            raise JournalUnavailable(
                f"cannot create the state directory {str(path.parent)!r}: {exc.strerror}"
            ) from None
        if path.exists() and not os.access(path, os.R_OK | os.W_OK):
            raise JournalUnavailable(f"journal {str(path)!r} is not readable and writable")
        if not os.access(path.parent, os.W_OK):
            raise JournalUnavailable(f"state directory {str(path.parent)!r} is not writable")
        try:
            if not path.exists():
                os.close(os.open(path, os.O_CREAT | os.O_RDWR, 0o600))
            elif path.stat().st_mode & 0o077 and path.stat().st_uid == os.geteuid():
                path.chmod(0o600)  # made by an older version, or by hand
        except OSError as exc:
            raise JournalUnavailable(
                f"cannot create journal {str(path)!r}: {exc.strerror}"
            ) from None
        try:
            # isolation_level=None: transactions are begun and committed explicitly below.
            self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        except sqlite3.Error as exc:
            raise JournalUnavailable(f"cannot open journal {str(path)!r}: {exc}") from None
        try:
            self._setup(synchronous)
        except sqlite3.OperationalError as exc:  # locked, read-only, out of space, ...
            self._db.close()
            raise JournalUnavailable(f"cannot use journal {str(path)!r}: {exc}") from None
        except sqlite3.DatabaseError as exc:  # not a database, corrupt, not ours
            self._db.close()
            raise JournalUnavailable(
                f"journal {str(path)!r} is unusable ({exc}); move it away to start a new one"
            ) from None

    def _setup(self, synchronous: str) -> None:
        db = self._db
        db.execute("PRAGMA busy_timeout = 5000")  # other bridges on this host may share the file
        app_id = db.execute("PRAGMA application_id").fetchone()[0]
        version = db.execute("PRAGMA user_version").fetchone()[0]
        tables = db.execute("SELECT count(*) FROM sqlite_schema").fetchone()[0]
        if tables and app_id != APPLICATION_ID:
            raise sqlite3.DatabaseError("the file is an SQLite database but not a bridge journal")
        if version > SCHEMA_VERSION:
            raise sqlite3.DatabaseError(f"written by a newer bridge (schema {version})")
        if not tables:  # only a new file takes a page size (before WAL mode creates it)
            db.execute(f"PRAGMA page_size = {_PAGE_SIZE}")
        mode = db.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            raise sqlite3.DatabaseError(f"WAL mode refused (got {mode})")
        db.execute(f"PRAGMA synchronous = {synchronous.upper()}")
        # The WAL file is truncated back to this size after each checkpoint.
        db.execute(f"PRAGMA journal_size_limit = {min(self.max_bytes, 4 << 20)}")
        db.executescript(_SCHEMA)
        if tables and version < 2:
            db.execute(_ADD_PACKED)
        if tables and version < 3:
            db.execute(_ADD_ATTEMPTS)
        version = max(version, 3) if tables else SCHEMA_VERSION
        self.packing = 2 if version >= 4 else 1
        """How new answers are packed: 2 (zlib with `_ZDICT`) in a journal of schema 4."""
        db.execute(f"PRAGMA application_id = {APPLICATION_ID}")
        db.execute(f"PRAGMA user_version = {version}")
        self._page_size = int(db.execute("PRAGMA page_size").fetchone()[0])
        db.execute(f"PRAGMA wal_autocheckpoint = {_WAL_BYTES // self._page_size}")
        check = db.execute("PRAGMA quick_check").fetchone()[0]
        if check != "ok":
            raise sqlite3.DatabaseError(f"integrity check failed: {str(check)[:200]}")

    # --- reads and writes ---------------------------------------------------------------------

    def get(self, key: bytes) -> JournalEntry | None:
        """The entry for `key` unless older than `max_age`."""
        row = self._db.execute(
            "SELECT created, reply_topic, answer, content_type, job, packed FROM entries "
            "WHERE key = ?",
            (key,),
        ).fetchone()
        if row is None or row[0] < self._clock() - self.max_age:
            return None
        job = loads(row[4]) if row[4] is not None else None
        answer = unpack(row[2], row[5]) if row[2] is not None else None
        return JournalEntry(key, row[0], row[1], answer, row[3], job)

    def pack(self, answer: bytes) -> tuple[bytes, int]:
        """`answer` as stored and its `packed` value: compressed when that is smaller."""
        if self.packing == 2:
            packer = zlib.compressobj(_PACK_LEVEL, zdict=_ZDICT)
            packed = packer.compress(answer) + packer.flush()
        else:
            packed = zlib.compress(answer, _PACK_LEVEL)
        return (packed, self.packing) if len(packed) < len(answer) else (answer, 0)

    def begin(self) -> None:
        """Start one write transaction for a batch of puts."""
        self._db.execute("BEGIN IMMEDIATE")

    def put_answer(
        self, key: bytes, reply_topic: str, answer: bytes, content_type: str | None = None
    ) -> None:
        """Record (or complete) the answer for `key`, compressed when that is smaller."""
        stored, is_packed = self.pack(answer)
        self._db.execute(
            "INSERT INTO entries (key, created, reply_topic, answer, content_type, packed) "
            "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (key) DO UPDATE SET answer = excluded.answer, "
            "reply_topic = excluded.reply_topic, content_type = excluded.content_type, "
            "packed = excluded.packed",
            (key, self._clock(), reply_topic, stored, content_type, is_packed),
        )

    def put_job(self, key: bytes, reply_topic: str, job: Mapping[str, Any]) -> None:
        """Record (or update) the waited job for `key`; inside `begin()`/`commit()`."""
        self._db.execute(
            "INSERT INTO entries (key, created, reply_topic, job) VALUES (?, ?, ?, ?) "
            # A job started anew for this key (its earlier answer too old to reuse) replaces it.
            "ON CONFLICT (key) DO UPDATE SET job = excluded.job, answer = NULL, packed = 0",
            (key, self._clock(), reply_topic, dumps(dict(job))),
        )

    def put_attempt(self, key: bytes, reply_topic: str) -> int:
        """Count one more start of `key`'s upstream call; the count, this one included."""
        row = self._db.execute(
            "INSERT INTO entries (key, created, reply_topic, attempts) VALUES (?, ?, ?, 1) "
            "ON CONFLICT (key) DO UPDATE SET attempts = attempts + 1 RETURNING attempts",
            (key, self._clock(), reply_topic),
        ).fetchone()
        return int(row[0])

    def put_settled(self, key: bytes) -> None:
        """Forget `key`'s unfinished starts: its request was answered."""
        self._db.execute("UPDATE entries SET attempts = 0 WHERE key = ? AND attempts > 0", (key,))

    def commit(self) -> None:
        """Keep the data within its bounds, then make the batch durable (per `synchronous`)."""
        self.prune()
        self._db.execute("COMMIT")

    def rollback(self) -> None:
        """Drop a failed batch."""
        with contextlib.suppress(sqlite3.Error):
            self._db.execute("ROLLBACK")

    def prune(self, force: bool = False) -> int:
        """Drop entries older than `max_age`, then the oldest until the data fits `max_bytes`."""
        now = self._clock()
        dropped = 0
        if force or now - self._last_age_prune >= _PRUNE_EVERY:
            self._last_age_prune = now
            # `created` grows with `id`: the scan stops at the first entry young enough.
            cur = self._db.execute(
                "DELETE FROM entries WHERE id < coalesce("
                "(SELECT id FROM entries WHERE created >= ? ORDER BY id LIMIT 1), "
                "(SELECT max(id) + 1 FROM entries))",
                (now - self.max_age,),
            )
            dropped += cur.rowcount
        # Freed pages are reused by later writes, so the file stays near max_bytes. A job still
        # being waited on (job id, no answer yet) is kept: dropping it would create it again.
        for _ in range(64):
            if self.used_bytes() <= self.max_bytes:
                break
            count = self._db.execute("SELECT count(*) FROM entries").fetchone()[0]
            cur = self._db.execute(
                "DELETE FROM entries WHERE id IN (SELECT id FROM entries "
                "WHERE answer IS NOT NULL OR job IS NULL ORDER BY id LIMIT ?)",
                (max(1, count // 8),),
            )
            if not cur.rowcount:
                break
            dropped += cur.rowcount
        self.pruned += dropped
        return dropped

    def used_bytes(self) -> int:
        """Bytes of the database file that hold data (free pages excluded)."""
        # One statement: this runs on every commit (the page size is fixed once created).
        used = self._db.execute(
            "SELECT page_count - freelist_count FROM pragma_page_count(), pragma_freelist_count()"
        ).fetchone()[0]
        return int(used * self._page_size)

    def recent_keys(self, since: float) -> frozenset[bytes]:
        """Keys of the answers recorded from `since` (wall clock) on."""
        rows = self._db.execute(
            "SELECT key FROM entries WHERE answer IS NOT NULL AND id >= coalesce("
            "(SELECT id FROM entries WHERE created >= ? ORDER BY id LIMIT 1), "
            "(SELECT max(id) + 1 FROM entries))",
            (since,),
        ).fetchall()
        return frozenset(row[0] for row in rows)

    def stats(self) -> JournalStats:
        """Entry counts and the file size."""
        entries, answers, jobs = self._db.execute(
            "SELECT count(*), count(answer), count(job) FROM entries"
        ).fetchone()
        size = self.path.stat().st_size if self.path.exists() else 0
        return JournalStats(entries, answers, jobs, size)

    def close(self) -> None:
        """Checkpoint and close the connection."""
        with contextlib.suppress(sqlite3.Error):
            self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        self._db.close()


# --- the asynchronous front --------------------------------------------------------------------


@dataclass(slots=True)
class _Work:
    kind: Literal["get", "answer", "job", "attempt", "stats", "stop"]
    args: tuple[Any, ...]
    future: asyncio.Future[Any] | None
    loop: asyncio.AbstractEventLoop | None


def _settle(results: list[tuple[_Work, Any]]) -> None:
    """Hand a batch's results to their loops: one wake-up per loop, not one per request."""
    by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Future[Any], Any]]] = {}
    for work, value in results:
        if work.future is not None and work.loop is not None:
            by_loop.setdefault(work.loop, []).append((work.future, value))
    for loop, settled in by_loop.items():
        with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
            loop.call_soon_threadsafe(_deliver, settled)


def _deliver(settled: list[tuple[asyncio.Future[Any], Any]]) -> None:
    for future, value in settled:
        if not future.done():
            future.set_result(value)


class Journal:
    """The journal as the bridge uses it: awaitable reads and group-committed writes."""

    def __init__(
        self,
        store: SqliteStore,
        *,
        scope: Scope,
        max_answer_bytes: int,
        log: FilteringBoundLogger,
        recent: frozenset[bytes] = frozenset(),
    ) -> None:
        self.store = store
        self.scope = scope
        self.max_answer_bytes = max_answer_bytes
        self.recent: frozenset[bytes] | None = recent
        self.log = log
        self.failed_writes = 0
        self.commits = 0
        self._queue: queue.SimpleQueue[_Work] = queue.SimpleQueue()
        self._settles: collections.deque[bytes] = collections.deque()
        """Keys answered since the last commit (appended by the loop, taken by the worker)."""
        self._thread = threading.Thread(target=self._run, name="journal", daemon=True)
        self._thread.start()
        self._closed = False
        self._loop: asyncio.AbstractEventLoop | None = None
        """The event loop the results go to (the bridge has one)."""

    @classmethod
    def open(
        cls,
        path: Path,
        *,
        scope: Scope,
        max_bytes: int,
        max_age: float,
        max_answer_bytes: int,
        synchronous: Literal["normal", "full"],
        log: FilteringBoundLogger,
        recent_seconds: float = 0.0,
    ) -> Journal | None:
        """The journal at `path`, or None (after logging why) when it cannot be used.

        The keys of answers recorded in the last `recent_seconds` (the dedup window) are read
        into memory, so that only a repeat of one of those needs to look at the disk.
        """
        if scope == "off":
            log.info("journal off", hint="[journal] scope = off")
            return None
        try:
            store = SqliteStore(path, max_bytes=max_bytes, max_age=max_age, synchronous=synchronous)
        except JournalUnavailable as exc:
            log.error(
                "journal unavailable; running without it",
                reason=str(exc),
                consequence="a request redelivered after a crash calls the API again",
            )
            return None
        stats = store.stats()
        recent = store.recent_keys(time.time() - recent_seconds) if recent_seconds > 0 else None
        log.info(
            "journal open",
            path=str(path),
            scope=scope,
            entries=stats.entries,
            file_bytes=stats.file_bytes,
        )
        return cls(
            store,
            scope=scope,
            max_answer_bytes=max_answer_bytes,
            log=log,
            recent=recent if recent is not None else frozenset(),
        )

    # --- the API -----------------------------------------------------------------------------

    async def lookup(self, key: bytes) -> JournalEntry | None:
        """The journaled entry for `key` (None when absent, too old, or on a read error)."""
        result: JournalEntry | None = await self._submit("get", key)
        return result

    async def record_answer(
        self, key: bytes, reply_topic: str, answer: bytes, content_type: str | None = None
    ) -> bool:
        """Commit an answer before its reply goes out; False when it was not journaled."""
        if len(answer) > self.max_answer_bytes:
            return False
        ok: bool = await self._submit("answer", key, reply_topic, answer, content_type)
        return ok

    async def record_job(self, key: bytes, reply_topic: str, job: Mapping[str, Any]) -> bool:
        """Commit a waited job's state (id, operation, status); False when not journaled."""
        ok: bool = await self._submit("job", key, reply_topic, dict(job))
        return ok

    async def begin_attempt(self, key: bytes, reply_topic: str) -> int | None:
        """Commit one more start of `key`'s upstream call before it is made; the number of
        starts not yet settled, this one included (None when not journaled)."""
        count: int | None = await self._submit("attempt", key, reply_topic)
        return count

    async def settle_attempt(self, key: bytes) -> bool:
        """Record that `key`'s request was answered (its starts no longer count).

        Written with the next commit, not one of its own: a settle lost to a crash leaves one
        start too many on that key until it is pruned, where a commit would cost an fsync per
        request.
        """
        if self._closed:
            return False
        self._settles.append(key)
        return True

    async def stats(self) -> JournalStats | None:
        """Counts and file size (None on a read error)."""
        result: JournalStats | None = await self._submit("stats")
        return result

    async def close(self) -> None:
        """Finish queued work, checkpoint, close; later calls answer as if there were no journal."""
        if self._closed:
            return
        self._closed = True
        await self._submit("stop", force=True)
        await asyncio.to_thread(self._thread.join, 10.0)

    def _submit(self, kind: str, *args: Any, force: bool = False) -> asyncio.Future[Any]:
        # Asked once, not per request: on Python 3.11 get_running_loop() makes a system call.
        loop = self._loop
        if loop is None or loop.is_closed():
            loop = self._loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        if self._closed and not force:
            future.set_result(False if kind in ("answer", "job") else None)
            return future
        self._queue.put(_Work(kind, args, future, loop))  # type: ignore[arg-type]
        return future

    # --- the worker thread --------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            batch = [self._queue.get()]
            while len(batch) < _BATCH:
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            if self._handle(batch):
                return

    def _handle(self, batch: list[_Work]) -> bool:
        """Run one batch: reads at once, writes in one transaction; True after `stop`."""
        writes = [w for w in batch if w.kind in _WRITES]
        if writes:
            _settle(self._write(writes))  # their replies (and upstream calls) wait: before reads
        results: list[tuple[_Work, Any]] = []
        stop = None
        for work in batch:
            if work.kind == "get":
                results.append((work, self._read(self.store.get, work.args[0])))
            elif work.kind == "stats":
                results.append((work, self._read(self.store.stats)))
            elif work.kind == "stop":
                stop = work
        if stop is not None:
            if self._settles:
                self._write([])
            self.store.close()
            results.append((stop, None))
        _settle(results)
        return stop is not None

    def _write(self, writes: list[_Work]) -> list[tuple[_Work, Any]]:
        """One transaction for `writes`; each one's result (True, or a count), or its failure
        value (False, None for a count) when the transaction failed."""
        store = self.store
        results: list[tuple[_Work, Any]] = []
        settles = [self._settles.popleft() for _ in range(len(self._settles))]
        try:
            store.begin()
            for settled in settles:  # before the writes: a new start of the key counts anew
                store.put_settled(settled)
            for work in writes:
                if work.kind == "answer":
                    store.put_answer(*work.args)
                    results.append((work, True))
                elif work.kind == "job":
                    store.put_job(*work.args)
                    results.append((work, True))
                else:
                    results.append((work, store.put_attempt(*work.args)))
            store.commit()
        except sqlite3.Error as exc:
            store.rollback()
            self.failed_writes += len(writes)
            self._report(exc, len(writes))
            return [(work, None if work.kind == "attempt" else False) for work in writes]
        self.commits += 1
        return results

    def _read(self, fn: Callable[..., Any], *args: Any) -> Any:
        try:
            return fn(*args)
        except sqlite3.Error as exc:
            self.log.warning("journal read failed", error=str(exc)[:200])
            return None

    def _report(self, exc: sqlite3.Error, count: int) -> None:
        # The first failure and then every 100th: a full disk must not flood the log.
        if (
            self.failed_writes - count == 0
            or self.failed_writes // 100 != (self.failed_writes - count) // 100
        ):
            full = isinstance(exc, sqlite3.OperationalError) and "full" in str(exc).lower()
            self.log.error(
                "journal write failed; answering without it",
                error=str(exc)[:200],
                reason="the disk or the journal is full" if full else "write error",
                failed_writes=self.failed_writes,
                consequence="these answers are bought again if the bridge crashes before replying",
            )
