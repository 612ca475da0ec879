"""The on-disk journal: upstream answers and job ids per request key, so a crash never bills twice.

One SQLite database (standard library `sqlite3`, WAL mode) in the state directory. The answer
to a request is committed before its reply is published; a request redelivered after a crash,
a restart or a broker outage is answered from the journal without calling the API again. A
waited job's id is committed as soon as it is known, so a redelivered job is polled, never
created again.

All SQLite work runs on one worker thread that owns the connection: the event loop only hands
over work and awaits its result, and writes queued meanwhile are committed together (one WAL
append and one fsync for all of them). With `synchronous = "normal"` small writes (starts,
answers up to 4 KiB packed, settles) are appended to a tail file instead and reach SQLite in
batches (bridge/journal/tail.py): a commit per request wrote several whole pages. A journal that
cannot be opened or written to is reported and then skipped: the bridge answers without it and
never refuses to run.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import copy
import errno
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

from bridge.journal import tail as tails
from bridge.journal.tail import Pending, Slot, TailFile
from bridge.jsoncodec import dumps, loads
from bridge.pipeline.model import JournalEntry, Scope

if TYPE_CHECKING:
    from structlog.typing import FilteringBoundLogger

"""What is journaled: nothing, waited jobs and job-creating answers only, or every answer."""

SCHEMA_VERSION = 4
"""2 added `packed` (the answer stored zlib-compressed), 3 `attempts` (starts of a request's
call that never finished), 4 answers packed with `_ZDICT` (`packed` = 2). An older file gets
the columns of schema 3 and keeps plain zlib, as it keeps its page size; a new file is 4. The
columns of detached waits (`waiting`, `owner`, `lease`) and the table `tails` are added to any
file that lacks them, whatever its version: a bridge of the same schema without them still reads
and writes it."""
APPLICATION_ID = 0x4F4D424A  # "OMBJ": a file that is not ours is refused, not overwritten
_BATCH = 256
"""Most queued operations handled per commit."""
_WRITES = frozenset({"answer", "job", "attempt", "claim", "renew", "end"})
"""Operations committed together in one transaction per batch."""
_FAILED: dict[str, Any] = {"attempt": None, "claim": None, "renew": None}
"""What a write whose transaction failed returns, by kind (others: False)."""
_PRUNE_EVERY = 60.0
"""Seconds between age prunings (size is checked on every commit)."""
_PAGE_SIZE = 512
"""Page size of a new journal: a commit writes whole pages to the WAL, so small pages write
less per answer (docs/reliability.md#what-it-costs; an existing file keeps its own)."""
_WAL_BYTES = 16 << 20
"""WAL bytes between checkpoints (at most a quarter of `max_bytes`): a checkpoint copies each
page changed since the last once, so the rarer, the fewer copies of the often-changed pages (the
key index's): 2,289 -> 1,832 bytes a request with the tail file against 4 MiB."""
_UNSYNCED_SECONDS = 10.0
"""A commit that takes in tail records older than this is fsynced (`synchronous = "normal"`
commits are not) before the files are removed: else a power cut could keep the removal and lose
the commit, and with it records a day old; younger ones are within what a power cut may lose
anyway (docs/reliability.md#the-journal, "Durability")."""
_HANDOVER_CACHE_KIB = 512
"""Page cache of the hand-over's connection (SQLite's default is 2,000 KiB): a tail file's
transaction spills its pages to the WAL sooner, each still written once (bench/README.md)."""
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
    attempts INTEGER NOT NULL DEFAULT 0,
    waiting INTEGER NOT NULL DEFAULT 0,
    owner TEXT,
    lease REAL
);
CREATE TABLE IF NOT EXISTS tails (
    file TEXT PRIMARY KEY,
    size INTEGER NOT NULL,
    head INTEGER NOT NULL
) WITHOUT ROWID;
"""
# `tails`: the tail files whose records are in SQLite (by `tails.label`, with their size and
# `tails.head_of` then), written in the transaction that took them in: a file that a crash kept
# from being removed is not replayed over what that transaction and later ones wrote.
_ADD_PACKED = "ALTER TABLE entries ADD COLUMN packed INTEGER NOT NULL DEFAULT 0"
_ADD_ATTEMPTS = "ALTER TABLE entries ADD COLUMN attempts INTEGER NOT NULL DEFAULT 0"
_ADD_WAITS = {
    "waiting": "ALTER TABLE entries ADD COLUMN waiting INTEGER NOT NULL DEFAULT 0",
    "owner": "ALTER TABLE entries ADD COLUMN owner TEXT",
    "lease": "ALTER TABLE entries ADD COLUMN lease REAL",
}
_ENTRY_COLUMNS = "key, created, reply_topic, answer, content_type, job, packed, waiting"


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
        self.synchronous = synchronous
        self._raised = False
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
        # Debian's SQLite zeroes every freed page (SECURE_DELETE): each answer aged out was then
        # written twice more (WAL, checkpoint). FAST zeroes only pages written anyway; freed
        # answers stay in free pages of this private file until those are reused.
        db.execute("PRAGMA secure_delete = FAST")
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
        columns = {row[1] for row in db.execute("PRAGMA table_info(entries)")}
        for column, statement in _ADD_WAITS.items():
            if column not in columns:
                db.execute(statement)
        db.execute(f"PRAGMA application_id = {APPLICATION_ID}")
        db.execute(f"PRAGMA user_version = {version}")
        self._page_size = int(db.execute("PRAGMA page_size").fetchone()[0])
        checkpoint = max(64, min(_WAL_BYTES, self.max_bytes // 4) // self._page_size)
        db.execute(f"PRAGMA wal_autocheckpoint = {checkpoint}")
        self._pragmas = [
            "PRAGMA busy_timeout = 5000",
            f"PRAGMA synchronous = {synchronous.upper()}",
            "PRAGMA secure_delete = FAST",
            f"PRAGMA journal_size_limit = {min(self.max_bytes, 4 << 20)}",
            f"PRAGMA wal_autocheckpoint = {checkpoint}",
        ]
        check = db.execute("PRAGMA quick_check").fetchone()[0]
        if check != "ok":
            raise sqlite3.DatabaseError(f"integrity check failed: {str(check)[:200]}")

    def twin(self, cache_kib: int | None = None) -> SqliteStore:
        """A second connection to this journal, set up alike (for another thread's writes),
        with a page cache of at most `cache_kib` KiB when given (else SQLite's default)."""
        twin = copy.copy(self)
        twin.reconnect(cache_kib)
        return twin

    def reconnect(self, cache_kib: int | None = None) -> None:
        """A connection of this store's own (a copy's shares the original's), set up alike, with
        a page cache of at most `cache_kib` KiB when given."""
        self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        self._raised = False
        for pragma in self._pragmas:
            self._db.execute(pragma)
        if cache_kib is not None:
            self._db.execute(f"PRAGMA cache_size = -{cache_kib}")

    # --- reads and writes ---------------------------------------------------------------------

    def get(self, key: bytes) -> JournalEntry | None:
        """The entry for `key` unless older than `max_age` (a detached wait whatever its age)."""
        row = self._db.execute(f"SELECT {_ENTRY_COLUMNS} FROM entries WHERE key = ?", (key,))
        entry = _entry(row.fetchone())
        if entry is None or (entry.created < self._clock() - self.max_age and not entry.waiting):
            return None
        return entry

    def pack(self, answer: bytes) -> tuple[bytes, int]:
        """`answer` as stored and its `packed` value: compressed when that is smaller."""
        if self.packing == 2:
            packer = zlib.compressobj(_PACK_LEVEL, zdict=_ZDICT)
            packed = packer.compress(answer) + packer.flush()
        else:
            packed = zlib.compress(answer, _PACK_LEVEL)
        return (packed, self.packing) if len(packed) < len(answer) else (answer, 0)

    def begin(self, durable: bool = False) -> None:
        """Start one write transaction for a batch of puts; `durable`: its commit is fsynced
        whatever `synchronous` says (the tail file is emptied after it)."""
        if durable and self.synchronous != "full":
            self._db.execute("PRAGMA synchronous = FULL")
            self._raised = True
        self._db.execute("BEGIN IMMEDIATE")

    def now(self) -> float:
        """The store's wall clock."""
        return self._clock()

    def attempts(self, key: bytes) -> int:
        """`key`'s unsettled starts as committed."""
        row = self._db.execute("SELECT attempts FROM entries WHERE key = ?", (key,)).fetchone()
        return int(row[0]) if row is not None else 0

    def put_packed(
        self,
        key: bytes,
        reply_topic: str,
        stored: bytes,
        packed: int,
        content_type: str | None,
        created: float,
    ) -> None:
        """Record an answer already packed (`pack`), first seen at `created`."""
        self._db.execute(
            "INSERT INTO entries (key, created, reply_topic, answer, content_type, packed) "
            "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (key) DO UPDATE SET answer = excluded.answer, "
            "reply_topic = excluded.reply_topic, content_type = excluded.content_type, "
            "packed = excluded.packed",
            (key, created, reply_topic, stored, content_type, packed),
        )

    def set_attempts(self, key: bytes, reply_topic: str, count: int, created: float) -> None:
        """Set `key`'s unsettled starts to `count` (replaying the tail: a count, not a step)."""
        if count:
            self._db.execute(
                "INSERT INTO entries (key, created, reply_topic, attempts) VALUES (?, ?, ?, ?) "
                "ON CONFLICT (key) DO UPDATE SET attempts = excluded.attempts",
                (key, created, reply_topic, count),
            )
        else:
            self.put_settled(key)

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

    def put_job(
        self,
        key: bytes,
        reply_topic: str,
        job: Mapping[str, Any],
        owner: str | None = None,
        lease_until: float = 0.0,
    ) -> None:
        """Record (or update) the waited job for `key`, with `owner` as a detached wait it
        holds until `lease_until`; inside `begin()`/`commit()`."""
        waiting = 1 if owner is not None else 0
        lease = lease_until if owner is not None else None
        self._db.execute(
            "INSERT INTO entries (key, created, reply_topic, job, waiting, owner, lease) "
            "VALUES (?, ?, ?, ?, ?, ?, ?) "
            # A job started anew for this key (its earlier answer too old to reuse) replaces it.
            "ON CONFLICT (key) DO UPDATE SET job = excluded.job, answer = NULL, packed = 0, "
            "waiting = max(waiting, excluded.waiting), owner = coalesce(excluded.owner, owner), "
            "lease = coalesce(excluded.lease, lease)",
            (key, self._clock(), reply_topic, dumps(dict(job)), waiting, owner, lease),
        )

    def claim(
        self, owner: str, lease_until: float, key: bytes | None = None, limit: int | None = None
    ) -> list[JournalEntry]:
        """Take the detached waits free to take (see `Journal.claim_waits`); those taken."""
        rows = self._db.execute(
            f"UPDATE entries SET owner = ?, lease = ? WHERE id IN (SELECT id FROM entries "
            "WHERE waiting = 1 AND (owner IS NULL OR owner = ? OR lease < ?) "
            "AND (? IS NULL OR key = ?) ORDER BY owner IS ? DESC, id LIMIT ?) "
            f"RETURNING {_ENTRY_COLUMNS}",
            (
                owner,
                lease_until,
                owner,
                self._clock(),
                key,
                key,
                owner,
                -1 if limit is None else limit,
            ),
        ).fetchall()
        return [entry for entry in map(_entry, rows) if entry is not None]

    def renew(self, owner: str, lease_until: float) -> frozenset[bytes]:
        """Extend `owner`'s leases; the keys of the waits it still holds."""
        rows = self._db.execute(
            "UPDATE entries SET lease = ? WHERE owner = ? AND waiting = 1 RETURNING key",
            (lease_until, owner),
        ).fetchall()
        return frozenset(row[0] for row in rows)

    def end(self, key: bytes, owner: str, delivered: bool) -> bool:
        """Mark `key`'s wait answered, or give it up; whether `owner` still held it."""
        cur = self._db.execute(
            "UPDATE entries SET owner = NULL, lease = NULL, waiting = ? "
            "WHERE key = ? AND owner = ?",
            (0 if delivered else 1, key, owner),
        )
        return cur.rowcount > 0

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

    def absorbed_tails(self) -> dict[str, tuple[int, int]]:
        """The tail files recorded as in SQLite: label -> (size, head)."""
        rows = self._db.execute("SELECT file, size, head FROM tails").fetchall()
        return {file: (size, head) for file, size, head in rows}

    def add_tails(self, files: list[tuple[str, int, int]], prefix: str | None = None) -> None:
        """Record in the open transaction that the tail files `files` (label, size, head) are in
        SQLite; with `prefix`, first forget the files whose labels start with it (a slot's
        earlier files, removed since)."""
        if prefix is not None:
            self._db.execute("DELETE FROM tails WHERE file GLOB ?", (f"{prefix}*",))
        self._db.executemany("INSERT OR REPLACE INTO tails VALUES (?, ?, ?)", files)

    def forget_tails(self, labels: list[str]) -> None:
        """Forget the tail files `labels` (in the open transaction): they no longer exist."""
        self._db.executemany("DELETE FROM tails WHERE file = ?", [(label,) for label in labels])

    def commit(self) -> None:
        """Keep the data within its bounds, then make the batch durable (per `synchronous`)."""
        self.prune()
        try:
            self._db.execute("COMMIT")
        finally:
            self._lower()

    def _lower(self) -> None:
        """Back to `synchronous` after a durable batch."""
        if self._raised:
            self._raised = False
            self._db.execute(f"PRAGMA synchronous = {self.synchronous.upper()}")

    def rollback(self) -> None:
        """Drop a failed batch."""
        with contextlib.suppress(sqlite3.Error):
            self._db.execute("ROLLBACK")
        with contextlib.suppress(sqlite3.Error):
            self._lower()

    def prune(self, force: bool = False) -> int:
        """Drop entries older than `max_age`, then the oldest until the data fits `max_bytes`."""
        now = self._clock()
        dropped = 0
        if force or now - self._last_age_prune >= _PRUNE_EVERY:
            self._last_age_prune = now
            # `created` grows with `id`: the scan stops at the first entry young enough.
            # A detached wait is kept until answered: its request is acknowledged, so nothing
            # else would ever answer it.
            cur = self._db.execute(
                "DELETE FROM entries WHERE waiting = 0 AND id < coalesce("
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
                "WHERE (answer IS NOT NULL OR job IS NULL) AND waiting = 0 ORDER BY id LIMIT ?)",
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


def _entry(row: Any) -> JournalEntry | None:
    """The entry in a row of `_ENTRY_COLUMNS` (None for no row)."""
    if row is None:
        return None
    key, created, reply_topic, answer, content_type, job, packed, waiting = row
    if answer is not None:
        answer = unpack(answer, packed)
    job = loads(job) if job is not None else None
    return JournalEntry(key, created, reply_topic, answer, content_type, job, bool(waiting))


# --- the asynchronous front --------------------------------------------------------------------


@dataclass(slots=True)
class _Work:
    kind: Literal["get", "answer", "job", "attempt", "claim", "renew", "end", "stats", "stop"]
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


def _to_sqlite(store: SqliteStore, data: bytes) -> None:
    """Write the records of a tail file's bytes into `store`, inside its open transaction.

    Each record says where a key stands (an answer, a count of starts), not a step from where it
    was. A file is still never written twice: the transaction that takes it in records it in
    `tails`, and a crash before its removal leaves a file the next start skips (`_orphans_to`).
    """
    _pending_to_sqlite(store, tails.replay(data), lambda at: tails.record_at(data, at))


def _orphans_to(store: SqliteStore, journal: Path, orphans: list[Path]) -> None:
    """Hand the tail files of processes that died to `store` in one fsynced transaction, except
    those it already has (`tails.taken_in`), and forget the recorded files that no longer exist
    (so that a name used again is new); then remove the orphans."""
    if not orphans and not store.absorbed_tails():
        return
    store.begin(durable=bool(orphans))
    known = store.absorbed_tails()  # again, in the transaction: another process may have written
    store.forget_tails(
        [label for label in known if not journal.with_name(f"{journal.name}-{label}").exists()]
    )
    replayed = []
    for orphan in orphans:
        data = orphan.read_bytes()
        label, head = tails.label(journal, orphan), tails.head_of(data)
        if head is None or tails.taken_in(known, label, data):
            continue  # nothing in it, or all of it in SQLite already
        _to_sqlite(store, data)
        store.add_tails([(label, len(data), head)])
        replayed.append((orphan, data))
    _most_starts(store, journal, replayed)
    store.commit()
    for orphan in orphans:
        orphan.unlink()


def _most_starts(store: SqliteStore, journal: Path, orphans: list[tuple[Path, bytes]]) -> None:
    """Give each key that the tail files `orphans` (path, bytes) of several processes count
    starts of the largest count (in `store`'s open transaction, after their records): replayed
    one after the other, the last file's count would stand."""
    starts, slots = tails.starts_by_slot(journal, orphans)
    for key, count in starts.items():
        if slots[key] > 1:
            store.set_attempts(key, "", count, 0.0)


def _pending_to_sqlite(
    store: SqliteStore,
    pending: dict[bytes, Pending],
    record_at: Callable[[int], tuple[int, bytes, bytes, int] | tuple[int, bytes, bytes] | None],
) -> None:
    """Write where each key of `pending` stands into `store`'s open transaction, reading its
    answer with `record_at` (an offset in the tail file its `pending` was kept for)."""
    for key, known in pending.items():
        record = record_at(known.answer_at) if known.answer_at is not None else None
        if record is not None:
            answer = tails.decode_answer(key, record[2])
            store.put_packed(
                key,
                answer.reply_topic,
                answer.stored,
                answer.packed,
                answer.content_type,
                known.created,
            )
        if known.attempts is not None:
            store.set_attempts(key, known.reply_topic, known.attempts, known.created)


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
        slot: Slot | None = None,
    ) -> None:
        self.store = store
        self.slot = slot
        """This process's tail files with `synchronous = "normal"` (bridge/journal/tail.py)."""
        self.tail: TailFile | None = None
        """The tail file being appended to (opened at the first write)."""
        self._pending: dict[bytes, Pending] = {}
        """What `tail` holds per key."""
        self._sealed: TailFile | None = None
        """A full tail file whose records a thread of its own is handing to SQLite."""
        self._sealed_pending: dict[bytes, Pending] = {}
        self._handover: threading.Thread | None = None
        self._handed = False
        """Whether the last hand-over committed."""
        self._retry_at = 0
        """Size of `tail` at which a failed hand-over is tried again."""
        self._twin: SqliteStore | None = None
        """The hand-over thread's own connection."""
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
        slot = None
        if synchronous == "normal":
            try:
                slot, orphans = Slot.claim(path)
                # Left by processes that died: SQLite gets them before anything.
                _orphans_to(store, path, orphans)
                slot.release_others()
            except (OSError, sqlite3.Error) as exc:
                store.rollback()
                if slot is not None:
                    slot.close()
                store.close()
                log.error(
                    "journal unavailable; running without it",
                    reason=f"cannot use the tail files of journal {str(path)!r}: {exc}",
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
            slot=slot,
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

    async def record_job(
        self,
        key: bytes,
        reply_topic: str,
        job: Mapping[str, Any],
        owner: str | None = None,
        lease_until: float = 0.0,
    ) -> bool:
        """Commit a waited job's state (id, operation, status); False when not journaled. With
        `owner`, the entry becomes a detached wait held by `owner` until `lease_until`."""
        ok: bool = await self._submit("job", key, reply_topic, dict(job), owner, lease_until)
        return ok

    async def claim_waits(
        self, owner: str, lease_until: float, key: bytes | None = None, limit: int | None = None
    ) -> list[JournalEntry] | None:
        """Take the detached waits (only `key`'s when given) that nobody holds, `owner` holds,
        or whose holder's lease ran out, `owner`'s own first, at most `limit`; those taken
        (None on a journal error)."""
        taken: list[JournalEntry] | None = await self._submit(
            "claim", owner, lease_until, key, limit
        )
        return taken

    async def renew_waits(self, owner: str, lease_until: float) -> frozenset[bytes] | None:
        """Extend `owner`'s leases; the keys it still holds (None on a journal error)."""
        held: frozenset[bytes] | None = await self._submit("renew", owner, lease_until)
        return held

    async def end_wait(self, key: bytes, owner: str, *, delivered: bool) -> bool:
        """Mark `key`'s detached wait answered (`delivered`), or only give it up for another
        process or a later scan to finish."""
        ok: bool = await self._submit("end", key, owner, delivered)
        return ok

    async def begin_attempt(
        self, key: bytes, reply_topic: str, *, redelivered: bool = False
    ) -> int | None:
        """Commit one more start of `key`'s upstream call before it is made; the number of
        starts not yet settled, this one included (None when not journaled). A `redelivered`
        request also counts the starts in the tail files of the other processes sharing the file
        (one that died in its call leaves them there until the next start hands them over)."""
        count: int | None = await self._submit("attempt", key, reply_topic, redelivered)
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
            future.set_result(False if kind in ("answer", "job", "end") else None)
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
            try:
                if self._handle(batch):
                    return
            except Exception as exc:  # noqa: BLE001  (a bug: this batch fails, the journal goes on)
                if self._fail(batch, exc):
                    return

    def _fail(self, batch: list[_Work], exc: Exception) -> bool:
        """After an unexpected error in `batch`: roll back, give each its failure value (None for
        a read), log it; True when the batch held `stop` (the store is then closed)."""
        self.store.rollback()
        self.failed_writes += sum(work.kind in _WRITES for work in batch)
        self.log.error(
            "journal error; these requests go without it",
            error=f"{type(exc).__name__}: {exc}"[:200],
            consequence="their answers are bought again if the bridge crashes before replying",
        )
        stop = any(work.kind == "stop" for work in batch)
        if stop:
            with contextlib.suppress(sqlite3.Error):
                self.store.close()
        _settle(
            [
                (work, _FAILED.get(work.kind, False) if work.kind in _WRITES else None)
                for work in batch
            ]
        )
        return stop

    def _handle(self, batch: list[_Work]) -> bool:
        """Run one batch: reads at once, writes in one transaction; True after `stop`."""
        writes = [w for w in batch if w.kind in _WRITES]
        if writes:
            _settle(self._write(writes))  # their replies (and upstream calls) wait: before reads
        results: list[tuple[_Work, Any]] = []
        stop = None
        for work in batch:
            if work.kind == "get":
                results.append((work, self._read(self._get, work.args[0])))
            elif work.kind == "stats":
                results.append((work, self._read(self._stats)))
            elif work.kind == "stop":
                stop = work
        if stop is not None:
            if self._settles:
                self._write([])
            if self.slot is not None:
                if self._commit_tails():
                    self.slot.close()
                else:  # kept for the next start
                    for tail in (self._sealed, self.tail):
                        if tail is not None:
                            tail.close()
            if self._twin is not None:
                self._twin.close()
            self.store.close()
            results.append((stop, None))
        _settle(results)
        return stop is not None

    def _write(self, writes: list[_Work]) -> list[tuple[_Work, Any]]:
        """One transaction for `writes` (or one append to the tail file); each one's result (True,
        or a count), or its failure value (False, None for a count) when it failed."""
        store = self.store
        results: list[tuple[_Work, Any]] = []
        settles = [self._settles.popleft() for _ in range(len(self._settles))]
        try:
            packed = {
                id(work): store.pack(work.args[2]) for work in writes if work.kind == "answer"
            }
            if self.slot is not None and all(  # anything else goes to SQLite at once
                work.kind == "attempt"
                or (work.kind == "answer" and len(packed[id(work)][0]) <= tails.MAX_ANSWER)
                for work in writes
            ):
                return self._append(writes, settles, packed)
            self._reap(wait=True)
            store.begin(durable=self._tails_older_than(store.now() - _UNSYNCED_SECONDS))
            tails_in = self._tails_to(store)  # in order: the tails' records first
            for settled in settles:  # before the writes: a new start of the key counts anew
                store.put_settled(settled)
            for work in writes:
                if work.kind == "answer":
                    key, topic, _, content_type = work.args
                    stored, how = packed[id(work)]
                    store.put_packed(key, topic, stored, how, content_type, store.now())
                    results.append((work, True))
                elif work.kind == "job":
                    store.put_job(*work.args)
                    results.append((work, True))
                elif work.kind == "claim":
                    results.append((work, store.claim(*work.args)))
                elif work.kind == "renew":
                    results.append((work, store.renew(*work.args)))
                elif work.kind == "end":
                    results.append((work, store.end(*work.args)))
                else:
                    key, topic, redelivered = work.args
                    peer = self._peer_starts(key) if redelivered else 0
                    count = store.put_attempt(key, topic)
                    if peer >= count:
                        count = peer + 1
                        store.set_attempts(key, topic, count, store.now())
                    results.append((work, count))
            store.commit()
            if tails_in:
                self._drop_tails()
        except (sqlite3.Error, OSError) as exc:
            store.rollback()
            self.failed_writes += len(writes)
            self._report(exc, len(writes))
            return [(work, _FAILED.get(work.kind, False)) for work in writes]
        self.commits += 1
        return results

    def _append(
        self, writes: list[_Work], settles: list[bytes], packed: dict[int, tuple[bytes, int]]
    ) -> list[tuple[_Work, Any]]:
        """`writes` and `settles` as records appended to the tail file (one write call); once it
        holds `tails.LIMIT` bytes a thread of its own hands it to SQLite while a new one fills."""
        store, slot, now = self.store, self.slot, self.store.now()
        assert slot is not None
        self._reap()
        staged: dict[bytes, Pending] = {}
        chunks: list[bytes] = []
        at = self.tail.size if self.tail is not None else 0
        results: list[tuple[_Work, Any]] = []

        def entry(key: bytes, topic: str) -> Pending:
            if key not in staged:
                known = self._pending.get(key)
                staged[key] = (
                    Pending(known.created, known.reply_topic, known.answer_at, known.attempts)
                    if known is not None
                    else Pending(now, topic)
                )
            return staged[key]

        def starts(key: bytes) -> int:
            for source in (staged, self._pending, self._sealed_pending):
                known = source.get(key)
                if known is not None and known.attempts is not None:
                    return known.attempts
            return store.attempts(key)

        def add(record: bytes) -> int:
            nonlocal at
            chunks.append(record)
            at += len(record)
            return at - len(record)

        for key in settles:  # before the writes: a new start of the key counts anew
            if starts(key):
                add(tails.settle_record(key))
                entry(key, "").attempts = 0
        for work in writes:
            key, topic = work.args[0], work.args[1]
            if work.kind == "answer":
                stored, how = packed[id(work)]
                offset = add(tails.answer_record(key, topic, now, stored, how, work.args[3]))
                pending = entry(key, topic)
                pending.answer_at = offset
            else:
                # Peers first: a file handed over and removed meanwhile is in SQLite by then.
                peer = self._peer_starts(key) if work.args[2] else 0
                count = max(starts(key), peer) + 1
                add(tails.start_record(key, topic, now, count))
                pending = entry(key, topic)
                pending.attempts = count
            if not pending.reply_topic:  # known so far only from a settle
                pending.reply_topic, pending.created = topic, now
            results.append((work, True if work.kind == "answer" else pending.attempts))
        if chunks:
            if self.tail is None:
                self.tail = slot.open(sync=False, opened=now)
            self.tail.append(b"".join(chunks))
            self._pending.update(staged)
        self.commits += 1
        if self.tail is not None and self.tail.size >= tails.LIMIT and self._handover is None:
            if self._sealed is None:
                self._sealed, self._sealed_pending = self.tail, self._pending
                self.tail, self._pending = None, {}
                self._start_handover()
            elif self.tail.size >= self._retry_at:  # the last hand-over failed: again
                self._start_handover()
        return results

    def _start_handover(self) -> None:
        """Hand the sealed tail file to SQLite on a thread of its own."""
        self._handover = threading.Thread(
            target=self._hand_over,
            args=(self._sealed, self._sealed_pending),
            name="journal-tail",
            daemon=True,
        )
        self._handover.start()

    def _hand_over(self, sealed: TailFile, known: dict[bytes, Pending]) -> None:
        """On the hand-over thread: one fsynced transaction with what the sealed file says per
        key (`known`, the journal's account of it)."""
        self._handed = False
        try:
            if self._twin is None:
                self._twin = self.store.twin(cache_kib=_HANDOVER_CACHE_KIB)
            self._twin.begin(durable=True)
            _pending_to_sqlite(self._twin, known, sealed.read_at)
            self._absorbed(self._twin, [sealed])
            self._twin.commit()
            self._handed = True
        except sqlite3.Error as exc:  # kept: tried again once the next tail grew a quarter
            if self._twin is not None:
                self._twin.rollback()
            self.log.warning("journal tail not yet in SQLite", error=str(exc)[:200])

    def _reap(self, wait: bool = False) -> None:
        """Once the hand-over thread is done: drop the sealed file it committed."""
        handover = self._handover
        if handover is None or (handover.is_alive() and not wait):
            return
        handover.join()
        self._handover = None
        if self._handed and self._sealed is not None:
            self._sealed.remove()
            self._sealed, self._sealed_pending = None, {}
        elif self._sealed is not None:
            self._retry_at = (self.tail.size if self.tail is not None else 0) + tails.LIMIT // 4

    def _tails_older_than(self, moment: float) -> bool:
        """Whether a tail file holds records written before `moment`."""
        return any(
            tail is not None and tail.size and tail.opened < moment
            for tail in (self._sealed, self.tail)
        )

    def _tails_to(self, store: SqliteStore) -> bool:
        """Write the tail files' records into `store`'s open transaction (oldest first);
        whether there were any."""
        found = []
        for tail, known in ((self._sealed, self._sealed_pending), (self.tail, self._pending)):
            if tail is not None and tail.size:
                _pending_to_sqlite(store, known, tail.read_at)
                found.append(tail)
        if found:
            self._absorbed(store, found)
        return bool(found)

    def _absorbed(self, store: SqliteStore, files: list[TailFile]) -> None:
        """Record in `store`'s open transaction that `files` (this slot's) are in SQLite."""
        assert self.slot is not None
        store.add_tails(
            [
                (tails.label(store.path, file.path), file.size, file.head)
                for file in files
                if file.head is not None
            ],
            prefix=self.slot.prefix,  # this slot's earlier files: removed once taken in
        )

    def _drop_tails(self) -> None:
        """Remove the tail files whose records SQLite now has."""
        for tail in (self._sealed, self.tail):
            if tail is not None:
                tail.remove()
        self._sealed = self.tail = None
        self._sealed_pending, self._pending = {}, {}

    def _commit_tails(self) -> bool:
        """Every tail record into SQLite now (one fsynced transaction); whether that worked."""
        self._reap(wait=True)
        if self._sealed is None and self.tail is None:
            return True
        try:
            self.store.begin(durable=True)
            self._tails_to(self.store)
            self.store.commit()
        except sqlite3.Error as exc:
            self.store.rollback()
            self.log.warning("journal tail not yet in SQLite", error=str(exc)[:200])
            return False
        self._drop_tails()
        return True

    def _peer_starts(self, key: bytes) -> int:
        """`key`'s starts not settled in the tail files of the other processes sharing the file."""
        n = self.slot.n if self.slot is not None else -1
        return tails.peer_starts(self.store.path, n, key, self.store.absorbed_tails)

    def _get(self, key: bytes) -> JournalEntry | None:
        """`key`'s entry: SQLite's, with a newer answer from a tail file (ours or a peer's)."""
        entry = self.store.get(key)
        if self.slot is None:
            return entry
        answer = None
        for pending, tail in ((self._pending, self.tail), (self._sealed_pending, self._sealed)):
            known = pending.get(key)
            if tail is not None and known is not None and known.answer_at is not None:
                record = tail.read_at(known.answer_at)
                if record is not None and record[0] == tails.ANSWER:
                    answer = tails.decode_answer(key, record[2])
                    break
        if answer is None and (entry is None or entry.answer is None):
            answer = tails.peer_answer(self.store.path, self.slot.n, key, self.store.absorbed_tails)
        if answer is None or answer.created < self.store.now() - self.store.max_age:
            return entry
        return JournalEntry(
            key,
            entry.created if entry is not None else answer.created,
            answer.reply_topic,
            unpack(answer.stored, answer.packed),
            answer.content_type,
            entry.job if entry is not None else None,
        )

    def _stats(self) -> JournalStats:
        """Counts and size once the tails' records are in SQLite."""
        self._commit_tails()
        return self.store.stats()

    def _read(self, fn: Callable[..., Any], *args: Any) -> Any:
        try:
            return fn(*args)
        except sqlite3.Error as exc:
            self.log.warning("journal read failed", error=str(exc)[:200])
            return None

    def _report(self, exc: sqlite3.Error | OSError, count: int) -> None:
        # The first failure and then every 100th: a full disk must not flood the log.
        if (
            self.failed_writes - count == 0
            or self.failed_writes // 100 != (self.failed_writes - count) // 100
        ):
            full = (isinstance(exc, sqlite3.OperationalError) and "full" in str(exc).lower()) or (
                isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)
            )
            self.log.error(
                "journal write failed; answering without it",
                error=str(exc)[:200],
                reason="the disk or the journal is full" if full else "write error",
                failed_writes=self.failed_writes,
                consequence="these answers are bought again if the bridge crashes before replying",
            )


@dataclass(slots=True)
class _TailRead:
    ino: int
    head: bytes
    """The file's first bytes: a file made anew under the same name and inode differs there."""
    offset: int
    """Where the last whole record read ends."""
    keys: dict[bytes, list[Any]]
    """Key -> [has an answer, starts not settled (None: not said)]."""


class TailKeys:
    """The keys the tail files next to a journal hold entries for, as another process reads
    them (the web console): a tail file only grows until it is handed over and removed, so each
    read parses only the records appended since the last one."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._files: dict[Path, _TailRead] = {}

    def read(self, journal: Path) -> tuple[set[bytes], int]:
        """(keys with an entry, bytes) of the tail files next to `journal` now. Blocking."""
        with self._lock:
            keys: set[bytes] = set()
            size = 0
            seen = set()
            for file in journal.parent.glob(f"{journal.name}-tail*.*"):
                try:
                    read = self._grown(file)
                except OSError:  # handed to SQLite and removed meanwhile
                    continue
                seen.add(file)
                size += read.offset
                keys.update(k for k, (answer, starts) in read.keys.items() if answer or starts)
            for gone in set(self._files) - seen:
                del self._files[gone]
            return keys, size

    def _grown(self, file: Path) -> _TailRead:
        with file.open("rb") as f:
            stat = os.fstat(f.fileno())
            head = f.read(16)
            read = self._files.get(file)
            if read is None or (read.ino, read.head) != (stat.st_ino, head[: len(read.head)]):
                read = self._files[file] = _TailRead(stat.st_ino, head, 0, {})
            elif len(read.head) < len(head):
                read.head = head
            f.seek(read.offset)
            data = f.read()
        end = 0
        while (record := tails.record_at(data, end)) is not None:
            end = record[3]
        for key, pending in tails.replay(data[:end]).items():
            state = read.keys.setdefault(key, [False, None])
            state[0] = state[0] or pending.answer_at is not None
            if pending.attempts is not None:
                state[1] = pending.attempts
        read.offset += end
        return read


def read_size(path: Path, tail_keys: TailKeys | None = None) -> tuple[int | None, int]:
    """(entries, bytes) of the journal at `path` as another reader sees it (the web console):
    the entries in SQLite (over a read-only connection of its own) and those only in the tail
    files of the processes using it (read on by `tail_keys` when given); the bytes of the file,
    its WAL and the tail files. Entries are None when they cannot be read. Blocking: run it in
    a thread."""
    wal, shm = path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")
    size = sum(file.stat().st_size for file in (path, wal, shm) if file.is_file())
    in_tails, tail_bytes = (tail_keys or TailKeys()).read(path)
    size += tail_bytes
    if not path.is_file():
        return None, size
    try:
        db = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True, timeout=2.0)
    except sqlite3.Error:
        return None, size
    try:
        entries: int = db.execute("SELECT count(*) FROM entries").fetchone()[0]
        keys = list(in_tails)
        for at in range(0, len(keys), 500):  # a key both there and in SQLite counts once
            batch = keys[at : at + 500]
            marks = ",".join("?" * len(batch))
            known = db.execute(f"SELECT count(*) FROM entries WHERE key IN ({marks})", batch)
            entries += len(batch) - int(known.fetchone()[0])
    except sqlite3.Error:
        return None, size
    finally:
        db.close()
    return entries, size
