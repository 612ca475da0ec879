"""Realtime audio through the bridge: added latency per 20 ms chunk of 24 kHz PCM16 per hop, CPU.

Every piece is its own process: Mosquitto, the WebSocket stand-in (the "far end"), the devices
(one MQTT connection, one thread, sessions spread over each 20 ms tick) and the bridge; with two
or more CPUs the bridge is pinned to one and everything else to another (`--bridge-cpu`,
`--harness-cpu`). Each run is done twice with the same devices and the same pacing:

- *bridge*: device -> broker -> bridge -> WebSocket -> stand-in (hop in), stand-in -> WebSocket ->
  bridge -> broker -> device (hop out);
- *baseline*: the same chunks looped through the broker without the bridge: device -> broker ->
  a plain MQTT client in the far end's place (hop in), which publishes them straight back to the
  device (hop out).

The bridge's added latency per hop is the bridge run's percentile minus the baseline's. Times
are CLOCK_MONOTONIC (`time.perf_counter`), shared by the processes of one machine.

    .venv/bin/python bench/realtime.py --sessions 1,20 --seconds 10 --reps 3 [--fifo 10]

`--fifo N` runs every bench process under SCHED_FIFO (root), so that the other work of a shared
host does not preempt them; `merge A.json B.json ...` prints one table of several runs
(bench/README.md#realtime-audio-issue-24).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import select
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho

sys.path[:0] = [str(Path(__file__).resolve().parents[1] / "tests"), str(Path(__file__).parent)]

from common import TICKS, latency_summary, machine_cpu_s, make_client  # noqa: E402
from support.bridge_runner import BridgeProcess, make_config  # noqa: E402
from support.broker import MosquittoBroker  # noqa: E402

CHUNK = 960
"""20 ms of 24 kHz mono PCM16."""
TICK = 0.02
RESULTS = Path(__file__).parent / "results"
LOOP = "benchloop"
"""The baseline's topic root (no bridge subscribes to it)."""


def pin(pid: int, cpu: int | None) -> None:
    """Every thread of `pid` on `cpu` (what `taskset -a -p -c` does); nothing when None."""
    if cpu is None:
        return
    for tid in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(OSError):  # a thread that just ended
            os.sched_setaffinity(int(tid), {cpu})


# --- devices (own process) ------------------------------------------------------------------------


def devices_main(args: argparse.Namespace) -> None:
    """N devices on one connection and one thread: open (bridge), stream, collect, close."""
    n, prefix, bridge = args.sessions, args.prefix, args.mode == "bridge"
    sent: dict[bytes, float] = {}
    received: dict[bytes, float] = {}
    opened: set[str] = set()
    client = make_client(f"bench-devices-{prefix}-{os.getpid()}")

    def on_message(client: Any, userdata: Any, msg: paho.MQTTMessage) -> None:
        if msg.topic.endswith("/audio") or msg.topic.endswith("/out"):
            received[bytes(msg.payload[:8])] = time.perf_counter()
        elif msg.topic.endswith("/state") and b'"open"' in msg.payload:
            opened.add(msg.topic)

    def topic(i: int, verb: str) -> str:
        if bridge:
            return f"{prefix}/request/realtime/s{i}/{verb}"
        return f"{LOOP}/s{i}/in"

    def pump(until: float) -> None:
        while True:
            left = until - time.perf_counter()
            if left <= 0:
                return
            client.loop(timeout=left)

    client.on_message = on_message
    client.connect("127.0.0.1", args.port)
    if bridge:
        client.subscribe(f"{prefix}/response/realtime/+/audio", qos=1)
        client.subscribe(f"{prefix}/response/realtime/+/state", qos=1)
    else:
        client.subscribe(f"{LOOP}/+/out", qos=1)
    pump(time.perf_counter() + 0.3)
    if bridge:
        for i in range(n):
            client.publish(topic(i, "open"), json.dumps({"outputs": ["audio"]}), qos=1)
        deadline = time.perf_counter() + 20
        while len(opened) < n and time.perf_counter() < deadline:
            client.loop(timeout=0.05)
        if len(opened) < n:
            raise SystemExit(f"{len(opened)} of {n} sessions opened")
    print("streaming", flush=True)
    ticks = int(args.seconds / TICK)
    start = time.perf_counter() + 0.05
    # Devices are independent: session i sends at i/n of each tick, not all at once (unless
    # --aligned: every session at the start of each tick, a burst of n chunks).
    spread = 0.0 if args.aligned else TICK / n
    schedule = sorted((start + k * TICK + i * spread, i, k) for k in range(ticks) for i in range(n))
    for due, i, k in schedule:
        pump(due)
        head = i.to_bytes(2, "big") + k.to_bytes(6, "big")
        sent[head] = time.perf_counter()
        client.publish(topic(i, "audio"), head + bytes(CHUNK - 8), qos=1)
    end = time.perf_counter()
    print("streamed", flush=True)
    deadline = end + 5
    while len(received) < len(sent) and time.perf_counter() < deadline:
        client.loop(timeout=0.05)
    if bridge:
        for i in range(n):
            client.publish(topic(i, "close"), b"", qos=1)
    pump(time.perf_counter() + 0.3)
    client.disconnect()
    out = {
        "sent": {h.hex(): t for h, t in sent.items()},
        "received": {h.hex(): t for h, t in received.items()},
        "window": [start, end],
    }
    print(json.dumps(out), flush=True)


# --- far end (own process): the WebSocket stand-in, or a plain MQTT client for the baseline ------


def far_main(args: argparse.Namespace) -> None:
    """The stand-in (`ws`) or the loop (`mqtt`); prints its port, dumps its stamps on stdin EOF."""
    arrivals: dict[str, float] = {}
    echoed: dict[str, float] = {}
    if args.mode == "ws":
        from support.realtime_standin import RealtimeStandin

        standin = RealtimeStandin()
        standin.behaviour, standin.validate = "echo", False
        standin.start()
        print(json.dumps({"url": standin.url}), flush=True)
        sys.stdin.read()
        standin.stop()
        for conn in standin.connections:
            arrivals.update((h.hex(), t) for t, h in conn.arrivals)
            echoed.update((h.hex(), t) for t, h in conn.echoed)
    else:
        client = make_client(f"bench-far-{os.getpid()}")

        def on_message(client: Any, userdata: Any, msg: paho.MQTTMessage) -> None:
            head = bytes(msg.payload[:8])
            arrivals[head.hex()] = time.perf_counter()
            echoed[head.hex()] = time.perf_counter()
            out = msg.topic[: -len("/in")] + "/out"
            client.publish(out, msg.payload, qos=args.qos)

        client.on_message = on_message
        client.connect("127.0.0.1", args.port)
        client.subscribe(f"{LOOP}/+/in", qos=1)
        print(json.dumps({"url": ""}), flush=True)
        stdin = sys.stdin.fileno()
        while True:
            client.loop(timeout=0.0)
            if client.want_write():  # an echo queued from on_message
                client.loop_write()
            ready, _, _ = select.select([stdin, client.socket()], [], [], 1.0)
            if stdin in ready and not os.read(stdin, 4096):
                break
        client.disconnect()
    print(json.dumps({"arrivals": arrivals, "echoed": echoed}), flush=True)


# --- the orchestrator -----------------------------------------------------------------------------


def spawn(*argv: str, cpu: int | None) -> subprocess.Popen[str]:
    """This script in `argv`'s role, pinned."""
    proc = subprocess.Popen(
        [sys.executable, __file__, *argv],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    pin(proc.pid, cpu)
    return proc


def cpu_split(pids: list[int]) -> tuple[float, float]:
    """(user, system) CPU seconds of the processes themselves so far, children not counted."""
    user = system = 0.0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        user += int(fields[11]) / TICKS
        system += int(fields[12]) / TICKS
    return user, system


def cpu_of(pids: list[int]) -> float:
    """CPU seconds (user + system) of the processes themselves so far, children not counted."""
    return sum(cpu_split(pids))


def one_run(
    mode: str, sessions: int, args: argparse.Namespace, broker: MosquittoBroker, workdir: Path
) -> dict[str, Any]:
    """One bridge or baseline run: the hops' latencies and each process's CPU over the window."""
    far = spawn(
        "far",
        "--mode",
        "ws" if mode == "bridge" else "mqtt",
        "--port",
        str(broker.port),
        "--qos",
        str(args.audio_qos),
        cpu=args.harness_cpu,
    )
    assert far.stdout is not None and far.stdin is not None
    url = json.loads(far.stdout.readline())["url"]
    bridge: BridgeProcess | None = None
    prefix = f"bench{sessions}x{os.getpid()}{time.monotonic_ns() % 100000}"
    try:
        if mode == "bridge":
            path, env = make_config(
                workdir,
                broker_port=broker.port,
                api_base=url,
                prefix=prefix,
                extra={
                    "logging": {"level": "info"},
                    "realtime": {"max_sessions": 64, "audio_qos": args.audio_qos},
                },
            )
            bridge = BridgeProcess(path, env, workdir / f"bridge-{prefix}.log")
            # `-m bridge` looks in the working folder first: that is the temporary one (main()).
            bridge.env["PYTHONPATH"] = args.bridge_src or str(Path(__file__).resolve().parents[1])
            bridge.start()
            assert bridge.proc is not None
            pin(bridge.proc.pid, args.bridge_cpu)
        devices = spawn(
            "devices",
            "--mode",
            mode,
            "--port",
            str(broker.port),
            "--prefix",
            prefix,
            "--sessions",
            str(sessions),
            "--seconds",
            str(args.seconds),
            *(["--aligned"] if args.aligned else []),
            cpu=args.harness_cpu,
        )
        assert devices.stdout is not None
        harness = [far.pid, devices.pid, os.getpid(), *([broker.pid] if broker.pid else [])]
        line = devices.stdout.readline().strip()
        if line != "streaming":
            raise SystemExit(f"devices: {line!r}")
        bridge_pid = bridge.proc.pid if bridge is not None and bridge.proc else None
        spy = None
        if args.profile and bridge_pid:
            spy = subprocess.Popen(
                [
                    str(Path(sys.executable).parent / "py-spy"),
                    "record",
                    "--pid",
                    str(bridge_pid),
                    "--rate",
                    str(args.profile_rate),
                    "--format",
                    "raw",
                    "--output",
                    str(Path(args.profile) / f"{prefix}.txt"),
                    *(["--native"] if args.profile_native else []),
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            pin(spy.pid, args.harness_cpu)
        bridge_pids = [bridge_pid] if bridge_pid else []
        cpu0 = {"bridge": cpu_split(bridge_pids), "harness": cpu_of(harness)}
        machine0, t0 = machine_cpu_s()[0], time.monotonic()
        if devices.stdout.readline().strip() != "streamed":
            raise SystemExit("devices did not finish")
        cpu1 = {"bridge": cpu_split(bridge_pids), "harness": cpu_of(harness)}
        machine1, t1 = machine_cpu_s()[0], time.monotonic()
        if spy is not None:
            spy.send_signal(signal.SIGINT)
            spy.wait(30)
        result = json.loads(devices.stdout.readline())
        devices.wait(30)
    finally:
        if bridge is not None:
            bridge.terminate()
        far.stdin.close()
    stamps = json.loads(far.stdout.read().strip().splitlines()[-1])
    far.wait(30)
    sent, received = result["sent"], result["received"]
    arrivals, echoed = stamps["arrivals"], stamps["echoed"]
    hop_in = [(arrivals[h] - t) * 1000 for h, t in sent.items() if h in arrivals]
    hop_out = [(received[h] - echoed[h]) * 1000 for h in sent if h in received and h in echoed]
    window = t1 - t0
    bridge_user = cpu1["bridge"][0] - cpu0["bridge"][0]
    bridge_cpu = bridge_user + cpu1["bridge"][1] - cpu0["bridge"][1]
    harness_cpu = cpu1["harness"] - cpu0["harness"]
    return {
        "mode": mode,
        "sessions": sessions,
        "chunks_sent": len(sent),
        "chunks_in": len(hop_in),
        "chunks_back": len(hop_out),
        "hop_in": latency_summary(hop_in),
        "hop_out": latency_summary(hop_out),
        "window_s": round(window, 3),
        "bridge_cpu_s": round(bridge_cpu, 3),
        "bridge_user_share": round(bridge_user / bridge_cpu, 3) if bridge_cpu else 0.0,
        "cpu_ms_per_session_second": round(bridge_cpu * 1000 / (sessions * window), 3),
        "bridge_cores": round(bridge_cpu / window, 3),
        "harness_cores": round(harness_cpu / window, 3),
        "other_cores": round((machine1 - machine0 - bridge_cpu - harness_cpu) / window, 3),
    }


def summarize(runs: list[dict[str, Any]], sessions: int) -> dict[str, Any]:
    """Medians over the repetitions: each hop's bridge and baseline percentiles and the added."""
    mine = [r for r in runs if r["sessions"] == sessions]
    out: dict[str, Any] = {"sessions": sessions}
    for hop in ("hop_in", "hop_out"):
        for pct in ("p50_ms", "p99_ms"):
            with_bridge = [r[hop][pct] for r in mine if r["mode"] == "bridge"]
            baseline = [r[hop][pct] for r in mine if r["mode"] == "baseline"]
            added = [b - a for a, b in zip(baseline, with_bridge, strict=True)]
            out[f"{hop}_{pct}"] = {
                "bridge": round(statistics.median(with_bridge), 3),
                "baseline": round(statistics.median(baseline), 3),
                "added": round(statistics.median(added), 3),
            }
    bridge_runs = [r for r in mine if r["mode"] == "bridge"]
    for key in ("cpu_ms_per_session_second", "bridge_cores", "harness_cores", "other_cores"):
        out[key] = round(statistics.median(r[key] for r in bridge_runs), 3)
    return out


def table(summaries: list[dict[str, Any]]) -> str:
    """The summaries as a Markdown table."""
    rows = [
        "| sessions | hop | p50 bridge / baseline / **added** (ms) "
        "| p99 bridge / baseline / **added** (ms) | CPU ms per session-second | bridge cores "
        "| harness cores | other cores |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for s in summaries:
        for hop in ("hop_in", "hop_out"):
            p50, p99 = s[f"{hop}_p50_ms"], s[f"{hop}_p99_ms"]
            rows.append(
                f"| {s['sessions']} | {hop.removeprefix('hop_')} "
                f"| {p50['bridge']} / {p50['baseline']} / **{p50['added']}** "
                f"| {p99['bridge']} / {p99['baseline']} / **{p99['added']}** "
                f"| {s['cpu_ms_per_session_second']} | {s['bridge_cores']} "
                f"| {s['harness_cores']} | {s['other_cores']} |"
            )
    return "\n".join(rows)


def main() -> None:
    """The runs (baseline and bridge alternating), medians, a table and the JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="role")
    dev = sub.add_parser("devices")
    dev.add_argument("--mode", choices=("bridge", "baseline"), required=True)
    dev.add_argument("--port", type=int, required=True)
    dev.add_argument("--prefix", required=True)
    dev.add_argument("--sessions", type=int, required=True)
    dev.add_argument("--seconds", type=float, required=True)
    dev.add_argument("--aligned", action="store_true")
    far = sub.add_parser("far")
    far.add_argument("--mode", choices=("ws", "mqtt"), required=True)
    far.add_argument("--port", type=int, required=True)
    far.add_argument("--qos", type=int, default=1)
    merge = sub.add_parser("merge", help="one table of the runs of several JSON files")
    merge.add_argument("files", nargs="+")
    parser.add_argument("--sessions", default="1,20")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument(
        "--aligned", action="store_true", help="every session sends at the start of each tick"
    )
    parser.add_argument("--audio-qos", type=int, choices=(0, 1), default=1)
    parser.add_argument("--profile", default="", help="py-spy the bridge runs into this folder")
    parser.add_argument("--profile-rate", type=int, default=250, help="py-spy samples a second")
    parser.add_argument("--profile-native", action="store_true", help="py-spy --native")
    parser.add_argument("--bridge-src", default="", help="a tree whose bridge/ package to run")
    two = (os.cpu_count() or 1) >= 2
    parser.add_argument("--bridge-cpu", type=int, default=0 if two else None)
    parser.add_argument("--harness-cpu", type=int, default=1 if two else None)
    parser.add_argument("--nice", type=int, default=0, help="niceness of every bench process")
    parser.add_argument(
        "--fifo", type=int, default=0, help="SCHED_FIFO priority of every bench process (root)"
    )
    parser.add_argument("--out", default=str(RESULTS / "realtime-latest.json"))
    args = parser.parse_args()
    if args.role == "devices":
        devices_main(args)
        return
    if args.role == "far":
        far_main(args)
        return
    if args.role == "merge":
        runs = [run for name in args.files for run in json.loads(Path(name).read_text())["runs"]]
        levels = sorted({run["sessions"] for run in runs})
        print(table([summarize(runs, n) for n in levels]))
        return
    if args.nice:
        os.nice(args.nice)  # inherited by the broker, the far end, the devices and the bridge
    if args.fifo:
        # Inherited too: every bench process preempts the host's other (SCHED_OTHER) work.
        os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(args.fifo))
    if args.harness_cpu is not None:
        os.sched_setaffinity(0, {args.harness_cpu})
    levels = [int(n) for n in args.sessions.split(",")]
    args.out = str(Path(args.out).resolve())
    args.bridge_src = str(Path(args.bridge_src).resolve()) if args.bridge_src else ""
    runs: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        os.chdir(workdir)
        broker = MosquittoBroker(workdir / "mosquitto", max_inflight_messages=1000)
        broker.start()
        try:
            assert broker.pid is not None
            pin(broker.pid, args.harness_cpu)
            for rep in range(args.reps):
                for sessions in levels:
                    order = ("baseline", "bridge") if rep % 2 == 0 else ("bridge", "baseline")
                    for mode in order:
                        run = one_run(mode, sessions, args, broker, workdir)
                        run["rep"] = rep
                        runs.append(run)
                        print(json.dumps(run), file=sys.stderr, flush=True)
        finally:
            broker.close()
    summaries = [summarize(runs, n) for n in levels]
    results = {
        "summaries": summaries,
        "runs": runs,
        "args": {k: v for k, v in vars(args).items() if k != "role"},
        "cpus": os.cpu_count(),
        "loadavg": os.getloadavg(),
        "at": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
    }
    Path(args.out).write_text(json.dumps(results, indent=1) + "\n")
    print(table(summaries))
    print(f"JSON: {args.out}")


if __name__ == "__main__":
    main()
