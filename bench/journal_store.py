"""Bytes the journal writes per request, the journal alone, at its retention's steady state.

bench/journal.py measures a fresh journal in a running bridge; this drives the journal the way
the pipeline does at C = 1 (a start, the answer, the settle with the next write) in one process
with a simulated clock, so that a day of traffic can run in seconds: `--prefill` requests fill it
first (10,000 a day for a day by default: at `max_age` one day every request then also ages one
out), then `--count` requests are measured. Bytes are this process's `write_bytes` (page-cache
pages dirtied, 4 KiB each, as they reach the block layer) and `wchar` (bytes passed to write
calls) over the measured requests, checkpoints and tail batches included. `--flush-every K`
writes the journal's files out every K requests (fsync), as the kernel does every 30 s
(`dirty_expire_centisecs`): at 10,000 requests a day that is every 3.5 requests, and each
request then pays for its own 4 KiB pages. `--src DIR` runs the `bridge/` package in DIR,
`--no-tail` commits every write to SQLite as `synchronous = "full"` does, without its fsyncs.

    .venv/bin/python bench/journal_store.py                       # steady state, back to back
    .venv/bin/python bench/journal_store.py --flush-every 4       # spread over a day
    .venv/bin/python bench/journal_store.py --src /tmp/main-tree  # another tree's journal
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent


class Quiet:
    """A logger that drops everything."""

    def __getattr__(self, level: str) -> Any:
        return lambda event, **fields: None


def proc_io() -> dict[str, int]:
    """This process's /proc I/O counters."""
    with open("/proc/self/io") as fh:
        return {name: int(value) for name, _, value in (line.partition(":") for line in fh)}


def reply(n: int, body: bytes) -> bytes:
    """The reply the bridge publishes for the stand-in's chat answer `body`."""
    head = b'{"status":"ok","method":"createChatCompletion","transaction":%d,"data":' % n
    return head + body + b"}"


def open_journal(path: Path, clock: list[float], synchronous: str, use_tail: bool = True) -> Any:
    """The journal at `path` on the simulated clock (this tree's or `--src`'s)."""
    sqlite = importlib.import_module("bridge.journal.sqlite")
    store = sqlite.SqliteStore(
        path, max_bytes=64 << 20, max_age=86400.0, synchronous=synchronous, clock=lambda: clock[0]
    )
    options: dict[str, Any] = {"scope": "answers", "max_answer_bytes": 1 << 20, "log": Quiet()}
    try:
        tails = importlib.import_module("bridge.journal.tail")
    except ImportError:  # a tree from before the tail file
        return sqlite.Journal(store, **options)
    use_tail = use_tail and synchronous == "normal"
    slot = tails.Slot.claim(path)[0] if use_tail else None
    return sqlite.Journal(store, slot=slot, **options)


async def run(args: argparse.Namespace) -> dict[str, Any]:
    """Prefill, then measure `--count` requests; bytes per request."""
    upstream = importlib.import_module("upstream")
    body = upstream.chat_body(args.chat_bytes)
    folder = Path(tempfile.mkdtemp(prefix="omb-journal-store-"))
    path = folder / "journal.sqlite3"
    clock = [1_800_000_000.0]
    gap = 86400.0 / args.per_day
    journal = open_journal(path, clock, args.synchronous, not args.no_tail)
    request_key = importlib.import_module("bridge.pipeline.dedup").request_key

    async def one(n: int) -> int:
        clock[0] += gap
        key = request_key("openai/request/createChatCompletion/bench", b"%d" % n)
        topic = "openai/response/createChatCompletion/bench"
        answer = reply(n, body)
        assert await journal.begin_attempt(key, topic) == 1
        assert await journal.record_answer(key, topic, answer)
        await journal.settle_attempt(key)
        return len(answer)

    def flush() -> None:
        for name in os.listdir(folder):
            fd = os.open(folder / name, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)

    for n in range(args.prefill):
        await one(n)
    flush()
    before, cpu = proc_io(), time.process_time()
    size = 0
    for n in range(args.prefill, args.prefill + args.count):
        size += await one(n)
        if args.flush_every and (n + 1) % args.flush_every == 0:
            flush()
    after, cpu = proc_io(), time.process_time() - cpu
    files = sum(os.stat(folder / name).st_size for name in os.listdir(folder))
    await journal.close()
    for name in os.listdir(folder):
        os.unlink(folder / name)
    os.rmdir(folder)
    count = args.count
    return {
        "synchronous": args.synchronous,
        "tail": getattr(journal, "slot", None) is not None,
        "prefill": args.prefill,
        "flush_every": args.flush_every,
        "reply_bytes": size // count,
        "write_bytes_per_request": (after["write_bytes"] - before["write_bytes"]) // count,
        "wchar_per_request": (after["wchar"] - before["wchar"]) // count,
        "cpu_us_per_request": round(cpu * 1e6 / count),
        "files_bytes": files,
    }


def main() -> None:
    """Parse the options, run once, print one JSON line."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--count", type=int, default=6000)
    parser.add_argument("--prefill", type=int, default=10000)
    parser.add_argument("--per-day", type=float, default=10000.0)
    parser.add_argument("--flush-every", type=int, default=0)
    parser.add_argument("--chat-bytes", type=int, default=1000)
    parser.add_argument("--synchronous", choices=("normal", "full"), default="normal")
    parser.add_argument("--src", type=Path, default=HERE.parent)
    parser.add_argument("--no-tail", action="store_true", help="commit every write to SQLite")
    args = parser.parse_args()
    sys.path[:0] = [str(args.src), str(HERE)]
    print(json.dumps(asyncio.run(run(args))))


if __name__ == "__main__":
    main()
