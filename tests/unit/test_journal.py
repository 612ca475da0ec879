"""The on-disk journal on its own: durability, bounds, and every way it can be unusable."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import sqlite3
import subprocess
import sys
import zlib
from pathlib import Path
from typing import Any

import pytest
from support.fakes import RecordingLog

from bridge.config import default_journal_path as default_path
from bridge.journal.sqlite import Journal, SqliteStore
from bridge.pipeline.dedup import request_key
from bridge.pipeline.model import JournalEntry


def open_journal(path: Path, log: RecordingLog, **overrides: Any) -> Journal | None:
    options: dict[str, Any] = {
        "scope": "answers",
        "max_bytes": 1 << 20,
        "max_age": 3600.0,
        "max_answer_bytes": 64 * 1024,
        "synchronous": "full",
        **overrides,
    }
    return Journal.open(path, log=log, **options)


def key(i: int) -> bytes:
    return request_key("openai/request/createModeration", f'{{"input": {i}}}'.encode())


async def test_answer_survives_close_and_reopen(tmp_path: Path) -> None:
    path, log = tmp_path / "state" / "journal.sqlite3", RecordingLog()
    journal = open_journal(path, log)
    assert journal is not None
    assert await journal.lookup(key(1)) is None
    assert await journal.record_answer(key(1), "openai/response/x", b'{"status":"ok"}')
    await journal.close()
    assert await journal.lookup(key(1)) is None  # closed: behaves as if there were none

    again = open_journal(path, log)
    assert again is not None
    entry = await again.lookup(key(1))
    assert isinstance(entry, JournalEntry)
    assert (entry.reply_topic, entry.answer, entry.job) == (
        "openai/response/x",
        b'{"status":"ok"}',
        None,
    )
    assert await again.lookup(key(2)) is None
    await again.close()
    assert "journal open" in log.events("info")


async def test_job_then_answer_share_one_entry(tmp_path: Path) -> None:
    journal = open_journal(tmp_path / "j.sqlite3", RecordingLog())
    assert journal is not None
    job = {"operation": "createVideo", "id": "video_1", "status": "queued"}
    assert await journal.record_job(key(1), "t", job)
    entry = await journal.lookup(key(1))
    assert entry is not None and entry.job == job and entry.answer is None
    assert await journal.record_answer(key(1), "t", b"final")
    entry = await journal.lookup(key(1))
    assert entry is not None and entry.job == job and entry.answer == b"final"
    await journal.close()


async def test_concurrent_writes_are_committed_together(tmp_path: Path) -> None:
    journal = open_journal(tmp_path / "j.sqlite3", RecordingLog())
    assert journal is not None
    results = await asyncio.gather(*(journal.record_answer(key(i), "t", b"x") for i in range(200)))
    assert all(results)
    assert journal.commits < 200  # group commit: writes queued meanwhile share one transaction
    stats = await journal.stats()
    assert stats is not None and stats.answers == 200
    await journal.close()


async def test_reads_and_writes_queued_together_each_get_their_own_result(tmp_path: Path) -> None:
    journal = open_journal(tmp_path / "j.sqlite3", RecordingLog())
    assert journal is not None
    assert all(
        await asyncio.gather(*(journal.record_answer(key(i), "t", b"%d" % i) for i in range(50)))
    )
    writes = [journal.record_answer(key(i), "t", b"%d" % i) for i in range(50, 100)]
    reads = [journal.lookup(key(i)) for i in range(50)]
    results: list[Any] = await asyncio.gather(*writes, *reads)  # queued in the same batches
    written, entries = results[:50], results[50:]
    assert written == [True] * 50
    assert [e.answer if e is not None else None for e in entries] == [b"%d" % i for i in range(50)]
    await journal.close()


def test_used_bytes_counts_the_pages_that_hold_data(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "j.sqlite3", max_bytes=1 << 30, max_age=3600.0)
    store.begin()
    for i in range(300):
        store.put_answer(key(i), "t", b"x" * 1000)
    store.commit()
    store.begin()
    store._db.execute("DELETE FROM entries WHERE rowid % 2 = 0")  # noqa: SLF001  (frees pages)
    store.commit()
    with sqlite3.connect(tmp_path / "j.sqlite3") as db:
        pages, free, size = (
            db.execute(f"PRAGMA {name}").fetchone()[0]
            for name in ("page_count", "freelist_count", "page_size")
        )
    assert free > 0 and store.used_bytes() == (pages - free) * size
    store.close()


async def test_large_answers_are_not_journaled(tmp_path: Path) -> None:
    journal = open_journal(tmp_path / "j.sqlite3", RecordingLog(), max_answer_bytes=1000)
    assert journal is not None
    assert not await journal.record_answer(key(1), "t", b"x" * 1001)
    assert await journal.record_answer(key(2), "t", b"x" * 1000)
    assert await journal.lookup(key(1)) is None
    assert await journal.lookup(key(2)) is not None
    await journal.close()


def test_entries_expire_after_max_age(tmp_path: Path) -> None:
    now = [1_000_000.0]
    store = SqliteStore(tmp_path / "j.sqlite3", max_bytes=1 << 20, max_age=60, clock=lambda: now[0])
    store.begin()
    store.put_answer(key(1), "t", b"a")
    store.commit()
    now[0] += 30
    assert store.get(key(1)) is not None
    now[0] += 31
    assert store.get(key(1)) is None  # too old to answer a redelivery
    assert store.prune(force=True) == 1
    assert store.stats().entries == 0
    store.close()


def test_size_bound_drops_the_oldest(tmp_path: Path) -> None:
    now = [1_000_000.0]
    path = tmp_path / "j.sqlite3"
    store = SqliteStore(path, max_bytes=256 * 1024, max_age=3600, clock=lambda: now[0])
    for i in range(400):  # 400 x 4 KiB = 1.6 MiB through a 256 KiB journal
        now[0] += 1
        store.begin()
        store.put_answer(key(i), "t", os.urandom(4096))
        store.commit()
        assert store.used_bytes() <= 256 * 1024
    assert store.get(key(399)) is not None  # the newest stay
    assert store.get(key(0)) is None  # the oldest went
    assert store.pruned > 300
    store.close()
    # Freed pages are reused: the file does not grow with the traffic.
    assert path.stat().st_size <= 2 * 256 * 1024


async def test_full_journal_answers_without_it_and_says_why(tmp_path: Path) -> None:
    log = RecordingLog()
    journal = open_journal(tmp_path / "j.sqlite3", log)
    assert journal is not None
    assert await journal.record_answer(key(0), "t", b"small")
    # SQLite's own cap stands in for a full disk: every page is in use. The cap is a setting of
    # the one connection, which only the store holds.
    db = journal.store._db  # noqa: SLF001 - the connection the worker thread writes through
    pages = db.execute("PRAGMA page_count").fetchone()[0]
    db.execute(f"PRAGMA max_page_count = {pages}")
    assert not await journal.record_answer(key(1), "t", os.urandom(32 * 1024))
    assert journal.failed_writes == 1
    error = [f for lvl, e, f in log.lines if e.startswith("journal write failed")]
    assert error and error[0]["reason"] == "the disk or the journal is full"
    assert await journal.lookup(key(0)) is not None  # what was there stays readable
    await journal.close()


def test_corrupt_file_is_reported_and_skipped(tmp_path: Path) -> None:
    path = tmp_path / "j.sqlite3"
    path.write_bytes(b"this is not a database" * 500)
    log = RecordingLog()
    assert open_journal(path, log) is None
    (level, event, fields) = log.lines[-1]
    assert level == "error" and event == "journal unavailable; running without it"
    assert "move it away" in fields["reason"] and str(path) in fields["reason"]
    assert path.read_bytes().startswith(b"this is not a database")  # left for inspection


def test_a_foreign_database_is_not_taken_over(tmp_path: Path) -> None:
    path = tmp_path / "j.sqlite3"
    with sqlite3.connect(path) as other:
        other.execute("CREATE TABLE photos (id INTEGER)")
    other.close()
    log = RecordingLog()
    assert open_journal(path, log) is None
    assert "not a bridge journal" in log.lines[-1][2]["reason"]


# Opens a journal in the state directory argv[1] and prints what the bridge would say.
_OPEN_IN_CHILD = """
import sys
import zlib
from pathlib import Path
from bridge.journal.sqlite import Journal
reasons = []
class Log:
    def __getattr__(self, level):
        return lambda event, **fields: reasons.append(fields.get("reason"))
journal = Journal.open(Path(sys.argv[1]) / "j.sqlite3", log=Log(), scope="answers",
    max_bytes=1 << 20, max_age=3600.0, max_answer_bytes=65536, synchronous="full")
print(journal is None, reasons[-1])
"""


def test_read_only_state_directory_is_reported_and_skipped(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    if os.geteuid() != 0:
        state.chmod(0o500)
        try:
            log = RecordingLog()
            assert open_journal(state / "j.sqlite3", log) is None
            reason = log.lines[-1][2]["reason"]
        finally:
            state.chmod(0o700)
    else:
        # File modes do not stop root; a read-only mount does. It is made in a mount namespace
        # of the child's own, so nothing outside the test sees it.
        script = 'mount --bind "$0" "$0" && mount -o remount,bind,ro "$0" "$0" && exec "$@"'
        child = [sys.executable, "-c", _OPEN_IN_CHILD, str(state)]
        done = subprocess.run(
            ["unshare", "-m", "sh", "-c", script, str(state), *child],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=Path(__file__).resolve().parents[2],
            check=False,
        )
        if "mount" in done.stderr or "unshare" in done.stderr:
            pytest.skip(f"root here cannot make a read-only mount: {done.stderr.strip()[:200]}")
        assert done.returncode == 0, done.stderr
        refused, reason = done.stdout.strip().split(" ", 1)
        assert refused == "True"
    assert "not writable" in reason and str(state) in reason


def test_unwritable_state_directory_is_reported_and_skipped(tmp_path: Path) -> None:
    # A state directory that is a file cannot be created or written by anyone, root included.
    blocker = tmp_path / "state"
    blocker.write_text("a file where the directory should be")
    log = RecordingLog()
    assert open_journal(blocker / "j.sqlite3", log) is None
    assert "cannot create the state directory" in log.lines[-1][2]["reason"]


def test_scope_off_opens_nothing(tmp_path: Path) -> None:
    log = RecordingLog()
    assert open_journal(tmp_path / "j.sqlite3", log, scope="off") is None
    assert not (tmp_path / "j.sqlite3").exists()
    assert log.events("info") == ["journal off"]


def test_default_path_follows_systemd_then_xdg_one_per_config() -> None:
    assert default_path({"STATE_DIRECTORY": "/var/lib/omb"}) == Path("/var/lib/omb/journal.sqlite3")
    assert default_path({"STATE_DIRECTORY": "/a:/b"}) == Path("/a/journal.sqlite3")
    xdg = {"XDG_STATE_HOME": "/x"}
    one = default_path(xdg, "/home/pi/clone-1/config/bridge.toml")
    assert one.parent == Path("/x/openai-mqtt-bridge")
    assert re.fullmatch(r"journal-bridge-[0-9a-f]{8}\.sqlite3", one.name)
    # Two clones (or two config files) never share a journal; one config keeps its own.
    assert default_path(xdg, "/home/pi/clone-2/config/bridge.toml") != one
    assert default_path(xdg, "/home/pi/clone-1/config/bridge.toml") == one
    home = default_path({"HOME": "/home/pi"}, "/etc/openai-mqtt-bridge/bridge.toml")
    assert home.parent == Path("/home/pi/.local/state/openai-mqtt-bridge")
    assert default_path(xdg).name.startswith("journal-defaults-")


def test_size_bound_keeps_jobs_still_being_waited_on(tmp_path: Path) -> None:
    now = [1_000_000.0]
    store = SqliteStore(
        tmp_path / "j.sqlite3", max_bytes=128 * 1024, max_age=3600, clock=lambda: now[0]
    )
    store.begin()
    store.put_job(key(-1), "t", {"operation": "createVideo", "id": "video_1"})
    store.commit()
    for i in range(200):
        now[0] += 1
        store.begin()
        store.put_answer(key(i), "t", os.urandom(4096))
        store.commit()
    entry = store.get(key(-1))
    assert entry is not None and entry.job == {"operation": "createVideo", "id": "video_1"}
    assert store.get(key(0)) is None
    store.close()


async def test_content_type_of_a_plain_or_raw_reply_is_kept(tmp_path: Path) -> None:
    journal = open_journal(tmp_path / "j.sqlite3", RecordingLog())
    assert journal is not None
    assert await journal.record_answer(key(1), "t", b"hello", "text/plain; charset=utf-8")
    entry = await journal.lookup(key(1))
    assert entry is not None and entry.content_type == "text/plain; charset=utf-8"
    await journal.close()


async def test_keys_of_the_dedup_window_are_known_at_start(tmp_path: Path) -> None:
    path = tmp_path / "j.sqlite3"
    now = [1_000_000.0]
    store = SqliteStore(path, max_bytes=1 << 20, max_age=3600, clock=lambda: now[0])
    for i in range(3):  # answered at 1_000_000, 1_000_001, 1_000_002
        store.begin()
        store.put_answer(key(i), "t", b"a")
        store.commit()
        now[0] += 1
    assert store.recent_keys(now[0] - 2) == {key(1), key(2)}
    assert store.recent_keys(now[0] + 1) == frozenset()
    store.close()
    journal = open_journal(path, RecordingLog(), recent_seconds=3600 * 24 * 365 * 60)
    assert journal is not None and journal.recent == frozenset({key(0), key(1), key(2)})
    await journal.close()


def test_answers_are_stored_packed_in_small_pages_and_read_back_whole(tmp_path: Path) -> None:
    path = tmp_path / "journal.sqlite3"
    store = SqliteStore(path, max_bytes=1 << 20, max_age=3600.0)
    chat = b'{"choices": [{"message": {"content": "' + b"the light is on. " * 60 + b'"}}]}'
    tiny = b"{}"
    store.begin()
    store.put_answer(key(1), "openai/response/x", chat)
    store.put_answer(key(2), "openai/response/y", tiny)  # packing would grow it: kept as is
    store.commit()
    with contextlib.closing(sqlite3.connect(path)) as db:
        stored = dict(db.execute("SELECT key, length(answer) FROM entries").fetchall())
        assert db.execute("PRAGMA page_size").fetchone()[0] == 512
    assert stored[key(1)] < len(chat) // 2
    assert stored[key(2)] == len(tiny)
    assert [store.get(key(i)).answer for i in (1, 2)] == [chat, tiny]  # type: ignore[union-attr]
    store.close()


def test_a_version_1_journal_is_upgraded_and_its_answers_still_read(tmp_path: Path) -> None:
    path = tmp_path / "journal.sqlite3"
    old = sqlite3.connect(path, isolation_level=None)
    old.executescript(
        "PRAGMA page_size = 4096; PRAGMA journal_mode = WAL;"
        "CREATE TABLE entries (id INTEGER PRIMARY KEY, key BLOB NOT NULL UNIQUE, created REAL "
        "NOT NULL, reply_topic TEXT NOT NULL, answer BLOB, content_type TEXT, job BLOB);"
        "PRAGMA application_id = 1330463306; PRAGMA user_version = 1;"
    )
    old.execute(
        "INSERT INTO entries (key, created, reply_topic, answer) VALUES (?, ?, ?, ?)",
        (key(1), 1e12, "openai/response/x", b'{"old": true}'),
    )
    old.close()
    store = SqliteStore(path, max_bytes=1 << 20, max_age=1e13)
    assert store.get(key(1)).answer == b'{"old": true}'  # type: ignore[union-attr]
    assert store.absorbed_tails() == {}  # the table of tail files taken in, added
    store.begin()
    store.put_answer(key(2), "openai/response/y", b'{"new": "' + b"n" * 200 + b'"}')
    store.commit()
    assert store.get(key(2)).answer == b'{"new": "' + b"n" * 200 + b'"}'  # type: ignore[union-attr]
    with contextlib.closing(sqlite3.connect(path)) as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] == 3
        assert db.execute("PRAGMA page_size").fetchone()[0] == 4096  # an old file keeps it
    store.begin()
    assert store.put_attempt(key(1), "openai/response/x") == 1  # schema 3's column, added
    store.put_job(key(3), "t", {"operation": "createVideo", "id": "v"}, "me", 1e13)  # waits' too
    store.commit()
    assert [e.key for e in store.claim("me", 2e13)] == [key(3)]
    store.close()


async def test_unfinished_starts_are_counted_durably_and_settled(tmp_path: Path) -> None:
    path, log = tmp_path / "journal.sqlite3", RecordingLog()
    journal = open_journal(path, log)
    assert journal is not None
    assert await journal.begin_attempt(key(1), "r") == 1
    assert await journal.begin_attempt(key(1), "r") == 2
    await journal.close()  # as if the process had died with both starts open

    again = open_journal(path, log)
    assert again is not None
    assert await again.begin_attempt(key(1), "r") == 3
    assert await again.settle_attempt(key(1))
    assert await again.begin_attempt(key(1), "r") == 1
    # An answer recorded afterwards keeps its row; the count stays until settled.
    assert await again.record_answer(key(1), "r", b"{}")
    assert await again.settle_attempt(key(1))
    entry = await again.lookup(key(1))
    assert entry is not None and entry.answer == b"{}"
    await again.close()
    assert await again.begin_attempt(key(2), "r") is None  # closed: not journaled


def test_a_new_journal_packs_answers_with_the_preset_dictionary(tmp_path: Path) -> None:
    chat = (
        b'{"status":"ok","method":"createChatCompletion","transaction":7,"data":{"id":'
        b'"chatcmpl-AXkq9Lz3bT0mWcE2RjYf8hUoNpQs1","object":"chat.completion","created":'
        b'1733400000,"model":"gpt-4o-mini-2024-07-18","choices":[{"index":0,"message":{"role":'
        b'"assistant","content":"The front door is locked and the alarm is armed in away mode.",'
        b'"refusal":null,"annotations":[]},"logprobs":null,"finish_reason":"stop"}],"usage":'
        b'{"prompt_tokens":31,"completion_tokens":14,"total_tokens":45,"prompt_tokens_details":'
        b'{"cached_tokens":0,"audio_tokens":0},"completion_tokens_details":{"reasoning_tokens":0,'
        b'"audio_tokens":0,"accepted_prediction_tokens":0,"rejected_prediction_tokens":0}},'
        b'"service_tier":"default","system_fingerprint":"fp_0ba0d124f1"}}'
    )
    path = tmp_path / "journal.sqlite3"
    store = SqliteStore(path, max_bytes=1 << 20, max_age=3600.0)
    store.begin()
    store.put_answer(key(1), "t", chat)
    store.commit()
    assert store.get(key(1)).answer == chat  # type: ignore[union-attr]
    store.close()
    with contextlib.closing(sqlite3.connect(path)) as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] == 4
        packed, size = db.execute("SELECT packed, length(answer) FROM entries").fetchone()
    assert packed == 2 and size < len(zlib.compress(chat, 1)) * 2 // 3  # plain zlib: a third more
    again = SqliteStore(path, max_bytes=1 << 20, max_age=3600.0)  # read back after a restart
    assert again.get(key(1)).answer == chat  # type: ignore[union-attr]
    again.close()


def test_a_schema_3_journal_keeps_plain_zlib_and_a_newer_one_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "journal.sqlite3"
    store = SqliteStore(path, max_bytes=1 << 20, max_age=3600.0)
    store.close()
    with contextlib.closing(sqlite3.connect(path)) as db:
        db.execute("PRAGMA user_version = 3")  # as the bridge before schema 4 left it
    old = SqliteStore(path, max_bytes=1 << 20, max_age=3600.0)
    old.begin()
    old.put_answer(key(1), "t", b'{"a": "' + b"b" * 300 + b'"}')
    old.commit()
    assert old.get(key(1)).answer == b'{"a": "' + b"b" * 300 + b'"}'  # type: ignore[union-attr]
    old.close()
    with contextlib.closing(sqlite3.connect(path)) as db:
        assert db.execute("SELECT packed FROM entries").fetchone()[0] == 1  # readable by 3
        assert db.execute("PRAGMA user_version").fetchone()[0] == 3
        db.execute("PRAGMA user_version = 5")
    log = RecordingLog()
    assert open_journal(path, log) is None
    assert "written by a newer bridge (schema 5)" in log.lines[-1][2]["reason"]
