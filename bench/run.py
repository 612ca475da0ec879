"""One-command benchmark of the bridge against the harness ceiling: `python bench/run.py [--quick]`.

Starts its own Mosquitto (free loopback port), a stand-in service host (instant and 200 ms
listeners), the echo responder (the harness ceiling) and the bridge as separate processes, drives
each with bench/loadgen.py, prints one table and the PASS/FAIL verdict per target, and writes
bench/results/latest.json and bench/chart.png (quick runs: bench/results/quick.json only).
See bench/README.md.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import orjson
import paho.mqtt.client as paho
from paho.mqtt.subscribeoptions import SubscribeOptions

from common import BROKER_INFLIGHT, MIB, MODEL, PREFIX, free_port, make_client, proc_sample

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
RESULTS = BENCH / "results"
PY = sys.executable
BRIDGE_EXE = Path(PY).with_name("openai-mqtt-bridge")
MOSQUITTO_PATHS = ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto", "/usr/bin/mosquitto")
SLOW_MS = 200.0
CONCURRENCY = 128  # the bridge's max_concurrency and max_connections in the bench config


@dataclass(frozen=True, slots=True)
class Plan:
    """Request counts and limits for one benchmark mode."""

    name: str
    chat: dict[int, int]
    """Measured requests per concurrency level, instant upstream (bridge and echo alike)."""
    warmup: int
    slow_count: int
    audio_bytes: int
    audio_count: int
    direct_count: int
    settle_s: float
    time_limit_s: float


FULL = Plan("full", {1: 3000, 16: 10000, 128: 20000}, 500, 9600, 25 * MIB, 3, 1000, 1.5, 120.0)
QUICK = Plan("quick", {1: 300, 16: 1000, 128: 3000}, 100, 768, 4 * MIB, 1, 200, 0.5, 30.0)


@dataclass
class Service:
    """A child process with its log file."""

    name: str
    proc: subprocess.Popen[bytes]
    log_path: Path
    stdout: IO[bytes] | None = None

    @property
    def pid(self) -> int:
        """The process id."""
        return self.proc.pid

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM, wait up to `timeout` s, then SIGKILL; the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        if self.stdout is not None:
            self.stdout.close()
        return self.proc.returncode

    def log_tail(self, chars: int = 1500) -> str:
        """The end of the process's log."""
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""


@dataclass
class Bench:
    """The benchmark's processes, working files and results."""

    plan: Plan
    workdir: Path
    logdir: Path
    broker: Service | None = None
    broker_port: int = 0
    upstream: Service | None = None
    instant_port: int = 0
    slow_port: int = 0
    runs: list[dict[str, Any]] = field(default_factory=list)
    bridges: list[dict[str, Any]] = field(default_factory=list)
    spawned: int = 0

    # --- infrastructure ---------------------------------------------------------------------------

    def spawn(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> Service:
        """Start a child process, stderr to its log file, stdout piped."""
        log_path = self.logdir / f"{name}.log"
        log = log_path.open("ab")
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=log,
            cwd=ROOT,
            env=env,
        )
        log.close()
        return Service(name, proc, log_path, proc.stdout)

    def start_broker(self) -> None:
        """Mosquitto on a free loopback port, with the bench's in-flight and queue limits."""
        exe = shutil.which("mosquitto") or next(
            (p for p in MOSQUITTO_PATHS if os.access(p, os.X_OK)), None
        )
        if exe is None:
            raise SystemExit("mosquitto is not installed: apt-get install -y mosquitto")
        for _ in range(5):
            port = free_port()
            conf = self.workdir / "mosquitto.conf"
            lines = [
                f"listener {port} 127.0.0.1",
                "allow_anonymous true",
                "set_tcp_nodelay true",
                "max_queued_messages 1000000",
                f"max_inflight_messages {BROKER_INFLIGHT}",
                "persistence false",
                "log_dest stderr",
                "log_type error",
                "log_type warning",
                "log_type notice",
            ]
            if os.geteuid() == 0:
                lines.append("user root")
            conf.write_text("\n".join(lines) + "\n")
            broker = self.spawn("mosquitto", [exe, "-c", str(conf)])
            if wait_port(port, broker, 10.0):
                self.broker, self.broker_port = broker, port
                return
            broker.stop()
        raise SystemExit(f"mosquitto did not start; see {self.logdir / 'mosquitto.log'}")

    def start_upstream(self) -> None:
        """The stand-in service host: one process, an instant and a 200 ms listener."""
        upstream = self.spawn(
            "upstream",
            [
                PY,
                str(BENCH / "upstream.py"),
                "--listen",
                "0:0",
                "--listen",
                f"0:{SLOW_MS:g}",
                "--speech-bytes",
                str(self.plan.audio_bytes),
            ],
        )
        line = read_line(upstream, 20.0)
        if not line:
            raise SystemExit(f"the upstream did not start:\n{upstream.log_tail()}")
        self.instant_port, self.slow_port = json.loads(line)["ports"]
        self.upstream = upstream

    def api_base(self, slow: bool = False) -> str:
        """The service URL of the instant or the slow listener."""
        return f"http://127.0.0.1:{self.slow_port if slow else self.instant_port}/v1"

    # --- the bridge -------------------------------------------------------------------------------

    def bridge_config(self, slow: bool, instance: str) -> Path:
        """A bench config: own broker, a stand-in upstream, 128 concurrent, warnings only."""
        path = self.workdir / f"{instance}.toml"
        path.write_text(
            f"""[mqtt]
host = "127.0.0.1"
port = {self.broker_port}
topic_prefix = "{PREFIX}"
instance = "{instance}"
client_id = "{instance}"

[service]
api_base = "{self.api_base(slow)}"
max_connections = {CONCURRENCY}

[limits]
max_concurrency = {CONCURRENCY}
max_request_bytes = {64 * MIB}
shutdown_grace = 2.0

[logging]
level = "warning"
format = "json"

[homeassistant]
discovery = false
stats_interval = 0
"""
        )
        return path

    @contextlib.contextmanager
    def bridge(self, label: str, slow: bool = False) -> Iterator[dict[str, Any]]:
        """Run a fresh bridge (own instance and session); yields its facts (pid, start, idle)."""
        self.spawned += 1
        instance = f"bench-{self.spawned}"
        config = self.bridge_config(slow, instance)
        env = {k: v for k, v in os.environ.items() if not k.startswith("OMB_")}
        env["OPENAI_API_KEY"] = "sk-bench"
        facts: dict[str, Any] = {"label": label, "instance": instance, "slow_upstream": slow}
        with Prober(self.broker_port, instance) as prober:
            started = time.monotonic()
            service = self.spawn(f"bridge-{instance}", [str(BRIDGE_EXE), "--config", str(config)], env)
            first = prober.first_reply(started, service, 30.0)
        facts["pid"] = service.pid
        try:
            if first is None:
                facts["error"] = f"no reply to the probe; bridge log:\n{service.log_tail()}"
                raise BridgeFailed(facts["error"])
            facts["start_to_first_reply_s"] = round(first, 3)
            time.sleep(self.plan.settle_s)
            sample = proc_sample(service.pid)
            facts["idle_rss_mib"] = round(sample.rss_mib, 1) if sample else None
            yield facts
        finally:
            end = proc_sample(service.pid)
            facts["final_rss_mib"] = round(end.rss_mib, 1) if end else None
            facts["alive_at_end"] = service.proc.poll() is None
            facts["exit_code"] = service.stop()
            self.bridges.append(facts)

    # --- load runs --------------------------------------------------------------------------------

    def load(
        self,
        label: str,
        target: str,
        watch: dict[str, int],
        *,
        concurrency: int,
        count: int,
        warmup: int,
        kind: str = "chat",
        size: int = 0,
        direct_url: str = "",
        stall: float = 10.0,
    ) -> dict[str, Any]:
        """Run bench/loadgen.py once and record its result under `label`."""
        tag = f"r{len(self.runs)}"
        argv = [
            PY,
            str(BENCH / "loadgen.py"),
            f"--port={self.broker_port}",
            f"--tag={tag}",
            f"--kind={kind}",
            f"--size={size}",
            f"--count={count}",
            f"--warmup={warmup}",
            f"--concurrency={concurrency}",
            f"--time-limit={self.plan.time_limit_s}",
            f"--stall={stall}",
            f"--direct-count={self.plan.direct_count if kind == 'chat' else 0}",
        ]
        if direct_url:
            argv.append(f"--direct-url={direct_url}")
        for name, pid in watch.items():
            argv.append(f"--watch={name}={pid}")
        print(f"  {label:<22} C={concurrency:<4} n={count:<6}", end="", flush=True)
        started = time.monotonic()
        try:
            proc = subprocess.run(
                argv,
                cwd=ROOT,
                capture_output=True,
                timeout=self.plan.time_limit_s + 120,
                check=False,
            )
            lines = proc.stdout.decode().strip().splitlines()
            if proc.returncode != 0 or not lines:
                raise RuntimeError(proc.stderr.decode(errors="replace")[-1500:] or "no output")
            result: dict[str, Any] = json.loads(lines[-1])
        except (subprocess.TimeoutExpired, RuntimeError, ValueError) as exc:
            result = {"failed": f"load generator failed: {exc}"}
        result.update(label=label, target=target, concurrency=concurrency, kind=kind)
        result["wall_s"] = round(time.monotonic() - started, 1)
        self.runs.append(result)
        if "failed" in result:
            print(" FAILED")
        else:
            print(
                f" {result['throughput_rps']:>8.1f} req/s  p50 {result['p50_ms']:.2f} ms"
                f"  p99 {result['p99_ms']:.2f} ms  lost {result['lost']}  errors {result['errors']}"
            )
        return result

    def watch(self, bridge_pid: int | None = None) -> dict[str, int]:
        """The processes whose CPU and memory a run records."""
        watched = {}
        if bridge_pid is not None:
            watched["bridge"] = bridge_pid
        if self.broker is not None:
            watched["broker"] = self.broker.pid
        if self.upstream is not None:
            watched["upstream"] = self.upstream.pid
        return watched

    # --- the scenarios ----------------------------------------------------------------------------

    def run_echo(self) -> None:
        """The harness ceiling: the echo responder in the bridge's place, every C."""
        echo = self.spawn("echo", [PY, str(BENCH / "echo.py"), f"--port={self.broker_port}"])
        try:
            if read_line(echo, 15.0) != "ready":
                raise BridgeFailed(f"echo responder did not start:\n{echo.log_tail()}")
            for c, n in self.plan.chat.items():
                watch = {"echo": echo.pid, **self.watch()}
                self.load("echo", "echo", watch, concurrency=c, count=n, warmup=self.plan.warmup)
        finally:
            echo.stop()

    def run_instant(self) -> None:
        """The bridge against the instant upstream at every C (C=1 also measures the upstream)."""
        with self.bridge("instant") as facts:
            for c, n in self.plan.chat.items():
                direct = self.api_base() + "/chat/completions" if c == 1 else ""
                self.load(
                    "bridge",
                    "bridge",
                    self.watch(facts["pid"]),
                    concurrency=c,
                    count=n,
                    warmup=self.plan.warmup,
                    direct_url=direct,
                )

    def run_slow(self) -> None:
        """The bridge against the 200 ms upstream at C=128."""
        with self.bridge("200 ms upstream", slow=True) as facts:
            self.load(
                "bridge 200ms",
                "bridge",
                self.watch(facts["pid"]),
                concurrency=CONCURRENCY,
                count=self.plan.slow_count,
                warmup=2 * CONCURRENCY,
                stall=5.0,
            )

    def run_audio(self, kind: str) -> None:
        """One fresh bridge, `audio_count` sequential 25 MiB speech downloads or uploads."""
        mib = self.plan.audio_bytes // MIB
        with self.bridge(f"{kind} {mib} MiB") as facts:
            self.load(
                f"{kind} {mib}MiB",
                "bridge",
                self.watch(facts["pid"]),
                concurrency=1,
                count=self.plan.audio_count,
                warmup=0,
                kind=kind,
                size=self.plan.audio_bytes,
                stall=60.0,
            )

    def guarded(self, what: str, fn: Any, *args: Any) -> None:
        """Run one scenario; a failure is recorded and reported, and the benchmark goes on."""
        try:
            fn(*args)
        except BridgeFailed as exc:
            print(f"  {what}: FAILED: {exc}")
            self.runs.append({"label": what, "target": "bridge", "failed": str(exc)})

    def close(self) -> None:
        """Stop the broker and the upstream."""
        for service in (self.upstream, self.broker):
            if service is not None:
                service.stop()


class BridgeFailed(Exception):
    """A bridge or echo process did not come up or answer."""


class Prober:
    """Publishes a probe request every 10 ms until the first reply: start-to-first-reply time."""

    def __init__(self, port: int, instance: str) -> None:
        self.port = port
        self.topic = f"{PREFIX}/request/createChatCompletion/{instance}-probe/"
        self.reply_at: float | None = None
        self.got = threading.Event()
        self.subscribed = threading.Event()
        self.client = make_client(f"bench-probe-{instance}")
        reply_filter = f"{PREFIX}/response/createChatCompletion/{instance}-probe/+"

        def on_connect(c: paho.Client, u: Any, flags: Any, reason: Any, props: Any) -> None:
            c.subscribe(reply_filter, options=SubscribeOptions(qos=1))

        def on_subscribe(c: paho.Client, u: Any, mid: int, reasons: Any, props: Any) -> None:
            self.subscribed.set()

        def on_message(c: paho.Client, u: Any, msg: paho.MQTTMessage) -> None:
            if self.reply_at is None and msg.payload.startswith(b'{"status":"ok"'):
                self.reply_at = time.monotonic()
                self.got.set()

        self.client.on_connect = on_connect
        self.client.on_subscribe = on_subscribe
        self.client.on_message = on_message

    def __enter__(self) -> Prober:
        self.client.connect("127.0.0.1", self.port)
        self.client.loop_start()
        if not self.subscribed.wait(10):
            raise BridgeFailed("the probe client could not subscribe")
        return self

    def __exit__(self, *exc: object) -> None:
        self.client.disconnect()
        self.client.loop_stop()

    def first_reply(self, started: float, service: Service, timeout: float) -> float | None:
        """Probe until a reply; seconds from `started` to it, or None on timeout or exit."""
        deadline = started + timeout
        k = 0
        while time.monotonic() < deadline and service.proc.poll() is None:
            payload = orjson.dumps(
                {"transaction": k, "model": MODEL, "messages": [{"role": "user", "content": "hi"}]}
            )
            self.client.publish(f"{self.topic}{k}", payload, qos=1)
            k += 1
            if self.got.wait(0.01):
                assert self.reply_at is not None
                return self.reply_at - started
        return None


def wait_port(port: int, service: Service, timeout: float) -> bool:
    """Wait until something accepts connections on 127.0.0.1:`port` (False if the process died)."""
    import socket

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and service.proc.poll() is None:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return True
        time.sleep(0.02)
    return False


def read_line(service: Service, timeout: float) -> str | None:
    """The first stdout line of a child, within `timeout` s."""
    out: list[str] = []

    def reader() -> None:
        assert service.stdout is not None
        out.append(service.stdout.readline().decode().strip())

    thread = threading.Thread(target=reader, daemon=True)
    thread.start()
    thread.join(timeout)
    return out[0] if out else None


# --- results ----------------------------------------------------------------------------------------


def machine_info() -> dict[str, Any]:
    """What the numbers were measured on."""
    model = ""
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as fh:
        for line in fh:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    versions = {}
    for mod in ("paho.mqtt", "aiohttp", "orjson"):
        with contextlib.suppress(Exception):
            versions[mod] = __import__(mod, fromlist=["__version__"]).__version__
    mosquitto = ""
    exe = shutil.which("mosquitto") or next((p for p in MOSQUITTO_PATHS if os.path.exists(p)), "")
    if exe:
        with contextlib.suppress(Exception):
            out = subprocess.run([exe, "-h"], capture_output=True, timeout=5, check=False).stdout
            mosquitto = out.decode().splitlines()[0]
    commit = ""
    with contextlib.suppress(Exception):
        commit = subprocess.run(
            ["git", "-C", str(ROOT), "describe", "--always", "--dirty"],
            capture_output=True,
            timeout=5,
            check=False,
        ).stdout.decode().strip()
    return {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "nproc": len(os.sched_getaffinity(0)),
        "cpu": model,
        "python": platform.python_version(),
        "kernel": platform.release(),
        "mosquitto": mosquitto,
        "libraries": versions,
        "commit": commit,
    }


def find(runs: list[dict[str, Any]], label: str, concurrency: int | None = None) -> dict[str, Any]:
    """The run with `label` (and `concurrency`), or {} when it is missing or failed."""
    for run in runs:
        if run.get("label") == label and concurrency in (None, run.get("concurrency")):
            return run if "failed" not in run else {}
    return {}


def bridge_proc(run: dict[str, Any]) -> dict[str, Any]:
    """The bridge's process figures of a run ({} if none)."""
    procs: dict[str, Any] = run.get("processes", {})
    return procs.get("bridge", {}) or {}


def evaluate(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """Every target with its measured value and PASS/FAIL (n/a when its run failed)."""
    runs, bridges = doc["runs"], doc["bridges"]
    targets: list[dict[str, Any]] = []

    def add(name: str, ok: bool | None, measured: str) -> None:
        targets.append({"target": name, "pass": ok, "measured": measured})

    bridge128, echo128 = find(runs, "bridge", 128), find(runs, "echo", 128)
    if bridge128 and echo128:
        ratio = bridge128["throughput_rps"] / echo128["throughput_rps"]
        add(
            "instant C=128 >= 70% of the echo ceiling, 0 lost",
            ratio >= 0.70 and bridge128["lost"] == 0 and bridge128["errors"] == 0,
            f"{ratio:.0%} ({bridge128['throughput_rps']:.0f} / {echo128['throughput_rps']:.0f}"
            f" req/s), lost {bridge128['lost']}, errors {bridge128['errors']}",
        )
    else:
        add("instant C=128 >= 70% of the echo ceiling, 0 lost", None, "run failed")

    bridge1 = find(runs, "bridge", 1)
    direct = bridge1.get("direct") if bridge1 else None
    if bridge1 and direct:
        over = bridge1["p50_ms"] - direct["p50_ms"]
        add(
            "C=1 median <= 1.0 ms over the upstream's own latency",
            over <= 1.0,
            f"+{over:.2f} ms ({bridge1['p50_ms']:.2f} ms vs upstream {direct['p50_ms']:.2f} ms)",
        )
    else:
        add("C=1 median <= 1.0 ms over the upstream's own latency", None, "run failed")

    slow = find(runs, "bridge 200ms")
    ideal = CONCURRENCY / (SLOW_MS / 1000)
    if slow:
        share = slow["throughput_rps"] / ideal
        add(
            "200 ms upstream, C=128 >= 95% of C/latency",
            share >= 0.95 and slow["lost"] == 0,
            f"{share:.1%} ({slow['throughput_rps']:.0f} of {ideal:.0f} req/s), lost {slow['lost']}",
        )
    else:
        add("200 ms upstream, C=128 >= 95% of C/latency", None, "run failed")

    cpu = bridge_proc(bridge128).get("cpu_ms_per_request")
    add(
        "CPU per request <= 0.45 ms (instant, C=128)",
        None if cpu is None else cpu <= 0.45,
        "run failed" if cpu is None else f"{cpu:.3f} ms",
    )

    peaks = [
        bridge_proc(r).get("peak_rss_mib")
        for r in runs
        if r.get("kind") == "chat" and r.get("target") == "bridge" and "failed" not in r
    ]
    peaks = [p for p in peaks if p is not None]
    add(
        "RSS under load <= 64 MiB",
        max(peaks) <= 64 if peaks else None,
        f"{max(peaks):.1f} MiB peak" if peaks else "run failed",
    )

    chat_bridges = [b for b in bridges if b.get("label") == "instant"]
    idle = chat_bridges[0].get("idle_rss_mib") if chat_bridges else None
    add(
        "idle RSS <= 40 MiB",
        None if idle is None else idle <= 40,
        "n/a" if idle is None else f"{idle:.1f} MiB",
    )

    starts = sorted(
        b["start_to_first_reply_s"]
        for b in bridges
        if not b.get("slow_upstream") and "start_to_first_reply_s" in b
    )
    if starts:
        median = starts[len(starts) // 2]
        add(
            "start-to-first-reply <= 0.5 s",
            median <= 0.5,
            f"median {median:.2f} s, worst {starts[-1]:.2f} s over {len(starts)} starts",
        )
    else:
        add("start-to-first-reply <= 0.5 s", None, "no start measured")

    for kind in ("speech", "transcription"):
        run = next((r for r in runs if r.get("kind") == kind), {})
        fact = next((b for b in bridges if b.get("label", "").startswith(kind)), {})
        payload_mib = doc["plan"]["audio_bytes"] / MIB
        name = f"{kind} {payload_mib:g} MiB: peak RSS <= 3x payload over idle"
        peak = bridge_proc(run).get("peak_rss_mib")
        base = fact.get("idle_rss_mib")
        if "failed" in run or peak is None or base is None or run.get("ok", 0) == 0:
            detail = run.get("failed") or "; ".join(run.get("error_samples", [])) or "no reply"
            add(name, False, f"run failed: {detail[:300]}")
            continue
        over = peak - base
        add(
            name,
            over <= 3 * payload_mib and run["lost"] == 0 and run["errors"] == 0,
            f"+{over:.1f} MiB over idle ({over / payload_mib:.2f}x), peak {peak:.1f} MiB",
        )
    return targets


def fmt(value: Any, spec: str = ".1f") -> str:
    """A table cell: formatted number, or '-'."""
    if value is None or value == "":
        return "-"
    return format(value, spec) if isinstance(value, int | float) else str(value)


def table(doc: dict[str, Any]) -> str:
    """The results as one Markdown table."""
    runs = doc["runs"]
    head = (
        "| run | C | sent | ok | lost | err | req/s | vs echo | p50 ms | p90 ms | p99 ms | max ms"
        " | bridge CPU ms/req | peak RSS MiB |"
    )
    rows = [head, "|" + "---|" * 14]
    for run in runs:
        if "failed" in run:
            rows.append(f"| {run['label']} | {fmt(run.get('concurrency'))} | FAILED" + " |" * 12)
            continue
        echo = find(runs, "echo", run["concurrency"]) if run.get("kind") == "chat" else {}
        ratio = (
            f"{run['throughput_rps'] / echo['throughput_rps']:.0%}"
            if echo and run["target"] == "bridge" and "200ms" not in run["label"]
            else "-"
        )
        proc = run["processes"].get("bridge") or run["processes"].get("echo") or {}
        cpu = run["processes"].get("bridge", {}).get("cpu_ms_per_request")
        rows.append(
            f"| {run['label']} | {run['concurrency']} | {run['sent']} | {run['ok']} | {run['lost']}"
            f" | {run['errors']} | {run['throughput_rps']:.0f} | {ratio} | {run['p50_ms']:.2f}"
            f" | {run['p90_ms']:.2f} | {run['p99_ms']:.2f} | {run['max_ms']:.1f} | {fmt(cpu, '.3f')}"
            f" | {fmt(proc.get('peak_rss_mib') if 'bridge' in run['processes'] else None)} |"
        )
    return "\n".join(rows)


def summary_lines(doc: dict[str, Any]) -> list[str]:
    """Facts that are not per run: upstream latency, starts, idle RSS, CPU split."""
    lines = []
    bridge1 = find(doc["runs"], "bridge", 1)
    if bridge1.get("direct"):
        d = bridge1["direct"]
        lines.append(
            f"upstream's own latency (aiohttp, sequential): p50 {d['p50_ms']:.3f} ms,"
            f" p99 {d['p99_ms']:.3f} ms"
        )
    echo1 = find(doc["runs"], "echo", 1)
    if echo1:
        lines.append(f"harness round trip at C=1 (echo): p50 {echo1['p50_ms']:.3f} ms")
    for b in doc["bridges"]:
        lines.append(
            f"bridge start ({b['label']}): first reply after {fmt(b.get('start_to_first_reply_s'), '.3f')} s,"
            f" idle RSS {fmt(b.get('idle_rss_mib'))} MiB"
        )
    run = find(doc["runs"], "bridge", 128)
    if run:
        split = ", ".join(
            f"{name} {p['cpu_ms_per_request']:.3f}" for name, p in run["processes"].items()
        )
        lines.append(f"CPU ms per request at C=128 (instant): {split}")
    return lines


def chart(doc: dict[str, Any], path: Path) -> None:
    """Throughput and p99 latency against requests in flight, bridge beside the echo ceiling."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4), dpi=100)
    for label, style in (("echo", "s--"), ("bridge", "o-")):
        points = sorted(
            (r["concurrency"], r["throughput_rps"], r["p99_ms"])
            for r in doc["runs"]
            if r.get("label") == label and "failed" not in r and r.get("kind") == "chat"
        )
        if not points:
            continue
        name = "echo responder (harness ceiling)" if label == "echo" else "bridge, instant upstream"
        cs, rps, p99 = zip(*points, strict=True)
        ax1.plot(cs, rps, style, label=name)
        ax2.plot(cs, p99, style, label=name)
    slow = find(doc["runs"], "bridge 200ms")
    if slow:
        ax1.plot([slow["concurrency"]], [slow["throughput_rps"]], "^", label="bridge, 200 ms upstream")
        ax1.axhline(CONCURRENCY / (SLOW_MS / 1000), color="grey", lw=0.8, ls=":")
    for ax in (ax1, ax2):
        ax.set_xscale("log", base=2)
        ax.set_xticks([1, 16, 128], ["1", "16", "128"])
        ax.set_xlabel("requests in flight (C)")
        ax.grid(alpha=0.3)
    ax1.set_ylabel("replies per second")
    ax1.set_title("Throughput")
    ax2.set_yscale("log")
    ax2.set_ylabel("p99 latency (ms)")
    ax2.set_title("p99 latency")
    ax1.legend(fontsize=8)
    m = doc["machine"]
    fig.suptitle(f"openai-mqtt-bridge, {m['nproc']} CPUs ({m['cpu']}), {m['date'][:10]}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main() -> int:
    """Run the benchmark; exit 0 when every run completed (targets may still fail)."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="a smoke run of a few seconds")
    parser.add_argument("--out", type=Path, help="results JSON (default bench/results/latest.json)")
    args = parser.parse_args()
    plan = QUICK if args.quick else FULL
    if not BRIDGE_EXE.exists():
        raise SystemExit(f"{BRIDGE_EXE} not found: run from the repo's venv (.venv/bin/python)")
    RESULTS.mkdir(exist_ok=True)
    logdir = RESULTS / "logs"
    shutil.rmtree(logdir, ignore_errors=True)
    logdir.mkdir()
    out = args.out or RESULTS / ("quick.json" if args.quick else "latest.json")
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="omb-bench-") as tmp:
        bench = Bench(plan, Path(tmp), logdir)
        try:
            bench.start_broker()
            bench.start_upstream()
            print(f"broker 127.0.0.1:{bench.broker_port}, upstream ports {bench.instant_port}"
                  f" (instant) and {bench.slow_port} ({SLOW_MS:g} ms); {plan.name} plan")
            bench.guarded("echo", bench.run_echo)
            bench.guarded("bridge", bench.run_instant)
            bench.guarded("bridge 200ms", bench.run_slow)
            bench.guarded("speech", bench.run_audio, "speech")
            bench.guarded("transcription", bench.run_audio, "transcription")
        finally:
            bench.close()
    doc: dict[str, Any] = {
        "machine": machine_info(),
        "plan": vars_of(plan),
        "bench_config": {"max_concurrency": CONCURRENCY, "max_connections": CONCURRENCY,
                          "broker_max_inflight": BROKER_INFLIGHT, "slow_upstream_ms": SLOW_MS},
        "runs": bench.runs,
        "bridges": bench.bridges,
        "wall_s": round(time.monotonic() - started, 1),
    }
    doc["targets"] = evaluate(doc)
    out.write_text(json.dumps(doc, indent=1) + "\n")
    print()
    print(table(doc))
    print()
    for line in summary_lines(doc):
        print(line)
    print()
    for t in doc["targets"]:
        verdict = {True: "PASS", False: "FAIL", None: "N/A "}[t["pass"]]
        print(f"{verdict}  {t['target']}: {t['measured']}")
    if not args.quick:
        chart(doc, BENCH / "chart.png")
        print(f"\nwrote {out.relative_to(ROOT)} and bench/chart.png in {doc['wall_s']:.0f} s")
    else:
        print(f"\nwrote {out.relative_to(ROOT)} in {doc['wall_s']:.0f} s")
    return 0 if all("failed" not in r for r in bench.runs) else 1


def vars_of(plan: Plan) -> dict[str, Any]:
    """A plan as a plain dict (slots dataclass)."""
    return {name: getattr(plan, name) for name in Plan.__dataclass_fields__}


if __name__ == "__main__":
    sys.exit(main())
