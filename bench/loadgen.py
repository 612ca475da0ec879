"""The load generator: a paho MQTT 5 client keeping at most C requests in flight.

Every request goes to `<prefix>/request/<method>/<tag>/<n>` with `"transaction": n`; the reply is
matched on `<prefix>/response/<method>/<tag>/<n>` and checked (status ok, same transaction, and
for the audio runs the expected size; with `--reply raw`, Node-RED's flow, a chat.completion
alone). At most `--concurrency` (C) requests are in flight; with
`--ramp`, the window opens from 1 to C over that many seconds (independent clients rather than one
synchronized burst, which a closed loop would keep phase-locked). `--warmup` requests go first
and are not counted; the measured window runs from the first of the `--count` measured requests
being sent, with no pause, to the last reply. The run stops when all are answered, after
`--time-limit` seconds, or when no reply came for `--stall` seconds (whatever is unanswered then
counts as lost).

Throughput is the replies received in the window (including the last warm-up ones) over its
length; latency percentiles are over the measured requests. The CPU time and peak RSS of the
watched processes (`--watch name=pid`) are read from /proc at both ends of the window; the peak
RSS is reset (clear_refs) at its start.

With `--direct-url`, the service host's own latency is first measured here, with aiohttp,
sequentially and over one keep-alive connection, with the same body the bridge sends.

Prints one JSON object on stdout; progress and problems go to stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import os
import sys
import threading
import time
from typing import Any

import aiohttp
import orjson
import paho.mqtt.client as paho
from common import (
    MODEL,
    PREFIX,
    ProcSample,
    latency_summary,
    machine_cpu_s,
    make_client,
    proc_sample,
    reset_peak_rss,
)
from paho.mqtt.subscribeoptions import SubscribeOptions

CHAT_BODY = orjson.dumps({"model": MODEL, "messages": [{"role": "user", "content": "hi"}]})
KINDS = {
    "chat": "createChatCompletion",
    "speech": "createSpeech",
    "transcription": "createTranscription",
}


def build_template(kind: str, size: int) -> tuple[bytes, bytes]:
    """The request payload around `"transaction": n`, as (head, tail) bytes."""
    if kind == "chat":
        rest = CHAT_BODY[1:]
    elif kind == "speech":
        rest = orjson.dumps({"model": "tts-1", "input": "hello", "voice": "alloy"})[1:]
    else:
        audio = base64.b64encode(os.urandom(size))
        rest = b"".join(
            (b'"model":"whisper-1","file":{"base64":"', audio, b'","filename":"a.wav"}}')
        )
    return b'{"transaction":', b"," + rest


class Load:
    """One load run: warm-up, then the measured phase; all MQTT work on paho's network thread."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.kind: str = args.kind
        self.method = KINDS[self.kind]
        self.size: int = args.size
        self.raw_reply = args.reply == "raw"
        """Node-RED's flow publishes the API's answer itself, no envelope and no transaction."""
        self.head, self.tail = build_template(self.kind, self.size)
        base = f"{args.prefix}/request/{self.method}/{args.tag}/"
        self.request_base = base
        self.reply_filter = f"{args.prefix}/response/{self.method}/{args.tag}/+"
        self.concurrency: int = args.concurrency
        self.warmup: int = args.warmup
        self.count: int = args.count
        self.watch: dict[str, int] = {**dict(args.watch), "loadgen": os.getpid()}
        self.lock = threading.Lock()
        self.done = threading.Event()
        self.sent_at: dict[int, int] = {}
        self.next_n = 0
        self.total = self.warmup + self.count
        self.ramp: float = args.ramp
        self.allowed = 1 if self.ramp > 0 else self.concurrency
        """Requests allowed in flight now: grows from 1 to C over `ramp` s, then stays."""
        self.window_replies = 0
        """Replies (warm-up ones too) between the first measured send and the last reply."""
        self.measuring = False
        self.stopped = False
        self.sent = 0
        self.ok = 0
        self.errors = 0
        self.duplicates = 0
        self.error_samples: list[str] = []
        self.latencies: list[float] = []
        self.t_start = 0
        self.t_last = 0
        self.before: dict[str, ProcSample | None] = {}
        self.after: dict[str, ProcSample | None] = {}
        self.hwm_reset: dict[str, bool] = {}
        self.machine: list[tuple[float, float]] = [(0.0, 0.0), (0.0, 0.0)]
        self.client = make_client(f"bench-load-{args.tag}")
        self.client.on_connect = self._on_connect
        self.client.on_subscribe = self._on_subscribe
        self.client.on_message = self._on_message

    # --- paho callbacks (network thread) ---------------------------------------------------------

    def _on_connect(self, c: paho.Client, u: Any, flags: Any, reason: Any, props: Any) -> None:
        if reason.is_failure:
            print(f"loadgen: connect refused: {reason}", file=sys.stderr)
            self.done.set()
            return
        c.subscribe(self.reply_filter, options=SubscribeOptions(qos=1))

    def _on_subscribe(self, c: paho.Client, u: Any, mid: int, reasons: Any, props: Any) -> None:
        with self.lock:
            if self.warmup == 0:
                self._begin_measuring()
            self._refill()
        if self.ramp > 0:
            threading.Thread(target=self._ramp, name="ramp", daemon=True).start()

    def _on_message(self, c: paho.Client, u: Any, msg: paho.MQTTMessage) -> None:
        now = time.perf_counter_ns()
        topic = msg.topic
        try:
            n = int(topic[topic.rindex("/") + 1 :])
        except ValueError:
            return
        with self.lock:
            sent = self.sent_at.pop(n, None)
            if sent is None:
                self.duplicates += 1
                return
            if self.measuring and not self.stopped:
                self.window_replies += 1
            if n >= self.warmup:
                problem = self._check(n, msg.payload)
                self.t_last = now
                if problem is None:
                    self.ok += 1
                    self.latencies.append((now - sent) / 1e6)
                else:
                    self.errors += 1
                    if len(self.error_samples) < 5:
                        self.error_samples.append(problem)
            if self.stopped:
                return
            if not self.sent_at and self.next_n >= self.total:
                self._finish()
            else:
                self._refill()

    # --- state (under self.lock) -----------------------------------------------------------------

    def _ramp(self) -> None:
        """Open the window one request at a time over `ramp` s: independent clients, no burst."""
        step = self.ramp / self.concurrency
        while True:
            time.sleep(step)
            with self.lock:
                if self.stopped or self.allowed >= self.concurrency:
                    return
                self.allowed += 1
                self._refill()

    def _begin_measuring(self) -> None:
        self.measuring = True
        for name, pid in self.watch.items():
            self.hwm_reset[name] = reset_peak_rss(pid)
            self.before[name] = proc_sample(pid)
        self.machine[0] = machine_cpu_s()
        self.t_start = self.t_last = time.perf_counter_ns()

    def _finish(self) -> None:
        if self.stopped:
            return
        self.stopped = True
        for name, pid in self.watch.items():
            self.after[name] = proc_sample(pid)
        self.machine[1] = machine_cpu_s()
        self.done.set()

    def _refill(self) -> None:
        publish = self.client.publish
        while len(self.sent_at) < self.allowed and self.next_n < self.total:
            n = self.next_n
            if n == self.warmup and not self.measuring:
                self._begin_measuring()
            self.next_n += 1
            payload = b"%s%d%s" % (self.head, n, self.tail)
            self.sent_at[n] = time.perf_counter_ns()
            publish(f"{self.request_base}{n}", payload, qos=1)
            if n >= self.warmup:
                self.sent += 1

    def _check(self, n: int, payload: bytes) -> str | None:
        """None for a correct reply, else a short description of what is wrong."""
        try:
            reply = orjson.loads(payload)
        except orjson.JSONDecodeError:
            return f"not JSON: {payload[:200]!r}"
        if self.raw_reply:
            if not isinstance(reply, dict) or reply.get("object") != "chat.completion":
                return f"unexpected reply: {payload[:400].decode('utf-8', 'replace')}"
            return None
        if not isinstance(reply, dict) or reply.get("status") != "ok":
            return f"error reply: {payload[:400].decode('utf-8', 'replace')}"
        if reply.get("transaction") != n:
            return f"transaction {reply.get('transaction')!r} on the reply to {n}"
        data = reply.get("data")
        if self.kind == "speech":
            if not isinstance(data, dict) or data.get("size") != self.size:
                return f"speech reply without the {self.size} bytes: {str(data)[:200]}"
            if len(data.get("base64", "")) != 4 * ((self.size + 2) // 3):
                return "speech reply with a truncated base64 body"
        elif self.kind == "transcription":
            if not isinstance(data, dict) or data.get("bytes") != self.size:
                return f"transcription: upstream got {str(data)[:200]}, not {self.size} bytes"
        elif not isinstance(data, dict) or data.get("object") != "chat.completion":
            return f"unexpected data: {str(data)[:200]}"
        return None

    # --- driver (main thread) --------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        """Connect, run both phases within the limits, disconnect; the result document."""
        args = self.args
        deadline = time.monotonic() + args.time_limit
        self.client.connect(args.host, args.port, keepalive=60)
        self.client.loop_start()
        outcome = "complete"
        try:
            while not self.done.wait(0.2):
                now = time.monotonic()
                with self.lock:
                    idle_s = (time.perf_counter_ns() - self.t_last) / 1e9 if self.t_last else 0.0
                    if now > deadline:
                        outcome = f"time limit ({args.time_limit:g} s) reached"
                    elif self.measuring and idle_s > args.stall:
                        outcome = f"no reply for {args.stall:g} s"
                    else:
                        continue
                    if not self.measuring:
                        self._begin_measuring()
                    self._finish()
                break
        finally:
            self.client.disconnect()
            self.client.loop_stop()
        return self._result(outcome)

    def _result(self, outcome: str) -> dict[str, Any]:
        elapsed = max(self.t_last - self.t_start, 1) / 1e9
        answered = self.ok + self.errors
        result: dict[str, Any] = {
            "kind": self.kind,
            "method": self.method,
            "concurrency": self.concurrency,
            "count": self.count,
            "warmup": self.warmup,
            "outcome": outcome,
            "sent": self.sent,
            "answered": answered,
            "ok": self.ok,
            "errors": self.errors,
            "lost": self.sent - answered,
            "duplicates": self.duplicates,
            "error_samples": self.error_samples,
            "elapsed_s": round(elapsed, 3),
            "window_replies": self.window_replies,
            "throughput_rps": round(self.window_replies / elapsed, 1),
            **latency_summary(self.latencies),
            "processes": {},
        }
        watched_cpu = 0.0
        for name in self.watch:
            before, after = self.before.get(name), self.after.get(name)
            if before is None or after is None:
                continue
            cpu = after.cpu_s - before.cpu_s
            watched_cpu += cpu
            result["processes"][name] = {
                "cpu_s": round(cpu, 3),
                "cpu_ms_per_request": (
                    round(1000 * cpu / self.window_replies, 4) if self.window_replies else None
                ),
                "cpu_share": round(cpu / elapsed, 3),
                "rss_before_mib": round(before.rss_mib, 1),
                "rss_after_mib": round(after.rss_mib, 1),
                "peak_rss_mib": round(after.hwm_mib, 1),
                "peak_is_run_only": self.hwm_reset.get(name, False),
            }
        machine = self.machine[1][0] - self.machine[0][0]
        result["machine_cpu_share"] = round(machine / elapsed, 3)
        result["steal_share"] = round((self.machine[1][1] - self.machine[0][1]) / elapsed, 3)
        # Busy CPU outside the watched processes: kernel threads, other work on the machine.
        result["other_cpu_share"] = round(max(0.0, machine - watched_cpu) / elapsed, 3)
        return result


async def measure_direct(url: str, count: int) -> dict[str, Any]:
    """The service host's own latency for the chat body: sequential, one keep-alive connection."""
    headers = {"Authorization": "Bearer sk-bench", "Content-Type": "application/json"}
    latencies: list[float] = []
    connector = aiohttp.TCPConnector(limit=1)
    async with aiohttp.ClientSession(connector=connector) as session:
        for i in range(count + 20):
            t0 = time.perf_counter_ns()
            async with session.post(url, data=CHAT_BODY, headers=headers) as resp:
                await resp.read()
                if resp.status != 200:
                    raise RuntimeError(f"direct request to {url}: HTTP {resp.status}")
            if i >= 20:
                latencies.append((time.perf_counter_ns() - t0) / 1e6)
    return {"url": url, "count": count, **latency_summary(latencies)}


def parse_watch(text: str) -> tuple[str, int]:
    """`name=pid` -> (name, pid)."""
    name, _, pid = text.partition("=")
    return name, int(pid)


def main() -> None:
    """Parse the arguments, run, print the JSON result."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--prefix", default=PREFIX)
    parser.add_argument("--tag", required=True, help="unique per run: the topic level after method")
    parser.add_argument("--kind", choices=sorted(KINDS), default="chat")
    parser.add_argument(
        "--reply",
        choices=("envelope", "raw"),
        default="envelope",
        help="envelope: the bridge's reply; raw: the API's answer alone (Node-RED's flow)",
    )
    parser.add_argument("--size", type=int, default=0, help="audio bytes (speech/transcription)")
    parser.add_argument("--count", type=int, required=True)
    parser.add_argument("--warmup", type=int, default=0)
    parser.add_argument("--concurrency", type=int, required=True)
    parser.add_argument("--time-limit", type=float, default=120.0)
    parser.add_argument("--stall", type=float, default=10.0)
    parser.add_argument("--ramp", type=float, default=0.0, help="s to open the window to C")
    parser.add_argument("--watch", type=parse_watch, action="append", default=[])
    parser.add_argument("--direct-url", default="")
    parser.add_argument("--direct-count", type=int, default=500)
    args = parser.parse_args()
    direct = (
        asyncio.run(measure_direct(args.direct_url, args.direct_count)) if args.direct_url else None
    )
    result = Load(args).run()
    result["direct"] = direct
    sys.stdout.write(orjson.dumps(result).decode() + "\n")


if __name__ == "__main__":
    main()
