"""The journal's tail file (synchronous = "normal"): small writes appended, SQLite in batches."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import shutil
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from support.fakehttp import Clock, FakeTransport
from support.fakehttp import answer as http_answer
from support.fakes import FakeLog, FakePublisher, RecordingLog, message

from bridge.config import BridgeConfig
from bridge.journal import sqlite as sqlite_journal
from bridge.journal import tail as tails
from bridge.journal.sqlite import Journal, SqliteStore
from bridge.methods.catalog import default_table
from bridge.pipeline.dedup import request_key
from bridge.pipeline.dispatch import Dispatcher
from bridge.service.client import ServiceClient
from bridge.topics import Topics

ROOT = Path(__file__).resolve().parents[2]


def open_journal(path: Path, **overrides: Any) -> Journal:
    options: dict[str, Any] = {
        "scope": "answers",
        "max_bytes": 1 << 20,
        "max_age": 3600.0,
        "max_answer_bytes": 64 * 1024,
        "synchronous": "normal",
        **overrides,
    }
    journal = Journal.open(path, log=RecordingLog(), **options)
    assert journal is not None
    return journal


def key(i: int) -> bytes:
    return request_key("openai/request/createChatCompletion", f'{{"n": {i}}}'.encode())


def in_sqlite(path: Path) -> dict[bytes, tuple[bytes | None, int]]:
    """Rows as a second process reads them: key -> (stored answer, unsettled starts)."""
    with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as db:
        rows = db.execute("SELECT key, answer, attempts FROM entries").fetchall()
    return {row[0]: (row[1], row[2]) for row in rows}


def tail_files(folder: Path) -> list[str]:
    """Names of the tail files (and slot locks) in `folder`."""
    return sorted(name for name in os.listdir(folder) if ".sqlite3-tail" in name)


def chat(i: int) -> bytes:
    return b'{"status":"ok","data":{"object":"chat.completion","content":"answer %d"}}' % i


async def test_small_writes_wait_in_the_tail_file_and_reach_sqlite_at_close(
    tmp_path: Path,
) -> None:
    path = tmp_path / "journal.sqlite3"
    journal = open_journal(path)
    assert await journal.begin_attempt(key(1), "r/1") == 1
    assert await journal.record_answer(key(1), "r/1", chat(1))
    assert await journal.settle_attempt(key(1))
    assert await journal.begin_attempt(key(2), "r/2") == 1  # carries key 1's settle
    assert in_sqlite(path) == {}  # nothing committed to SQLite yet: one append each
    assert (tmp_path / "journal.sqlite3-tail0.0").stat().st_size > len(chat(1))
    entry = await journal.lookup(key(1))
    assert entry is not None and (entry.answer, entry.reply_topic) == (chat(1), "r/1")
    await journal.close()
    rows = in_sqlite(path)
    assert rows[key(1)][1] == 0 and rows[key(1)][0] is not None  # answered and settled
    assert rows[key(2)] == (None, 1)  # a start never finished
    assert tail_files(tmp_path) == []


async def test_a_full_tail_file_goes_to_sqlite_in_one_transaction(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tails, "LIMIT", 4096)
    path = tmp_path / "journal.sqlite3"
    journal = open_journal(path)
    for i in range(60):
        assert await journal.begin_attempt(key(i), "r") == 1
        assert await journal.record_answer(key(i), "r", chat(i))
        await journal.settle_attempt(key(i))
        for j in range(0, i + 1, 7):  # found wherever it is: a tail, the one handed over, SQLite
            entry = await journal.lookup(key(j))
            assert entry is not None and entry.answer == chat(j)
    journal._reap(wait=True)  # noqa: SLF001 - the hand-over thread's last batch is in
    twin = journal._twin  # noqa: SLF001 - the hand-over's own connection
    assert twin is not None and twin._db.execute("PRAGMA cache_size").fetchone()[0] == -512  # noqa: SLF001
    rows = in_sqlite(path)
    assert 0 < len(rows) < 60, len(rows)  # the first batches are in SQLite, the latest not yet
    assert journal.commits == 120  # one append per write, whatever went to SQLite
    for i in range(60):
        entry = await journal.lookup(key(i))
        assert entry is not None and entry.answer == chat(i)
    await journal.close()


def kept(pending: dict[bytes, tails.Pending]) -> dict[bytes, tuple[Any, ...]]:
    """What the hand-over writes of each key: its answer's offset, its starts, and (unless the
    key was only settled) the topic and time a new row gets."""
    return {
        k: (p.answer_at, p.attempts, p.reply_topic, p.created if p.reply_topic else None)
        for k, p in pending.items()
    }


async def test_what_the_journal_keeps_of_its_tail_is_what_the_file_says(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The hand-over writes the journal's own account of a tail file (not a second read of it):
    after any mix of starts, answers and settles, that account equals a replay of the file, and
    SQLite ends up with what a replay after a crash would have given it."""
    monkeypatch.setattr(tails, "LIMIT", 2048)
    rng = random.Random(27)
    path = tmp_path / "kept" / "journal.sqlite3"
    path.parent.mkdir()
    journal = open_journal(path)
    for step in range(400):
        i = rng.randrange(12)
        action = rng.choice(("start", "answer", "settle"))
        if action == "start":
            await journal.begin_attempt(key(i), f"r/{i}")
        elif action == "answer":
            assert await journal.record_answer(key(i), f"r/{i}", chat(step))
        else:
            await journal.settle_attempt(key(i))
        kept_now = (journal.tail, journal._pending), (journal._sealed, journal._sealed_pending)  # noqa: SLF001
        for tail, pending in kept_now:
            if tail is not None:
                assert kept(pending) == kept(tails.replay(tail.read())), step
    journal._reap(wait=True)  # noqa: SLF001
    files = sorted(path.parent.glob("journal.sqlite3-tail0.*"), key=lambda f: int(f.suffix[1:]))
    copy = tmp_path / "replayed" / "journal.sqlite3"
    copy.parent.mkdir()
    for suffix in ("", "-wal"):  # what SQLite has committed so far
        shutil.copyfile(f"{path}{suffix}", f"{copy}{suffix}")
    for n, file in enumerate(files):  # as a process that died would leave them
        shutil.copyfile(file, copy.parent / f"journal.sqlite3-tail0.{n}")
    await journal.close()
    replayed = open_journal(copy)
    await replayed.close()
    assert in_sqlite(path) == in_sqlite(copy)
    assert len(in_sqlite(path)) == 12


async def test_a_commit_taking_in_old_tail_records_is_fsynced_before_they_are_removed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A direct commit removes the tail files it took in: with records older than a power cut
    may lose anyway, it is fsynced first, however seldom such writes come."""
    fsynced: list[bool] = []
    begin = SqliteStore.begin

    def spy(store: SqliteStore, durable: bool = False) -> None:
        fsynced.append(durable)
        begin(store, durable)

    monkeypatch.setattr(SqliteStore, "begin", spy)
    path = tmp_path / "journal.sqlite3"
    journal = open_journal(path)
    clock = [1_800_000_000.0]
    journal.store._clock = lambda: clock[0]  # noqa: SLF001
    job = {"operation": "createVideo", "id": "video_1", "status": "queued"}
    assert await journal.begin_attempt(key(1), "r/1") == 1  # the tail's first record
    clock[0] += sqlite_journal._UNSYNCED_SECONDS - 1  # noqa: SLF001
    assert await journal.record_job(key(2), "r/2", job)
    assert fsynced == [False]  # young records: as any commit with synchronous = "normal"
    assert await journal.begin_attempt(key(3), "r/3") == 1  # a new tail file
    clock[0] += sqlite_journal._UNSYNCED_SECONDS + 1  # noqa: SLF001
    assert await journal.record_job(key(4), "r/4", job)
    assert fsynced == [False, True]
    assert await journal.record_job(key(5), "r/5", job)  # no tail records left to take in
    assert fsynced == [False, True, False]
    assert set(in_sqlite(path)) == {key(1), key(2), key(3), key(4), key(5)}
    await journal.close()


async def test_an_unexpected_error_fails_its_batch_and_the_journal_goes_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A bug in one batch (not a disk error) must not end the journal's thread: every later
    request would wait for it forever."""
    put_job = SqliteStore.put_job

    def broken(store: SqliteStore, *args: Any, **kwargs: Any) -> None:
        monkeypatch.setattr(SqliteStore, "put_job", put_job)  # once
        raise RuntimeError("a bug")

    monkeypatch.setattr(SqliteStore, "put_job", broken)
    path = tmp_path / "journal.sqlite3"
    journal = open_journal(path)
    job = {"operation": "createVideo", "id": "video_1", "status": "queued"}
    assert await journal.record_answer(key(1), "r", chat(1))
    assert not await journal.record_job(key(2), "r", job)  # failed, and said so
    assert await journal.record_job(key(3), "r", job)
    assert await journal.record_answer(key(4), "r", chat(4))
    for n in (1, 3):
        assert await journal.lookup(key(n)) is not None
    assert await journal.lookup(key(2)) is None
    assert "journal error; these requests go without it" in journal.log.events("error")  # type: ignore[attr-defined]
    await journal.close()
    assert set(in_sqlite(path)) == {key(1), key(3), key(4)}


async def test_a_large_answer_is_committed_at_once_after_the_tail(tmp_path: Path) -> None:
    path = tmp_path / "journal.sqlite3"
    journal = open_journal(path)
    assert await journal.record_answer(key(1), "r", chat(1))
    big = os.urandom(tails.MAX_ANSWER + 1)  # zlib cannot shrink it below the limit
    assert await journal.record_answer(key(2), "r", big)
    rows = in_sqlite(path)
    assert set(rows) == {key(1), key(2)}  # the tail went first, in order
    assert rows[key(2)][0] == big
    assert tail_files(tmp_path) == ["journal.sqlite3-tail0"]  # the slot, no records
    await journal.close()


async def test_a_job_is_committed_at_once_and_keeps_the_tail_answer(tmp_path: Path) -> None:
    path = tmp_path / "journal.sqlite3"
    journal = open_journal(path)
    job = {"operation": "createVideo", "id": "video_1", "status": "queued"}
    assert await journal.record_job(key(1), "r", job)
    assert key(1) in in_sqlite(path)
    assert await journal.record_answer(key(1), "r", b"final")
    entry = await journal.lookup(key(1))  # the job from SQLite, the answer from the tail
    assert entry is not None and entry.job == job and entry.answer == b"final"
    await journal.close()


# Writes to a journal in argv[1] as the bridge would, then is killed (SIGKILL) by itself.
_WRITE_AND_DIE = """
import asyncio, os, signal, sys
from pathlib import Path
from bridge.journal.sqlite import Journal, SqliteStore
from bridge.pipeline.dedup import request_key

class Log:
    def __getattr__(self, level):
        return lambda event, **fields: None

def key(i):
    return request_key("openai/request/createChatCompletion", f'{{"n": {i}}}'.encode())

async def main():
    journal = Journal.open(Path(sys.argv[1]), log=Log(), scope="answers", max_bytes=1 << 20,
        max_age=3600.0, max_answer_bytes=65536, synchronous="normal")
    assert await journal.begin_attempt(key(1), "r") == 1
    assert await journal.record_answer(key(1), "r", b'{"answer": 1}')
    await journal.settle_attempt(key(1))  # delivered: written with the next write only
    assert await journal.begin_attempt(key(2), "r") == 1
    assert await journal.record_answer(key(2), "r", b'{"answer": 2}')  # not delivered yet
    assert await journal.begin_attempt(key(3), "r") == 1  # in flight: its call was open
    assert await journal.begin_attempt(key(4), "r") == 1
    assert await journal.begin_attempt(key(4), "r") == 2
    print("written", flush=True)
    os.kill(os.getpid(), signal.SIGKILL)

asyncio.run(main())
"""


def write_and_die(path: Path) -> None:
    """Run _WRITE_AND_DIE on the journal at `path` in a child process."""
    done = subprocess.run(
        [sys.executable, "-c", _WRITE_AND_DIE, str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        check=False,
    )
    assert done.returncode == -signal.SIGKILL and done.stdout == "written\n", done.stderr


async def test_the_tail_survives_kill_9_and_is_replayed_into_sqlite(tmp_path: Path) -> None:
    path = tmp_path / "journal.sqlite3"
    write_and_die(path)
    assert in_sqlite(path) == {}  # everything was in the tail file when it died
    journal = open_journal(path)  # the next start hands the dead one's tail to SQLite
    rows = in_sqlite(path)
    assert set(rows) == {key(1), key(2), key(3), key(4)}
    # Delivered: the answer is kept (a redelivery gets it again, as QoS 1 allows), no start
    # counts. Answered but not delivered: the answer, its start still open as before the tail.
    for i, answer in ((1, b'{"answer": 1}'), (2, b'{"answer": 2}')):
        entry = await journal.lookup(key(i))
        assert entry is not None and entry.answer == answer
    assert rows[key(1)][1] == 0  # its delivered mark went with the next write
    assert rows[key(2)][1] == 1  # no mark: the start stays open, the redelivery is answered
    entry = await journal.lookup(key(3))
    assert entry is None or entry.answer is None
    assert await journal.begin_attempt(key(3), "r") == 2  # the call open at the kill counts
    assert await journal.begin_attempt(key(4), "r") == 3  # poison counting goes on
    await journal.close()


# Writes an answer for key 1 to the tail of a journal in argv[1], then dies (SIGKILL) right after
# a commit that took that tail in, before its file is removed: argv[2] "write" after a job for
# key 1 went to SQLite with it, "hand-over" after the hand-over of a full tail file, once the next
# file holds an answer for the key printed.
_DIE_AFTER_THE_COMMIT = """
import asyncio, os, signal, sys, threading
from pathlib import Path
from bridge.journal import tail as tails
from bridge.journal.sqlite import Journal, SqliteStore
from bridge.pipeline.dedup import request_key

class Log:
    def __getattr__(self, level):
        return lambda event, **fields: None

def key(i):
    return request_key("openai/request/createChatCompletion", f'{{"n": {i}}}'.encode())

def die(*args):
    os.kill(os.getpid(), signal.SIGKILL)

appended = threading.Event()
hand_over = Journal._hand_over

def hand_over_and_die(journal, *args):
    hand_over(journal, *args)
    assert journal._handed and appended.wait(30)
    die()

async def main():
    tails.LIMIT = 4096
    journal = Journal.open(Path(sys.argv[1]), log=Log(), scope="answers", max_bytes=1 << 20,
        max_age=3600.0, max_answer_bytes=65536, synchronous="normal")
    assert await journal.record_answer(key(1), "r", b'{"answer": "stale"}')
    if sys.argv[2] == "write":
        Journal._drop_tails = die
        print("written", flush=True)
        await journal.record_job(key(1), "r", {"operation": "createVideo", "id": "video_1"})
    else:
        Journal._hand_over = hand_over_and_die
        n = 1
        while journal._handover is None:
            n += 1
            assert await journal.record_answer(key(n), "r", b'{"answer": %d}' % n)
        n += 1
        assert await journal.record_answer(key(n), "r", b'{"answer": %d}' % n)  # the next file
        print(n, flush=True)
        appended.set()
        journal._handover.join(30)
    raise SystemExit("not killed")

asyncio.run(main())
"""


def die_after_the_commit(path: Path, mode: str) -> str:
    """Run _DIE_AFTER_THE_COMMIT on the journal at `path` in a child process; what it printed."""
    done = subprocess.run(
        [sys.executable, "-c", _DIE_AFTER_THE_COMMIT, str(path), mode],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        check=False,
    )
    assert done.returncode == -signal.SIGKILL, done.stderr
    return done.stdout


JOB = {"operation": "createVideo", "id": "video_1"}


async def test_a_tail_taken_in_by_a_commit_is_not_replayed_after_a_crash_before_its_removal(
    tmp_path: Path,
) -> None:
    """The answer in the tail went to SQLite with the job, which replaced it; killed before the
    tail file was removed, neither a bridge sharing the file nor the next start puts that answer
    back over the job."""
    path = tmp_path / "journal.sqlite3"
    peer = open_journal(path)  # slot 0: the child takes slot 1
    assert die_after_the_commit(path, "write") == "written\n"
    assert tail_files(tmp_path) == [
        "journal.sqlite3-tail0",
        "journal.sqlite3-tail1",
        "journal.sqlite3-tail1.0",
    ]
    assert in_sqlite(path)[key(1)] == (None, 0)  # the commit: the job, its answer replaced
    entry = await peer.lookup(key(1))  # the dead one's file is read as a peer's
    assert entry is not None and entry.job == JOB and entry.answer is None
    await peer.close()
    journal = open_journal(path)
    entry = await journal.lookup(key(1))
    assert entry is not None and entry.job == JOB and entry.answer is None
    assert tail_files(tmp_path) == ["journal.sqlite3-tail0"]  # the file is gone all the same
    await journal.close()


async def test_a_handed_over_tail_is_not_replayed_over_later_writes_after_a_crash(
    tmp_path: Path,
) -> None:
    """Killed after the hand-over's commit, before the file handed over was removed: the next
    start skips that file, so what another bridge wrote since stays, and replays the next file,
    which SQLite did not have."""
    path = tmp_path / "journal.sqlite3"
    last = int(die_after_the_commit(path, "hand-over"))
    assert tail_files(tmp_path) == [
        "journal.sqlite3-tail0",
        "journal.sqlite3-tail0.0",
        "journal.sqlite3-tail0.1",
    ]
    rows = in_sqlite(path)
    assert rows[key(1)][0] is not None and key(last) not in rows
    other = SqliteStore(path, max_bytes=1 << 20, max_age=3600.0)  # another bridge on the file
    other.begin()
    other.put_job(key(1), "r", JOB)  # a job started anew for the key replaces its answer
    other.commit()
    other.close()
    journal = open_journal(path)
    entry = await journal.lookup(key(1))
    assert entry is not None and entry.job == JOB and entry.answer is None
    for n in (2, last - 1, last):  # handed over, and in the file that was not
        entry = await journal.lookup(key(n))
        assert entry is not None and entry.answer == b'{"answer": %d}' % n, n
    assert key(last) in in_sqlite(path)
    assert tail_files(tmp_path) == ["journal.sqlite3-tail0"]
    await journal.close()


def absorbed(path: Path) -> dict[str, tuple[int, int]]:
    """The `tails` table: the tail files recorded as in SQLite."""
    with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as db:
        return {row[0]: (row[1], row[2]) for row in db.execute("SELECT * FROM tails")}


async def test_a_file_of_a_name_taken_in_before_is_replayed_and_gone_files_are_forgotten(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A data file taken in is known by its name, head and size: one made anew under a name
    recorded (by a bridge that does not record them) is replayed, however small; the records of
    files removed are dropped as the slot goes on, and at the next start."""
    monkeypatch.setattr(tails, "LIMIT", 2048)
    path = tmp_path / "journal.sqlite3"
    journal = open_journal(path)
    for i in range(100):
        assert await journal.begin_attempt(key(i), "r") == 1
        journal._reap(wait=True)  # noqa: SLF001 - the hand-over's file is removed
        assert len(absorbed(path)) <= 1  # the slot's last file only
    await journal.close()
    (label,) = absorbed(path)  # the slot's last file, taken in at close and removed
    file = tmp_path / f"journal.sqlite3-{label}"
    assert not file.exists()
    record = tails.start_record(key(100), "r", 1e9, 1)
    assert len(record) < absorbed(path)[label][0]
    file.write_bytes(record)  # left by a bridge that records nothing, under the same name
    journal = open_journal(path, max_age=1e10)
    assert absorbed(path) == {label: (len(record), tails.head_of(record))}  # replayed
    assert await journal.begin_attempt(key(100), "r") == 2
    await journal.close()
    journal = open_journal(path)
    assert absorbed(path) == {}
    await journal.close()


async def test_a_torn_record_at_the_end_is_dropped(tmp_path: Path) -> None:
    path = tmp_path / "journal.sqlite3"
    first = tails.answer_record(key(1), "r", 1e9, b"one", 0, None)
    second = tails.answer_record(key(2), "r", 1e9, b"two", 0, None)
    tail = tmp_path / "journal.sqlite3-tail0.0"  # a dead process's slot 0, its first file
    tail.write_bytes(first + second[:-1])  # a power cut in the middle of the second
    journal = open_journal(path, max_age=1e10)
    entry = await journal.lookup(key(1))
    assert entry is not None and entry.answer == b"one"
    assert await journal.lookup(key(2)) is None
    flipped = bytearray(first)
    flipped[-1] ^= 1
    assert list(tails.records(bytes(flipped))) == []  # a wrong CRC ends the file
    await journal.close()


async def test_two_bridges_on_one_file_see_each_others_tail(tmp_path: Path) -> None:
    path = tmp_path / "journal.sqlite3"
    one, two = open_journal(path), open_journal(path)
    assert one.slot is not None and two.slot is not None and one.slot.n != two.slot.n
    assert await one.record_answer(key(1), "r", chat(1))
    entry = await two.lookup(key(1))  # in one's tail file, not yet in SQLite
    assert entry is not None and entry.answer == chat(1)
    await one.close()
    await two.close()


def counting_peer_reads(monkeypatch: pytest.MonkeyPatch) -> list[bytes]:
    """The keys the journal reads other processes' tail files for, from now on."""
    asked: list[bytes] = []
    read = tails.peer_starts

    def counted(journal: Path, slot: int, key: bytes, *args: Any) -> int:
        asked.append(key)
        return read(journal, slot, key, *args)

    monkeypatch.setattr(tails, "peer_starts", counted)
    return asked


async def test_a_redelivery_counts_the_starts_in_a_running_peers_tail(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "journal.sqlite3"
    one, two = open_journal(path), open_journal(path)
    assert await one.begin_attempt(key(1), "r") == 1
    assert await one.begin_attempt(key(1), "r") == 2  # in one's tail file, not yet in SQLite
    asked = counting_peer_reads(monkeypatch)
    assert await two.begin_attempt(key(2), "r") == 1
    assert await two.begin_attempt(key(1), "r") == 1  # a first delivery: its own count only
    assert asked == []  # and no peer's file read for it
    assert await two.begin_attempt(key(1), "r", redelivered=True) == 3
    assert asked == [key(1)]
    await one.close()
    await two.close()


async def test_a_redelivery_counts_the_starts_of_a_peer_that_died_in_its_call(
    tmp_path: Path,
) -> None:
    path = tmp_path / "journal.sqlite3"
    two = open_journal(path)  # running before the other one starts: it replays nothing
    write_and_die(path)  # key 4 started twice, its slot's file left behind
    assert in_sqlite(path) == {}
    assert await two.begin_attempt(key(4), "r", redelivered=True) == 3
    assert await two.begin_attempt(key(1), "r", redelivered=True) == 1  # settled there
    await two.close()
    assert in_sqlite(path)[key(4)][1] == 3


async def test_a_redelivery_ignores_a_peers_file_that_sqlite_took_in(tmp_path: Path) -> None:
    path = tmp_path / "journal.sqlite3"
    two = open_journal(path)
    record = tails.start_record(key(1), "r", 1e9, 5)
    (tmp_path / "journal.sqlite3-tail1.0").write_bytes(record)  # its process died before removal
    head = tails.head_of(record)
    assert head is not None
    other = SqliteStore(path, max_bytes=1 << 20, max_age=3600.0)
    other.begin()
    other.add_tails([("tail1.0", len(record), head)])  # with its count since
    other.commit()
    other.close()
    assert await two.begin_attempt(key(1), "r", redelivered=True) == 1  # SQLite's, not the file's
    await two.close()


async def test_a_redelivery_to_a_full_journal_counts_a_peers_tail(tmp_path: Path) -> None:
    path = tmp_path / "journal.sqlite3"
    one, two = open_journal(path), open_journal(path, synchronous="full")
    assert await one.begin_attempt(key(1), "r") == 1
    assert await one.begin_attempt(key(1), "r") == 2
    assert await two.begin_attempt(key(1), "r", redelivered=True) == 3
    assert await two.begin_attempt(key(1), "r", redelivered=True) == 4  # SQLite's count goes on
    await one.close()
    await two.close()


async def test_a_request_redelivered_from_a_peer_that_died_twice_is_refused(
    tmp_path: Path,
) -> None:
    topic = "home/openai/request/createModeration/door"
    payload = b'{"input": "answer at great length", "transaction": 7}'
    path = tmp_path / "journal.sqlite3"
    one, two = open_journal(path), open_journal(path)
    for count in (1, 2):  # two calls of one bridge that died in them (its file not yet in SQLite)
        assert await one.begin_attempt(request_key(topic, payload), "r") == count
    config = BridgeConfig.model_validate(
        {"service": {"api_base": "http://upstream.invalid/v1", "api_key": "sk-test-x"}}
    )
    transport, clock = FakeTransport([http_answer(200, b'{"results": []}')]), Clock()
    publisher = FakePublisher()
    bridge = Dispatcher(
        config=config,
        table=default_table(),
        service=ServiceClient(config.service, transport=transport, sleep=clock.sleep, clock=clock),
        publisher=publisher,
        topics=Topics("home/openai", "test"),
        log=FakeLog().bound,
        journal=two,
        owner="bridge-two",
    )
    bridge.online()
    bridge.submit(message(topic, payload, mid=1, dup=True))
    await asyncio.wait_for(bridge.idle.wait(), 5)
    assert transport.sent == []  # not called a third time
    assert publisher.acked == [1]
    (reply_topic, reply, _), *_ = publisher.published
    assert reply_topic == "home/openai/response/createModeration/door"
    assert json.loads(reply)["error"]["code"] == "poison_request"
    await bridge.cancel_all()
    await one.close()
    await two.close()


async def test_replaying_several_dead_processes_tails_keeps_the_largest_count(
    tmp_path: Path,
) -> None:
    path = tmp_path / "journal.sqlite3"
    start, settle = tails.start_record, tails.settle_record
    files = {  # slot 0 is replayed first, slot 1 last
        "tail0.0": start(key(1), "r", 1e9, 3)
        + start(key(2), "r", 1e9, 2)
        + settle(key(2))
        + start(key(3), "r", 1e9, 2)
        + start(key(4), "r", 1e9, 4),
        "tail0.1": settle(key(4)),  # the same process, later: settled
        "tail1.0": start(key(1), "r", 1e9, 1)
        + start(key(3), "r", 1e9, 3)
        + settle(key(3))
        + start(key(4), "r", 1e9, 1)
        + start(key(5), "r", 1e9, 1)
        + settle(key(5))
        + start(key(5), "r", 1e9, 1),
    }
    for name, data in files.items():
        (tmp_path / f"journal.sqlite3-{name}").write_bytes(data)
    journal = open_journal(path, max_age=1e10)
    rows = in_sqlite(path)
    starts = {i: rows[key(i)][1] if key(i) in rows else 0 for i in range(1, 6)}
    assert starts == {1: 3, 2: 0, 3: 2, 4: 1, 5: 1}
    await journal.close()


def test_aged_out_answers_are_not_zeroed_page_by_page(tmp_path: Path) -> None:
    # Debian builds SQLite with SECURE_DELETE: every freed page was written twice more.
    journal = open_journal(tmp_path / "journal.sqlite3")
    db = journal.store._db  # noqa: SLF001 - the store's own connection
    assert db.execute("PRAGMA secure_delete").fetchone()[0] == 2  # FAST
    asyncio.run(journal.close())


async def test_a_journal_name_with_glob_characters_finds_its_tail(tmp_path: Path) -> None:
    path = tmp_path / "journal-[a]*.sqlite3"
    dead = tmp_path / "journal-[a]*.sqlite3-tail0.0"  # a dead process's start of key 1
    dead.write_bytes(tails.start_record(key(1), "r", 1e9, 1))
    journal = open_journal(path, max_age=1e10)
    assert await journal.begin_attempt(key(1), "r") == 2  # found and replayed, not overwritten
    await journal.close()


def test_checkpoints_are_16_mib_of_wal_apart_at_most_a_quarter_of_max_bytes(
    tmp_path: Path,
) -> None:
    for max_bytes, pages in ((64 << 20, (16 << 20) // 512), (256 << 10, (64 << 10) // 512)):
        journal = open_journal(tmp_path / f"{max_bytes}.sqlite3", max_bytes=max_bytes)
        db = journal.store._db  # noqa: SLF001 - the store's own connection
        assert db.execute("PRAGMA wal_autocheckpoint").fetchone()[0] == pages
        asyncio.run(journal.close())
