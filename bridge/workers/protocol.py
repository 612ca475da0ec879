"""Workers (`[runtime] workers`): how many, each one's config, the control lines, summed stats.

Pure: no processes, no sockets. The supervisor (bridge/runtime/supervisor.py) starts the worker
processes; each is an ordinary bridge (bridge/runtime/daemon.py) in one shared-subscription group
that publishes no state of its own and reports to the supervisor over a socket pair, one JSON object
per line.
"""

from __future__ import annotations

import base64
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bridge.config import BridgeConfig
from bridge.jsoncodec import dumps, loads
from bridge.pipeline.model import Observed
from bridge.pipeline.stats import Stats

AUTO_MAX = 8
"""`workers = "auto"` starts at most this many: past that the broker, not Python, is the limit."""

EMBEDDED_REASON = "the embedded trial broker has no shared subscriptions"

# Commands from the supervisor to a worker, one per line.
STOP = b"stop\n"
"""Finish in-flight requests (up to `[limits] shutdown_grace`), then exit."""
STOP_NOW = b"stop-now\n"
"""Exit at once; unfinished requests stay unacknowledged and are redelivered."""

MAX_LINE = 1 << 20
"""The longest report line the supervisor reads."""
HEARTBEAT_SECONDS = 1.0
"""A worker reports its stats this often; the report doubles as its heartbeat."""


def cpu_count() -> int:
    """The cores this process may run on (its CPU affinity), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def resolve_workers(
    config: BridgeConfig, cores: Callable[[], int] = cpu_count
) -> tuple[int, str | None]:
    """How many workers to run for `config`, and why fewer than asked (None when as asked)."""
    asked = config.runtime.workers
    count = min(cores(), AUTO_MAX) if asked == "auto" else asked
    if count > 1 and config.mqtt.embedded:
        return 1, EMBEDDED_REASON
    return count, None


def default_group(config: BridgeConfig) -> str:
    """The shared-subscription group of the workers when `[mqtt] shared_group` is empty."""
    return f"omb-{config.mqtt.instance_name}"


def group(config: BridgeConfig) -> str:
    """The shared-subscription group the workers join."""
    return config.mqtt.shared_group or default_group(config)


def worker_client_id(config: BridgeConfig, index: int) -> str:
    """Worker `index`'s client id: worker 1 keeps the single-process id (and its session)."""
    base = config.mqtt.effective_client_id
    return base if index == 1 else f"{base}-{index}"


def supervisor_client_id(config: BridgeConfig) -> str:
    """The supervisor's client id: it carries the state, info, stats and discovery topics."""
    return f"{config.mqtt.effective_client_id}-supervisor"


def worker_journal_path(path: str, index: int) -> str:
    """Worker `index`'s SQLite journal: worker 1 keeps the single-process file."""
    if index == 1 or not path:
        return path
    p = Path(path)
    return str(p.with_name(f"{p.stem}-{index}{p.suffix}"))


def worker_config(config: BridgeConfig, index: int) -> BridgeConfig:
    """The config worker `index` (1-based) runs with: its client id, the group, its journal."""
    mqtt = config.mqtt.model_copy(
        update={"client_id": worker_client_id(config, index), "shared_group": group(config)}
    )
    journal = config.journal.model_copy(
        update={"path": worker_journal_path(config.journal.path, index)}
    )
    runtime = config.runtime.model_copy(update={"workers": 1})
    return config.model_copy(update={"mqtt": mqtt, "journal": journal, "runtime": runtime})


def worker_environ(environ: Mapping[str, str]) -> dict[str, str]:
    """A worker's environment: the supervisor's, without systemd's notify and watchdog
    variables (only the supervisor talks to systemd)."""
    drop = {"NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"}
    return {k: v for k, v in environ.items() if k not in drop}


def report_line(event: str, stats: Stats | None = None) -> bytes:
    """One worker-to-supervisor line: `ready`, `stats` (also the heartbeat) or `stopping`."""
    body: dict[str, Any] = {"event": event}
    if stats is not None:
        body["stats"] = {
            "requests_total": stats.requests_total,
            "errors_total": stats.errors_total,
            "in_flight": stats.in_flight,
            "last_latency_ms": stats.last_latency_ms,
            "last_error": stats.last_error,
            "by_code": stats.by_code,
        }
    line = dumps(body) + b"\n"
    if len(line) > MAX_LINE // 2 and stats is not None and stats.last_error is not None:
        # An upstream's error can be long; the stats topic shows 255 characters of it anyway.
        error = stats.last_error
        body["stats"]["last_error"] = {
            "code": str(error.get("code", "error")),
            "message": str(error.get("message", ""))[:1000],
        }
        line = dumps(body) + b"\n"
    return line


def parse_report(line: bytes) -> tuple[str, Stats | None] | None:
    """A worker's report line as (event, stats), or None when it is not one."""
    try:
        body = loads(line)
    except ValueError:
        return None
    if not isinstance(body, dict) or not isinstance(body.get("event"), str):
        return None
    raw = body.get("stats")
    if not isinstance(raw, dict):
        return body["event"], None
    try:
        stats = Stats(
            requests_total=int(raw.get("requests_total", 0)),
            errors_total=int(raw.get("errors_total", 0)),
            in_flight=int(raw.get("in_flight", 0)),
            last_latency_ms=raw.get("last_latency_ms"),
            last_error=raw.get("last_error"),
            by_code={str(k): int(v) for k, v in (raw.get("by_code") or {}).items()},
        )
    except (TypeError, ValueError, AttributeError):
        return None
    return body["event"], stats


@dataclass(slots=True)
class _Latest:
    stats: Stats
    changed_at: int
    """Sequence number of the report that last changed requests_total (for `last_*`)."""
    error_at: int


@dataclass(slots=True)
class StatsTotals:
    """The workers' counters summed into one bridge's; counters survive a worker's restart."""

    latest: dict[int, _Latest] = field(default_factory=dict)
    retired: Stats = field(default_factory=Stats)
    """What workers that exited had counted (their last report)."""
    _seq: int = 0

    def update(self, index: int, stats: Stats) -> None:
        """Record worker `index`'s latest report."""
        self._seq += 1
        before = self.latest.get(index)
        changed = before is None or before.stats.requests_total != stats.requests_total
        errored = before is None or before.stats.errors_total != stats.errors_total
        self.latest[index] = _Latest(
            stats,
            self._seq if changed else before.changed_at if before else 0,
            self._seq if errored else before.error_at if before else 0,
        )

    def retire(self, index: int) -> None:
        """Worker `index` exited: keep its counts, forget its in-flight requests."""
        gone = self.latest.pop(index, None)
        if gone is None:
            return
        self.retired.requests_total += gone.stats.requests_total
        self.retired.errors_total += gone.stats.errors_total
        for code, n in gone.stats.by_code.items():
            self.retired.by_code[code] = self.retired.by_code.get(code, 0) + n
        if gone.stats.last_latency_ms is not None:
            self.retired.last_latency_ms = gone.stats.last_latency_ms
        if gone.stats.last_error is not None:
            self.retired.last_error = gone.stats.last_error

    def total(self) -> Stats:
        """The sum over live and exited workers; `last_*` from the most recent report."""
        out = Stats(
            requests_total=self.retired.requests_total,
            errors_total=self.retired.errors_total,
            last_latency_ms=self.retired.last_latency_ms,
            last_error=self.retired.last_error,
            by_code=dict(self.retired.by_code),
        )
        latest_change = latest_error = -1
        for entry in self.latest.values():
            s = entry.stats
            out.requests_total += s.requests_total
            out.errors_total += s.errors_total
            out.in_flight += s.in_flight
            for code, n in s.by_code.items():
                out.by_code[code] = out.by_code.get(code, 0) + n
            if s.last_latency_ms is not None and entry.changed_at > latest_change:
                latest_change, out.last_latency_ms = entry.changed_at, s.last_latency_ms
            if s.last_error is not None and entry.error_at > latest_error:
                latest_error, out.last_error = entry.error_at, s.last_error
        return out


REQUEST_EVENT = "request"
"""A worker's answered request, for the supervisor's web console."""
_OBSERVED_BYTES = 4096


def request_line(seen: Observed) -> bytes:
    """One `request` report: an answered request, its payloads cut to 4 KiB (base64)."""
    body = {
        "event": REQUEST_EVENT,
        "method": seen.method,
        "suffix": seen.suffix,
        "transaction": seen.transaction,
        "code": seen.code,
        "http_status": seen.http_status,
        "duration_ms": seen.duration_ms,
        "request_head": base64.b64encode(seen.request_head[:_OBSERVED_BYTES]).decode(),
        "request_size": seen.request_size,
        "reply": base64.b64encode(seen.reply[:_OBSERVED_BYTES]).decode(),
        "reply_size": len(seen.reply),
        "reply_type": seen.reply_type,
    }
    return dumps(body) + b"\n"


def parse_request(line: bytes) -> Observed | None:
    """A `request` report as the Observed it carries, or None when it is not one."""
    try:
        body = loads(line)
        if not isinstance(body, dict) or body.get("event") != REQUEST_EVENT:
            return None
        return Observed(
            str(body["method"]),
            str(body["suffix"]),
            body.get("transaction"),
            body.get("code"),
            body.get("http_status"),
            float(body["duration_ms"]),
            base64.b64decode(body["request_head"]),
            int(body["request_size"]),
            base64.b64decode(body["reply"]),
            body.get("reply_type"),
            int(body["reply_size"]),
        )
    except (ValueError, KeyError, TypeError):
        return None
