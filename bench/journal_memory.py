"""Peak RSS a journal adds under load, the journal alone: `concurrency` tasks each write a start,
a chat answer and a settle per request, as the pipeline does at C = 128, for `--count` requests.
Prints the process's VmHWM before and after and the difference (what the journal's buffers,
dicts, threads and SQLite caches cost at their peak).

    .venv/bin/python bench/journal_memory.py                          # synchronous = "normal"
    .venv/bin/python bench/journal_memory.py --synchronous full       # no tail file
    .venv/bin/python bench/journal_memory.py --src /tmp/main-tree     # another tree's journal
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

from journal_store import Quiet  # bench/ is this script's folder, first on sys.path

HERE = Path(__file__).resolve().parent


def peak_and_now() -> tuple[float, float]:
    """(VmHWM, VmRSS) of this process in MiB."""
    fields = {}
    with open("/proc/self/status") as fh:
        for line in fh:
            name, _, value = line.partition(":")
            if name in ("VmHWM", "VmRSS"):
                fields[name] = int(value.split()[0]) / 1024
    return fields["VmHWM"], fields["VmRSS"]


async def run(args: argparse.Namespace) -> dict[str, Any]:
    """Open a journal, drive `--count` requests through it, close it; the RSS figures."""
    sqlite = importlib.import_module("bridge.journal.sqlite")
    request_key = importlib.import_module("bridge.pipeline.dedup").request_key
    body = importlib.import_module("upstream").chat_body(args.chat_bytes)
    folder = Path(tempfile.mkdtemp(prefix="omb-journal-memory-"))
    journal = sqlite.Journal.open(
        folder / "journal.sqlite3",
        scope="answers",
        max_bytes=64 << 20,
        max_age=86400.0,
        max_answer_bytes=1 << 20,
        synchronous=args.synchronous,
        log=Quiet(),
    )
    before, _ = peak_and_now()
    numbers = iter(range(args.count))

    async def client() -> None:
        for n in numbers:
            key = request_key("openai/request/createChatCompletion", b'{"n": %d}' % n)
            topic = f"openai/response/createChatCompletion/bench/{n}"
            await journal.begin_attempt(key, topic)
            await journal.record_answer(key, topic, body.replace(b"chatcmpl-", b"chatcmpl-%d" % n))
            await journal.settle_attempt(key)

    await asyncio.gather(*(client() for _ in range(args.concurrency)))
    peak, now = peak_and_now()
    await journal.close()
    return {
        "synchronous": args.synchronous,
        "count": args.count,
        "concurrency": args.concurrency,
        "reply_bytes": len(body),
        "vmhwm_before_mib": round(before, 1),
        "vmhwm_after_mib": round(peak, 1),
        "peak_added_mib": round(peak - before, 1),
        "rss_after_mib": round(now, 1),
    }


def main() -> None:
    """Parse the options, run once, print the JSON line."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--count", type=int, default=20000)
    parser.add_argument("--concurrency", type=int, default=128)
    parser.add_argument("--chat-bytes", type=int, default=1000)
    parser.add_argument("--synchronous", choices=("normal", "full"), default="normal")
    parser.add_argument("--src", type=Path, default=None, help="a tree holding bridge/")
    args = parser.parse_args()
    sys.path.insert(0, str(HERE))  # upstream.chat_body
    if args.src is not None:
        sys.path.insert(0, str(args.src.resolve()))
    print(json.dumps(asyncio.run(run(args))))


if __name__ == "__main__":
    main()
