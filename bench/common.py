"""Shared pieces of the benchmark: canned payloads, /proc readings, percentiles, paho set-up."""

from __future__ import annotations

import contextlib
import math
import os
import socket
from dataclasses import dataclass
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

MIB = 1024 * 1024
TICKS = os.sysconf("SC_CLK_TCK")

PREFIX = "openai"
MODEL = "gpt-4o-mini"
BROKER_INFLIGHT = 1000
"""Mosquitto's max_inflight_messages (also the Receive Maximum it announces to MQTT 5 clients)."""

CHAT_COMPLETION: dict[str, Any] = {
    "id": "chatcmpl-AXkq9Lz3bT0mWcE2RjYf8hUoNpQs1",
    "object": "chat.completion",
    "created": 1732579200,
    "model": "gpt-4o-mini-2024-07-18",
    "choices": [
        {
            "index": 0,
            "message": {
                "role": "assistant",
                "content": "Hello! How can I assist you today?",
                "refusal": None,
            },
            "logprobs": None,
            "finish_reason": "stop",
        }
    ],
    "usage": {
        "prompt_tokens": 9,
        "completion_tokens": 9,
        "total_tokens": 18,
        "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
        "completion_tokens_details": {
            "reasoning_tokens": 0,
            "audio_tokens": 0,
            "accepted_prediction_tokens": 0,
            "rejected_prediction_tokens": 0,
        },
    },
    "system_fingerprint": "fp_0ba0d124f1",
}
"""What the stand-in upstream answers to createChatCompletion (a real answer's shape and size)."""


@dataclass(frozen=True, slots=True)
class ProcSample:
    """CPU seconds (user + system) and memory of a process and its descendants at one moment."""

    cpu_s: float
    rss_mib: float
    hwm_mib: float
    """The sum of each process's own peak (with `[runtime] workers`: an upper bound)."""
    processes: int = 1


def process_tree(pid: int) -> list[int]:
    """`pid` and its descendants (a supervisor's workers), from /proc/<pid>/task/*/children."""
    out, todo = [], [pid]
    while todo:
        current = todo.pop()
        out.append(current)
        try:
            tasks = os.listdir(f"/proc/{current}/task")
        except OSError:
            continue
        for task in tasks:
            try:
                with open(f"/proc/{current}/task/{task}/children", "rb") as fh:
                    todo.extend(int(child) for child in fh.read().split())
            except OSError:
                continue
    return out


def _one_sample(pid: int) -> ProcSample | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            stat = fh.read()
        with open(f"/proc/{pid}/status", "rb") as fh:
            status = fh.read()
    except OSError:
        return None
    fields = stat[stat.rindex(b")") + 2 :].split()
    cpu = (int(fields[11]) + int(fields[12])) / TICKS  # utime + stime (fields 14 and 15)
    rss = hwm = 0.0
    for line in status.splitlines():
        if line.startswith(b"VmRSS:"):
            rss = int(line.split()[1]) / 1024
        elif line.startswith(b"VmHWM:"):
            hwm = int(line.split()[1]) / 1024
    return ProcSample(cpu, rss, hwm)


def proc_sample(pid: int) -> ProcSample | None:
    """CPU and memory of `pid` and its descendants summed; None when `pid` is gone."""
    top = _one_sample(pid)
    if top is None:
        return None
    samples = [top, *(s for child in process_tree(pid)[1:] if (s := _one_sample(child)))]
    return ProcSample(
        sum(s.cpu_s for s in samples),
        sum(s.rss_mib for s in samples),
        sum(s.hwm_mib for s in samples),
        len(samples),
    )


def machine_cpu_s() -> tuple[float, float]:
    """(busy, steal) CPU seconds of all CPUs since boot, from the first line of /proc/stat.

    Busy is user + nice + system + irq + softirq; steal (a VM's CPU taken by its host's other
    guests) is apart: it is time this machine did not get, not time it spent.
    """
    with open("/proc/stat", "rb") as fh:
        user, nice, system, _idle, _iowait, irq, softirq, steal = (
            int(x) for x in fh.readline().split()[1:9]
        )
    return (user + nice + system + irq + softirq) / TICKS, steal / TICKS


def reset_peak_rss(pid: int) -> bool:
    """Reset VmHWM to the current RSS (Linux clear_refs 5) for `pid` and its descendants;
    False if not allowed."""
    try:
        for member in process_tree(pid):
            with open(f"/proc/{member}/clear_refs", "w") as fh:
                fh.write("5")
    except OSError:
        return False
    return True


def percentile(sorted_values: list[float], pct: float) -> float:
    """Nearest-rank percentile of an ascending list (0.0 for an empty one)."""
    if not sorted_values:
        return 0.0
    rank = max(1, math.ceil(pct / 100 * len(sorted_values)))
    return sorted_values[min(rank, len(sorted_values)) - 1]


def latency_summary(latencies_ms: list[float]) -> dict[str, float]:
    """p50/p90/p99/max/mean of latencies in milliseconds."""
    values = sorted(latencies_ms)
    mean = sum(values) / len(values) if values else 0.0
    return {
        "p50_ms": round(percentile(values, 50), 3),
        "p90_ms": round(percentile(values, 90), 3),
        "p99_ms": round(percentile(values, 99), 3),
        "max_ms": round(values[-1], 3) if values else 0.0,
        "mean_ms": round(mean, 3),
    }


def free_port() -> int:
    """A loopback TCP port that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def nodelay(client: paho.Client, userdata: Any, sock: Any) -> None:
    """paho on_socket_open hook: turn Nagle off so small packets leave at once."""
    with contextlib.suppress(OSError, AttributeError):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def make_client(client_id: str) -> paho.Client:
    """A paho MQTT 5 client with TCP_NODELAY and no client-side in-flight window."""
    client = paho.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=paho.MQTTv5)
    # 0 = no client-side window: paho then skips a scan of every unacknowledged message on each
    # PUBACK (O(in-flight) per ack). The harness never has more than C <= BROKER_INFLIGHT out.
    client.max_inflight_messages_set(0)
    client.max_queued_messages_set(0)
    client.on_socket_open = nodelay
    return client
