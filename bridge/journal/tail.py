"""The journal's tail: its latest writes appended to a plain file, handed to SQLite in batches.

At one request at a time every SQLite commit writes whole pages to the WAL (a start: one or two,
an answer: three or more) and a checkpoint writes them once more, so a 1 KB chat answer cost
about four times its size. Appended here instead, a start costs about 60 bytes and an answer its
packed size; SQLite gets them all in one transaction once the file holds `LIMIT` bytes (and at
close), where many answers share the pages they touch (docs/reliability.md#what-it-costs).

A write() is in the operating system's hands when it returns, so a record survives kill -9 like a
WAL commit with `synchronous = NORMAL`. Every record carries a CRC: a power cut's torn tail is
dropped at the first bad record, never misread. Each process appends to a file of its own, held
with an exclusive `flock`; a file nobody holds was left by a process that died, and the next
journal to open is the one to hand its records to SQLite, unless SQLite recorded that it has
them (the process died after that commit, before removing the file).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import glob
import os
import struct
import zlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

LIMIT = 1 << 20
"""Bytes in a tail file before its records go to SQLite: about 1,900 chat answers of 1 KB."""
MAX_ANSWER = 4096
"""Packed answers larger than this go to SQLite at once: their pages are mostly full anyway."""
_SLOTS = 64
"""Tail slots looked for next to a journal (one per process sharing it)."""

_HEAD = struct.Struct("<IIB")  # CRC-32 of the rest, length of the body, kind
_KEY = struct.Struct("<H")
_START = struct.Struct("<dI")  # created, starts not settled (this one included)
_ANSWER = struct.Struct("<dBHH")  # created, packed, topic length, content type length
START, SETTLE, ANSWER = 1, 2, 3
_NO_TYPE = 0xFFFF


@dataclass(slots=True)
class Pending:
    """What the tail says about one key: its latest answer and its count of unsettled starts."""

    created: float
    reply_topic: str
    answer_at: int | None = None
    """Offset of the key's latest ANSWER record in the tail file, None when it has none."""
    attempts: int | None = None
    """Starts not settled, when the tail has a START or SETTLE for the key."""


@dataclass(frozen=True, slots=True)
class Answer:
    """One ANSWER record, decoded."""

    key: bytes
    created: float
    reply_topic: str
    stored: bytes
    packed: int
    content_type: str | None


def _record(kind: int, key: bytes, body: bytes) -> bytes:
    rest = bytes((kind,)) + _KEY.pack(len(key)) + key + body
    return _HEAD.pack(zlib.crc32(rest), len(rest) - 1, kind) + rest[1:]


def start_record(key: bytes, reply_topic: str, created: float, count: int) -> bytes:
    """A START: `key`'s call starts, `count` starts unsettled with it."""
    return _record(START, key, _START.pack(created, count) + reply_topic.encode())


def settle_record(key: bytes) -> bytes:
    """A SETTLE: `key`'s request was answered, its starts no longer count."""
    return _record(SETTLE, key, b"")


def answer_record(
    key: bytes,
    reply_topic: str,
    created: float,
    stored: bytes,
    packed: int,
    content_type: str | None,
) -> bytes:
    """An ANSWER: the reply `key`'s request got, as the journal stores it."""
    topic = reply_topic.encode()
    ctype = content_type.encode() if content_type is not None else b""
    head = _ANSWER.pack(
        created, packed, len(topic), len(ctype) if content_type is not None else _NO_TYPE
    )
    return _record(ANSWER, key, head + topic + ctype + stored)


def record_at(data: bytes, at: int) -> tuple[int, bytes, bytes, int] | None:
    """(kind, key, body, end) of the record at offset `at` of `data`; None when it is torn."""
    if at + _HEAD.size > len(data):
        return None
    crc, length, kind = _HEAD.unpack_from(data, at)
    end = at + _HEAD.size + length
    if end > len(data) or zlib.crc32(memoryview(data)[at + 8 : end]) != crc:
        return None
    (size,) = _KEY.unpack_from(data, at + _HEAD.size)
    start = at + _HEAD.size + _KEY.size
    return kind, data[start : start + size], data[start + size : end], end


def head_of(data: bytes) -> int | None:
    """What tells a tail file from another of the same name: the CRC of its first record
    (which holds the record's time and key), from the file's first bytes; None when too short."""
    return int.from_bytes(data[:4], "little") if len(data) >= _HEAD.size else None


def records(data: bytes) -> Iterator[tuple[int, int, bytes, bytes]]:
    """(offset, kind, key, body) of each whole record in `data`, up to the first torn one."""
    at = 0
    while (record := record_at(data, at)) is not None:
        kind, key, body, end = record
        yield at, kind, key, body
        at = end


def decode_answer(key: bytes, body: bytes) -> Answer:
    """The ANSWER record `body` of `key`."""
    created, packed, topic_len, type_len = _ANSWER.unpack_from(body)
    at = _ANSWER.size
    topic = body[at : at + topic_len].decode()
    at += topic_len
    ctype = None if type_len == _NO_TYPE else body[at : at + type_len].decode()
    at += 0 if type_len == _NO_TYPE else type_len
    return Answer(key, created, topic, body[at:], packed, ctype)


def replay(data: bytes) -> dict[bytes, Pending]:
    """What the records in `data` say per key, the later record winning."""
    pending: dict[bytes, Pending] = {}
    for at, kind, key, body in records(data):
        entry = pending.get(key)
        if kind == START:
            created, count = _START.unpack_from(body)
            if entry is None:
                entry = pending[key] = Pending(created, body[_START.size :].decode())
            elif not entry.reply_topic:  # a SETTLE came first
                entry.created, entry.reply_topic = created, body[_START.size :].decode()
            entry.attempts = count
        elif kind == SETTLE:
            if entry is None:
                entry = pending[key] = Pending(0.0, "")
            entry.attempts = 0
        elif kind == ANSWER:
            answer = decode_answer(key, body)
            if entry is None:
                entry = pending[key] = Pending(answer.created, answer.reply_topic)
            elif not entry.reply_topic:  # a SETTLE came first
                entry.created, entry.reply_topic = answer.created, answer.reply_topic
            entry.answer_at = at
    return pending


class Slot:
    """This process's claim on the tail files next to a journal: `<journal>-tail<n>`, held
    with an exclusive `flock`, owns the data files `<journal>-tail<n>.<seq>`."""

    def __init__(self, journal: Path, n: int, fd: int) -> None:
        self.journal = journal
        self.n = n
        self._fd = fd
        self.seq = 0
        self._others: list[tuple[Path, int]] = []
        """Slots of dead processes, held until their files are in SQLite."""

    @classmethod
    def claim(cls, journal: Path) -> tuple[Slot, list[Path]]:
        """A free slot, and the data files of every slot nobody holds (left by processes that
        died, ours among them), oldest first: their records must go to SQLite before any other.
        The slots of those files stay claimed until `release_others`."""
        mine: Slot | None = None
        orphans: list[Path] = []
        for n in range(_SLOTS):
            lock = journal.with_name(f"{journal.name}-tail{n}")
            files = _data_files(journal, n)
            if mine is not None and not lock.exists() and not files:
                continue
            fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:  # held by a live process sharing the journal
                os.close(fd)
                continue
            orphans.extend(path for _, path in files)
            if mine is None:
                mine = cls(journal, n, fd)
                mine.seq = files[-1][0] + 1 if files else 0
            else:
                mine._others.append((lock, fd))
        if mine is None:
            raise OSError(f"all {_SLOTS} tail slots next to {journal} are held")
        return mine, orphans

    @property
    def prefix(self) -> str:
        """The start of the `label` of each of this slot's data files."""
        return f"tail{self.n}."

    def release_others(self) -> None:
        """Give up the dead processes' slots (their files are in SQLite and removed)."""
        for lock, fd in self._others:
            with contextlib.suppress(OSError):
                lock.unlink()
            os.close(fd)
        self._others.clear()

    def open(self, sync: bool, opened: float = 0.0) -> TailFile:
        """A new, empty data file of this slot (the next in sequence), its first record written
        at `opened` (the journal's clock)."""
        flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_APPEND | os.O_CLOEXEC
        while True:  # never over a file with records in it
            path = self.journal.with_name(f"{self.journal.name}-tail{self.n}.{self.seq}")
            self.seq += 1
            with contextlib.suppress(FileExistsError):
                return TailFile(path, os.open(path, flags, 0o600), sync, opened)

    def close(self) -> None:
        """Give up the slot (its data files already removed)."""
        lock = self.journal.with_name(f"{self.journal.name}-tail{self.n}")
        with contextlib.suppress(OSError):
            lock.unlink()
        os.close(self._fd)
        self.release_others()


def label(journal: Path, path: Path) -> str:
    """The name of the tail file at `path` relative to `journal`'s (`tail<n>.<seq>`): how the
    journal records which files it has absorbed."""
    return path.name[len(journal.name) + 1 :]


def _data_files(journal: Path, n: int) -> list[tuple[int, Path]]:
    """(seq, path) of slot `n`'s data files, oldest first."""
    found = []
    for path in journal.parent.glob(f"{glob.escape(journal.name)}-tail{n}.*"):
        seq = path.name.rpartition(".")[2]
        if seq.isdigit():
            found.append((int(seq), path))
    return sorted(found)


class TailFile:
    """One data file of a slot: appended to, read back, removed once SQLite has its records."""

    def __init__(self, path: Path, fd: int, sync: bool, opened: float = 0.0) -> None:
        self.path = path
        self._fd = fd
        self._sync = sync
        self.opened = opened
        """When its first record was written (the journal's clock): the age of its oldest."""
        self.size = os.fstat(fd).st_size
        self.head = head_of(os.pread(fd, _HEAD.size, 0))
        """The file's `head_of` (None while it holds no whole record header)."""

    def append(self, data: bytes) -> int:
        """Append `data` (whole records); the offset it starts at."""
        at = self.size
        written = os.write(self._fd, data)
        if written != len(data):  # a short write: the disk is full
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, at)
            raise OSError(errno.ENOSPC, "short write to the journal's tail file")
        if self._sync:
            os.fdatasync(self._fd)
        self.size = at + written
        if at == 0:
            self.head = head_of(data)
        return at

    def read(self) -> bytes:
        """Every byte of the file."""
        return os.pread(self._fd, self.size, 0)

    def read_at(self, at: int) -> tuple[int, bytes, bytes] | None:
        """(kind, key, body) of the record at offset `at`."""
        head = os.pread(self._fd, _HEAD.size, at)
        if len(head) < _HEAD.size:
            return None
        record = record_at(head + os.pread(self._fd, _HEAD.unpack(head)[1], at + _HEAD.size), 0)
        return record[:3] if record is not None else None

    def remove(self) -> None:
        """Remove the file and close it (SQLite has its records)."""
        with contextlib.suppress(OSError):
            self.path.unlink()
        os.close(self._fd)

    def close(self) -> None:
        """Close the file, keeping it (its records are not all in SQLite)."""
        os.close(self._fd)


def starts_by_slot(
    journal: Path, files: list[tuple[Path, bytes]], key: bytes | None = None
) -> tuple[dict[bytes, int], dict[bytes, int]]:
    """(starts, slots) per key (only `key` when given) of the tail files `files` (path, bytes)
    next to `journal`: the most starts not settled that one slot's files say (within a slot
    the later record wins, a SETTLE saying 0), and how many slots said anything of the key."""
    latest: dict[tuple[int, bytes], int] = {}
    for (n, _), data in sorted((_slot_seq(journal, path), data) for path, data in files):
        if key is not None and data.find(key) < 0:  # most files never mention it
            continue
        for _, kind, other, body in records(data):
            if kind == START and (key is None or other == key):
                latest[n, other] = _START.unpack_from(body)[1]
            elif kind == SETTLE and (key is None or other == key):
                latest[n, other] = 0
    starts: dict[bytes, int] = {}
    slots: dict[bytes, int] = {}
    for (_, other), count in latest.items():
        # A settle ends only its own process's starts: another's cannot be ordered against it,
        # and one start too many is the safe side of a poison bound.
        starts[other] = max(starts.get(other, 0), count)
        slots[other] = slots.get(other, 0) + 1
    return starts, slots


def _slot_seq(journal: Path, path: Path) -> tuple[int, int]:
    """(slot, seq) of the tail data file `path` of `journal` (-1s where a name is not one)."""
    slot, _, seq = path.name[len(journal.name) + len("-tail") :].partition(".")
    return (int(slot) if slot.isdigit() else -1, int(seq) if seq.isdigit() else -1)


def _peer_files(
    journal: Path, slot: int, key: bytes, absorbed: Callable[[], Mapping[str, tuple[int, int]]]
) -> Iterator[tuple[Path, bytes]]:
    """(path, bytes) of the tail files of other processes sharing `journal` (running or dead,
    any slot but `slot`) that mention `key`, but none that SQLite already has (`absorbed`: see
    `taken_in`, asked only once one mentions `key`), in name order."""
    known: Mapping[str, tuple[int, int]] | None = None
    for path in sorted(journal.parent.glob(f"{glob.escape(journal.name)}-tail*.*")):
        if path.name.startswith(f"{journal.name}-tail{slot}."):
            continue
        try:
            data = path.read_bytes()
        except OSError:  # handed to SQLite and removed meanwhile
            continue
        if data.find(key) < 0:  # most files never mention it
            continue
        known = absorbed() if known is None else known
        # A file SQLite took in just before its process died: what it says may be stale.
        if not taken_in(known, label(journal, path), data):
            yield path, data


def peer_starts(
    journal: Path,
    slot: int,
    key: bytes,
    absorbed: Callable[[], Mapping[str, tuple[int, int]]] = dict,
) -> int:
    """The most starts not settled that the tail files of other processes sharing `journal`
    say `key` has (`_peer_files`); 0 when none says so."""
    files = list(_peer_files(journal, slot, key, absorbed))
    return starts_by_slot(journal, files, key)[0].get(key, 0)


def taken_in(absorbed: Mapping[str, tuple[int, int]], label: str, data: bytes) -> bool:
    """Whether the tail file `label` holding `data` is one SQLite has all the records of, by
    `absorbed` (label -> size and head when it took the file in): the same head (the same file,
    not one made anew under its name), no more bytes (a power cut may have cut its end)."""
    size, head = absorbed.get(label, (-1, None))
    return head is not None and head == head_of(data) and len(data) <= size


def peer_answer(
    journal: Path,
    slot: int,
    key: bytes,
    absorbed: Callable[[], Mapping[str, tuple[int, int]]] = dict,
) -> Answer | None:
    """`key`'s answer in the tail files of other processes sharing `journal` (`_peer_files`),
    if one has it."""
    found = None
    for _, data in _peer_files(journal, slot, key, absorbed):
        for _, kind, other, body in records(data):
            if kind == ANSWER and other == key:
                found = decode_answer(key, body)
    return found
