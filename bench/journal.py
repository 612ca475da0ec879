"""What the journal costs per request: bridge CPU and bytes written to storage, per scope.

For each journal setting a fresh bridge (own broker, the instant upstream of upstream.py) answers
`--count` chat requests at concurrency C after a warm-up; the bridge's CPU time (utime + stime)
and the bytes it caused to be written to storage (`write_bytes` of /proc/<pid>/io: page-cache
writeback and fsyncs, not socket traffic) are read before and after the measured window. Logging
is at `warning`, so the journal is the only writer. Settings, alternated over `--reps` rounds:

- off: no journal;
- jobs: only job-creating operations journal (chat is not one: the cost of having it on);
- answers (full): every answer committed with an fsync per commit (power-loss-safe);
- answers (normal): every answer appended to the tail file, in SQLite every 1 MiB (crash-safe;
  the default since issue 27).

Bytes are read two ways: `write_bytes` (what reaches the block layer: page-cache pages the
process dirtied, 4 KiB each, counted when first dirtied) and `wchar` (every byte the process
passed to write(2)/writev(2), sockets included: the table shows it over the `off` run's, i.e.
what the journal added). A run should be long enough for the WAL's checkpoints (every 16 MiB)
and the tail file's hand-overs (every 1 MiB) to fall inside it several times: with the default
`normal` at about 2 KB a request, 40,000 requests (`--count 40000 --levels 1`). `--chat-bytes`
makes the stand-in's chat answer about that size (0: its short 580-byte reply); the table names
the reply's size.

    .venv/bin/python bench/journal.py                 # C = 1 and 16, 2,000 requests, 3 rounds
    .venv/bin/python bench/journal.py --count 500 --reps 1
    .venv/bin/python bench/journal.py --levels 1 --chat-bytes 1000 --src DIR   # another bridge/
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from common import free_port, make_client

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
PY = sys.executable
SETTINGS: dict[str, dict[str, str]] = {
    "off": {"scope": "off"},
    "jobs": {"scope": "jobs"},
    "answers-full": {"scope": "answers", "synchronous": "full"},
    "answers-normal": {"scope": "answers", "synchronous": "normal"},
}


def proc_io(pid: int) -> tuple[int, int]:
    """(write_bytes, wchar) of the process so far: bytes it caused to reach storage, bytes it
    passed to write calls."""
    fields = {}
    with open(f"/proc/{pid}/io") as fh:
        for line in fh:
            name, _, value = line.partition(":")
            fields[name] = int(value)
    return fields["write_bytes"], fields["wchar"]


def reply_size(mqtt_port: int, tag: str) -> int:
    """The size of the reply payload the bridge publishes for the bench's chat request."""
    import threading

    got: list[int] = []
    done = threading.Event()
    client = make_client(f"journal-bench-size-{tag}")

    def on_message(client: Any, userdata: Any, message: Any) -> None:
        got.append(len(message.payload))
        done.set()

    client.on_message = on_message
    client.connect("127.0.0.1", mqtt_port)
    client.subscribe(f"openai/response/createChatCompletion/{tag}/#", qos=1)
    client.loop_start()
    try:
        body = {
            "transaction": 1,
            "model": "gpt-4o-mini",
            "messages": [{"role": "user", "content": "hi"}],
        }
        client.publish(f"openai/request/createChatCompletion/{tag}/1", json.dumps(body), qos=1)
        if not done.wait(20):
            raise SystemExit("no reply to the size probe")
    finally:
        client.disconnect()
        client.loop_stop()
    return got[0]


def wait_port(port: int, timeout: float = 10.0) -> None:
    """Until something listens on 127.0.0.1:port."""
    import socket

    end = time.monotonic() + timeout
    while time.monotonic() < end:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise SystemExit(f"nothing listens on port {port}")


def wait_online(mqtt_port: int, instance: str, timeout: float = 20.0) -> None:
    """Until the bridge `instance` announced `online` on its retained state topic."""
    import threading

    online = threading.Event()
    client = make_client(f"journal-bench-wait-{instance}")

    def on_message(client: Any, userdata: Any, message: Any) -> None:
        if b"online" in message.payload:
            online.set()

    client.on_message = on_message
    client.connect("127.0.0.1", mqtt_port)
    client.subscribe(f"openai/bridge/{instance}/state", qos=1)
    client.loop_start()
    try:
        if not online.wait(timeout):
            raise SystemExit(f"bridge {instance} not online in {timeout} s")
    finally:
        client.disconnect()
        client.loop_stop()


def bridge_config(workdir: Path, name: str, mqtt_port: int, api_port: int) -> Path:
    """One bench bridge's config: own client id, warnings only, the journal in `workdir`."""
    journal = SETTINGS[name]
    lines = [
        "[mqtt]",
        f'host = "127.0.0.1"\nport = {mqtt_port}\ninstance = "j-{name}"\nsession_expiry = 0',
        "[service]",
        f'api_base = "http://127.0.0.1:{api_port}/v1"',
        "[limits]\nmax_concurrency = 64",
        '[logging]\nlevel = "warning"\nformat = "json"',
        "[homeassistant]\ndiscovery = false\nstats_interval = 0",
        "[journal]",
        f'path = "{workdir / name / "journal.sqlite3"}"',
        *(f'{key} = "{value}"' for key, value in journal.items()),
    ]
    path = workdir / f"{name}.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def run_one(
    workdir: Path,
    name: str,
    mqtt_port: int,
    api_port: int,
    count: int,
    concurrency: int,
    tag: str,
    src: Path = ROOT,
) -> dict[str, Any]:
    """Start a bridge with setting `name`, load it, return CPU and bytes per request."""
    shutil.rmtree(workdir / name, ignore_errors=True)
    config = bridge_config(workdir, name, mqtt_port, api_port)
    log = open(workdir / f"{name}.log", "ab")  # noqa: SIM115 - closed below
    env = {**os.environ, "OPENAI_API_KEY": "sk-bench", "PYTHONPATH": str(src)}
    bridge = subprocess.Popen(
        [PY, "-m", "bridge", "--config", str(config)], stdout=log, stderr=subprocess.STDOUT, env=env
    )
    try:
        wait_online(mqtt_port, f"j-{name}")
        load = [PY, str(HERE / "loadgen.py"), "--port", str(mqtt_port), "--tag", tag]
        warm = subprocess.run(
            [*load, "--count", "200", "--concurrency", str(concurrency)],
            capture_output=True,
            check=True,
        )
        assert json.loads(warm.stdout)["lost"] == 0, warm.stdout
        size = reply_size(mqtt_port, tag + "s")
        written, wchar = proc_io(bridge.pid)
        out = subprocess.run(
            [
                *load[:-1],
                tag + "m",
                "--count",
                str(count),
                "--concurrency",
                str(concurrency),
                "--watch",
                f"bridge={bridge.pid}",
            ],
            capture_output=True,
            check=True,
        )
        after = proc_io(bridge.pid)
        written, wchar = after[0] - written, after[1] - wchar
        result = json.loads(out.stdout)
        if result["lost"] or result["errors"]:
            raise SystemExit(f"{name}: {result['lost']} lost, {result['errors']} errors")
        replies = result["window_replies"]
        return {
            "setting": name,
            "concurrency": concurrency,
            "throughput_rps": result["throughput_rps"],
            "cpu_us_per_request": round(1e6 * result["processes"]["bridge"]["cpu_s"] / replies, 1),
            "bytes_written_per_request": round(written / count),
            "wchar_per_request": round(wchar / count),
            "reply_bytes": size,
        }
    finally:
        bridge.send_signal(signal.SIGTERM)
        bridge.wait(30)
        log.close()


def main() -> None:
    """Run every setting `--reps` times at each C, print the medians as a Markdown table."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--count", type=int, default=2000)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--levels", default="1,16")
    parser.add_argument("--chat-bytes", type=int, default=0, help="chat answer of about N bytes")
    parser.add_argument("--src", type=Path, default=ROOT, help="the folder holding bridge/")
    parser.add_argument("--settings", default=",".join(SETTINGS), help="which, comma-separated")
    args = parser.parse_args()
    settings = args.settings.split(",")
    mosquitto = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    workdir = Path(tempfile.mkdtemp(prefix="omb-journal-bench-"))
    mqtt_port, api_port = free_port(), free_port()
    upstream = [PY, str(HERE / "upstream.py"), "--listen", f"{api_port}:0"]
    (workdir / "mosquitto.conf").write_text(
        f"listener {mqtt_port} 127.0.0.1\nallow_anonymous true\nset_tcp_nodelay true\n"
        "max_queued_messages 100000\nmax_inflight_messages 1000\npersistence false\n"
    )
    services = [
        subprocess.Popen(
            [mosquitto, "-c", str(workdir / "mosquitto.conf")],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        ),
        subprocess.Popen([*upstream, "--chat-bytes", str(args.chat_bytes)]),
    ]
    rows: list[dict[str, Any]] = []
    try:
        wait_port(mqtt_port)
        wait_port(api_port)
        for concurrency in (int(c) for c in args.levels.split(",")):
            for rep in range(args.reps):
                for name in settings:
                    tag = f"{name}-{concurrency}-{rep}"
                    row = run_one(
                        workdir, name, mqtt_port, api_port, args.count, concurrency, tag, args.src
                    )
                    print(json.dumps(row), file=sys.stderr)
                    rows.append(row)
    finally:
        for proc in services:
            proc.terminate()
            proc.wait(10)
        shutil.rmtree(workdir, ignore_errors=True)
    print(
        "| setting | C | reply bytes | req/s | bridge CPU µs/request | write_bytes/request "
        "| wchar/request over off |\n|---|---:|---:|---:|---:|---:|---:|"
    )
    for concurrency in sorted({r["concurrency"] for r in rows}):
        mine = [r for r in rows if r["concurrency"] == concurrency]
        base = [r["wchar_per_request"] for r in mine if r["setting"] == "off"]
        off = statistics.median(base) if base else 0
        for name in settings:
            its = [r for r in mine if r["setting"] == name]
            print(
                f"| {name} | {concurrency} "
                f"| {statistics.median(r['reply_bytes'] for r in its):,.0f} "
                f"| {statistics.median(r['throughput_rps'] for r in its):,.0f} "
                f"| {statistics.median(r['cpu_us_per_request'] for r in its):,.0f} "
                f"| {statistics.median(r['bytes_written_per_request'] for r in its):,.0f} "
                f"| {statistics.median(r['wchar_per_request'] for r in its) - off:,.0f} |"
            )


if __name__ == "__main__":
    main()
