"""One-command benchmark of the bridge against Node-RED and the harness ceiling: `bench/run.py`.

Starts its own Mosquitto (free loopback port), a stand-in service host (instant and 200 ms
listeners), the echo responder (the harness ceiling), the bridge and Node-RED with
node-red-openai-api (installed on demand, skipped without Node.js) as separate processes, drives
each with bench/loadgen.py, alternating, prints the tables and the PASS/FAIL verdict per target,
and writes bench/results/latest.json and bench/chart.png (quick runs: bench/results/quick.json).
See bench/README.md.
"""

from __future__ import annotations

import argparse
import compileall
import contextlib
import dataclasses
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

import node_red
import orjson
import paho.mqtt.client as paho
from common import (
    BROKER_INFLIGHT,
    MIB,
    MODEL,
    PREFIX,
    free_port,
    machine_cpu_s,
    make_client,
    proc_sample,
)
from paho.mqtt.subscribeoptions import SubscribeOptions

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
RESULTS = BENCH / "results"
PY = sys.executable
BRIDGE_EXE = Path(PY).with_name("openai-mqtt-bridge")
MOSQUITTO_PATHS = ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto", "/usr/bin/mosquitto")
SLOW_MS = 200.0
CONCURRENCY = 128  # requests in flight of the C=128 and 200 ms runs


@dataclass(frozen=True, slots=True)
class Plan:
    """Request counts and limits for one benchmark mode."""

    name: str
    chat: dict[int, int]
    """Measured requests per concurrency level, instant upstream (bridge and echo alike)."""
    reps: int
    """Repetitions of every instant run, echo and bridge interleaved; the table shows medians."""
    warmup: int
    slow_count: int
    audio_bytes: int
    audio_count: int
    direct_count: int
    settle_s: float
    time_limit_s: float
    quiet_wait_s: float
    """Before each run, wait up to this long for the machine to be idle (other work on it)."""
    nodered_c1: int
    """Node-RED's measured requests at C=1 (its MQTT client leaves Nagle on: ~44 ms each)."""


FULL = Plan(
    name="full",
    chat={1: 2000, 16: 8000, 128: 16000},
    reps=3,
    warmup=500,
    slow_count=9600,
    audio_bytes=25 * MIB,
    audio_count=3,
    direct_count=1000,
    settle_s=1.5,
    time_limit_s=120.0,
    quiet_wait_s=10.0,
    nodered_c1=200,
)
QUICK = Plan(
    name="quick",
    chat={1: 200, 16: 600, 128: 1500},
    reps=1,
    warmup=100,
    slow_count=512,
    audio_bytes=4 * MIB,
    audio_count=1,
    direct_count=100,
    settle_s=0.3,
    time_limit_s=30.0,
    quiet_wait_s=0.0,
    nodered_c1=50,
)
ECHO_PREFIX = "echo"
"""The echo responder's topic prefix: it and the bridge stay up side by side, each run picks one."""
WORKERS_PREFIX = "benchw"
"""The `--workers` bridge's prefix: its shared group must not share requests with the other."""
TARGET_PREFIX = {
    "echo": ECHO_PREFIX,
    "bridge": PREFIX,
    "workers": WORKERS_PREFIX,
    "nodered": node_red.PREFIX,
}
QUIET_CORES = 0.3
SCENARIOS = ("instant", "slow", "speech", "transcription")


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
    bridge_src: Path | None = None
    """Run the bridge package found here (python -m bridge) instead of the installed one."""
    with_echo: bool = True
    bridge_env: dict[str, str] = field(default_factory=dict)
    """Extra environment for the bridge, e.g. OMB_MQTT__PROTOCOL=3.1.1 (config overrides)."""
    slow_levels: list[int] = field(default_factory=lambda: [CONCURRENCY])
    """Requests in flight of the 200 ms upstream runs."""
    with_nodered: bool = True
    workers: str | None = None
    """`[runtime] workers` of a second bridge run beside the first in the instant runs."""
    nodered_cache: Path | None = None
    """Where Node-RED is installed on first use (default .cache/ in the repository)."""
    tls_cert: Path | None = None
    """The upstream's certificate and key (PEM): the upstream serves https (`--tls`)."""
    nodered_facts: dict[str, Any] = field(default_factory=dict)
    """Installed versions, start, idle RSS, or why Node-RED was skipped."""
    runs: list[dict[str, Any]] = field(default_factory=list)
    bridges: list[dict[str, Any]] = field(default_factory=list)
    spawned: int = 0

    # --- infrastructure ---------------------------------------------------------------------------

    def spawn(
        self, name: str, argv: list[str], env: dict[str, str] | None = None, cwd: Path = ROOT
    ) -> Service:
        """Start a child process, stderr to its log file, stdout piped."""
        log_path = self.logdir / f"{name}.log"
        log = log_path.open("ab")
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=log,
            cwd=cwd,
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
                *(["--tls-cert", str(self.tls_cert)] if self.tls_cert else []),
            ],
        )
        line = read_line(upstream, 20.0)
        if not line:
            raise SystemExit(f"the upstream did not start:\n{upstream.log_tail()}")
        self.instant_port, self.slow_port = json.loads(line)["ports"]
        self.upstream = upstream

    def api_base(self, slow: bool = False) -> str:
        """The service URL of the instant or the slow listener."""
        scheme = "https" if self.tls_cert else "http"
        return f"{scheme}://127.0.0.1:{self.slow_port if slow else self.instant_port}/v1"

    # --- the bridge -------------------------------------------------------------------------------

    def bridge_config(self, slow: bool, instance: str, prefix: str = PREFIX) -> Path:
        """A bench config: own broker, a stand-in upstream, warnings only; the concurrency
        limits (`max_concurrency`, `max_connections`) are the defaults."""
        path = self.workdir / f"{instance}.toml"
        path.write_text(
            f"""[mqtt]
host = "127.0.0.1"
port = {self.broker_port}
topic_prefix = "{prefix}"
instance = "{instance}"
client_id = "{instance}"

[service]
api_base = "{self.api_base(slow)}"

[limits]
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
    def bridge(
        self, label: str, slow: bool = False, workers: str | None = None
    ) -> Iterator[dict[str, Any]]:
        """Run a fresh bridge (own instance and session); yields its facts (pid, start, idle).

        With `workers`, a bridge of that many worker processes on the workers' prefix."""
        self.spawned += 1
        instance = f"bench-{self.spawned}"
        prefix = PREFIX if workers is None else WORKERS_PREFIX
        config = self.bridge_config(slow, instance, prefix)
        env = {k: v for k, v in os.environ.items() if not k.startswith("OMB_")}
        env["OPENAI_API_KEY"] = "sk-bench"
        # A journal of its own: the requests of every benchmark run have the same topics and
        # payloads, so a shared one would answer repeats of an earlier run without the upstream.
        env.pop("STATE_DIRECTORY", None)
        env["XDG_STATE_HOME"] = str(self.workdir / f"state-{instance}")
        env.update(self.bridge_env)
        if workers is not None:
            env["OMB_RUNTIME__WORKERS"] = workers
        argv = [str(BRIDGE_EXE), "--config", str(config)]
        if self.bridge_src is not None:
            env["PYTHONPATH"] = str(self.bridge_src)
            argv = [PY, "-m", "bridge", "--config", str(config)]
        facts: dict[str, Any] = {"label": label, "instance": instance, "slow_upstream": slow}
        if workers is not None:
            facts["workers"] = workers
        with Prober(
            self.broker_port, f"{prefix}/request/createChatCompletion/{instance}"
        ) as prober:
            started = time.monotonic()
            service = self.spawn(f"bridge-{instance}", argv, env, cwd=self.workdir)
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
            facts["processes"] = sample.processes if sample else None
            yield facts
        finally:
            end = proc_sample(service.pid)
            facts["final_rss_mib"] = round(end.rss_mib, 1) if end else None
            facts["alive_at_end"] = service.proc.poll() is None
            stopping = time.monotonic()
            facts["exit_code"] = service.stop()
            facts["stop_s"] = round(time.monotonic() - stopping, 2)
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
        ramp: float = 0.0,
        rep: int | None = None,
    ) -> dict[str, Any]:
        """Run bench/loadgen.py once and record its result under `label`."""
        tag = f"r{len(self.runs)}"
        waited, busy = wait_quiet(self.plan.quiet_wait_s)
        argv = [
            PY,
            str(BENCH / "loadgen.py"),
            f"--port={self.broker_port}",
            f"--prefix={TARGET_PREFIX.get(target, PREFIX)}",
            f"--reply={'raw' if target == 'nodered' else 'envelope'}",
            f"--tag={tag}",
            f"--kind={kind}",
            f"--size={size}",
            f"--count={count}",
            f"--warmup={warmup}",
            f"--concurrency={concurrency}",
            f"--time-limit={self.plan.time_limit_s}",
            f"--stall={stall}",
            f"--ramp={ramp}",
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
        result.update(label=label, target=target, concurrency=concurrency, kind=kind, rep=rep)
        result["wall_s"] = round(time.monotonic() - started, 1)
        result["quiet_wait"] = {"waited_s": round(waited, 1), "busy_cores_before": round(busy, 2)}
        self.runs.append(result)
        if "failed" in result:
            print(" FAILED")
        else:
            print(
                f" {result['throughput_rps']:>8.1f} req/s  p50 {result['p50_ms']:.2f} ms"
                f"  p99 {result['p99_ms']:.2f} ms  lost {result['lost']}  errors {result['errors']}"
                f"  other CPU {result['other_cpu_share']:.2f}"
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

    @contextlib.contextmanager
    def echo(self, delay_ms: float = 0.0) -> Iterator[Service]:
        """The echo responder (harness ceiling) on its own prefix, for the duration; each answer
        `delay_ms` after its request (the ceiling of the 200 ms runs)."""
        argv = [PY, str(BENCH / "echo.py"), f"--port={self.broker_port}", f"--prefix={ECHO_PREFIX}"]
        echo = self.spawn("echo", [*argv, f"--delay-ms={delay_ms:g}"])
        try:
            if read_line(echo, 15.0) != "ready":
                raise BridgeFailed(f"echo responder did not start:\n{echo.log_tail()}")
            yield echo
        finally:
            echo.stop()

    @contextlib.contextmanager
    def nodered(self) -> Iterator[Service | None]:
        """Node-RED with the OpenAI API node on the instant upstream; None when it cannot run."""
        facts = self.nodered_facts
        if not self.with_nodered:
            facts["skipped"] = "--no-nodered"
            yield None
            return
        try:
            install = node_red.install(self.nodered_cache, self.logdir / "npm-install.log")
        except node_red.Unavailable as exc:
            facts["skipped"] = str(exc)
            print(f"  Node-RED: SKIPPED: {exc}")
            yield None
            return
        facts.update(versions=install.versions, install_dir=str(install.root))
        userdir = node_red.user_dir(install, self.workdir)
        env = node_red.env(self.broker_port, self.api_base())
        base = f"{node_red.PREFIX}/request/createChatCompletion/nodered"
        with Prober(self.broker_port, base, ok=b'"object":"chat.completion"') as prober:
            started = time.monotonic()
            service = self.spawn("nodered", node_red.argv(install, userdir), env, cwd=userdir)
            first = prober.first_reply(started, service, 60.0)
        try:
            if first is None:
                raise BridgeFailed(f"Node-RED did not answer the probe:\n{service.log_tail()}")
            facts["start_to_first_reply_s"] = round(first, 3)
            time.sleep(self.plan.settle_s)
            sample = proc_sample(service.pid)
            facts["idle_rss_mib"] = round(sample.rss_mib, 1) if sample else None
            yield service
        finally:
            facts["alive_at_end"] = service.proc.poll() is None
            facts["exit_code"] = service.stop()

    def run_instant(self) -> None:
        """Echo, bridge and Node-RED, instant upstream, every C, alternating and repeated (C=1
        also times the upstream directly)."""
        with contextlib.ExitStack() as stack:
            echo = stack.enter_context(self.echo())
            facts = stack.enter_context(self.bridge("instant"))
            wfacts = None
            if self.workers is not None:
                label = f"instant, workers = {self.workers}"
                wfacts = stack.enter_context(self.bridge(label, workers=self.workers))
            nodered = stack.enter_context(self.nodered())
            for c, n in self.plan.chat.items():
                for rep in range(self.plan.reps):
                    if self.with_echo:
                        watch = {"echo": echo.pid, **self.watch()}
                        self.load(
                            "echo",
                            "echo",
                            watch,
                            concurrency=c,
                            count=n,
                            warmup=self.plan.warmup,
                            rep=rep,
                        )
                    self.load(
                        "bridge",
                        "bridge",
                        self.watch(facts["pid"]),
                        concurrency=c,
                        count=n,
                        warmup=self.plan.warmup,
                        direct_url=self.api_base() + "/chat/completions" if c == 1 else "",
                        rep=rep,
                    )
                    if wfacts is not None:
                        self.load(
                            "workers",
                            "workers",
                            self.watch(wfacts["pid"]),
                            concurrency=c,
                            count=n,
                            warmup=self.plan.warmup,
                            rep=rep,
                        )
                    if nodered is not None:
                        self.load(
                            "nodered",
                            "nodered",
                            {"nodered": nodered.pid, **self.watch()},
                            concurrency=c,
                            count=min(n, self.plan.nodered_c1) if c == 1 else n,
                            warmup=min(self.plan.warmup, 50) if c == 1 else self.plan.warmup,
                            rep=rep,
                        )

    def run_slow(self) -> None:
        """The bridge against the 200 ms upstream at C=128 (and `slow_levels`), a fresh bridge
        per level so that its peak RSS over idle is what that many requests in flight cost."""
        for c in self.slow_levels:
            if self.with_echo and c == CONCURRENCY:
                # The harness alone, answering after the same 200 ms, just before the bridge.
                with self.echo(SLOW_MS) as echo:
                    self.load(
                        "echo 200ms",
                        "echo",
                        {"echo": echo.pid, **self.watch()},
                        concurrency=c,
                        count=self.plan.slow_count,
                        warmup=3 * c,
                        stall=5.0,
                        ramp=SLOW_MS / 1000,
                    )
            label = "200 ms upstream" if c == CONCURRENCY else f"200 ms upstream C={c}"
            with self.bridge(label, slow=True) as facts:
                self.load(
                    "bridge 200ms",
                    "bridge",
                    self.watch(facts["pid"]),
                    concurrency=c,
                    count=self.plan.slow_count * c // CONCURRENCY,
                    warmup=3 * c,
                    stall=5.0,
                    ramp=SLOW_MS / 1000,
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

    def __init__(self, port: int, request_base: str, ok: bytes = b'"status":"ok"') -> None:
        self.port = port
        self.topic = f"{request_base}-probe/"
        self.reply_at: float | None = None
        self.got = threading.Event()
        self.subscribed = threading.Event()
        self.client = make_client(f"bench-probe-{request_base.rsplit('/', 1)[-1]}")
        reply_filter = request_base.replace("/request/", "/response/", 1) + "-probe/+"

        def on_connect(c: paho.Client, u: Any, flags: Any, reason: Any, props: Any) -> None:
            c.subscribe(reply_filter, options=SubscribeOptions(qos=1))

        def on_subscribe(c: paho.Client, u: Any, mid: int, reasons: Any, props: Any) -> None:
            self.subscribed.set()

        def on_message(c: paho.Client, u: Any, msg: paho.MQTTMessage) -> None:
            if self.reply_at is None and ok in msg.payload:
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


def wait_quiet(limit_s: float, window_s: float = 0.3) -> tuple[float, float]:
    """Wait at most `limit_s` for the CPUs to be nearly idle; (seconds waited, busy cores)."""
    started = time.monotonic()
    if limit_s <= 0:
        return 0.0, 0.0
    while True:
        before = machine_cpu_s()[0]
        time.sleep(window_s)
        busy = (machine_cpu_s()[0] - before) / window_s
        waited = time.monotonic() - started
        if busy < QUIET_CORES or waited >= limit_s:
            return waited, busy


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


# --- results ------------------------------------------------------------------------------------


def machine_info() -> dict[str, Any]:
    """What the numbers were measured on."""
    model = ""
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as fh:
        for line in fh:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    versions = {}
    for mod in ("paho.mqtt", "aiohttp", "orjson", "uvloop"):
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
        commit = (
            subprocess.run(
                ["git", "-C", str(ROOT), "describe", "--always", "--dirty"],
                capture_output=True,
                timeout=5,
                check=False,
            )
            .stdout.decode()
            .strip()
        )
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


def median(values: list[float]) -> float:
    """The median (upper middle for an even count)."""
    ordered = sorted(values)
    return ordered[len(ordered) // 2]


def aggregate(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (label, C): medians over the repetitions, sums of counts, worst of peaks."""
    groups: dict[tuple[str, Any], list[dict[str, Any]]] = {}
    for run in runs:
        groups.setdefault((run["label"], run.get("concurrency")), []).append(run)
    rows = []
    for (label, concurrency), reps in groups.items():
        good = [r for r in reps if "failed" not in r]
        base = {"label": label, "target": reps[0].get("target"), "kind": reps[0].get("kind")}
        base["concurrency"] = concurrency
        if not good:
            rows.append({**base, "failed": reps[0]["failed"], "reps": 0})
            continue
        row: dict[str, Any] = {**base, "reps": len(good), "failed_reps": len(reps) - len(good)}
        for key in ("sent", "ok", "errors", "lost", "duplicates"):
            row[key] = sum(r[key] for r in good)
        row["error_samples"] = [e for r in good for e in r["error_samples"]][:5]
        for key in ("throughput_rps", "p50_ms", "p90_ms", "p99_ms", "mean_ms"):
            row[key] = median([r[key] for r in good])
        row["throughput_range"] = [
            min(r["throughput_rps"] for r in good),
            max(r["throughput_rps"] for r in good),
        ]
        row["max_ms"] = max(r["max_ms"] for r in good)
        for key in ("other_cpu_share", "steal_share"):
            row[key] = max(r.get(key, 0.0) for r in good)
        procs: dict[str, Any] = {}
        for name in good[0]["processes"]:
            samples = [r["processes"][name] for r in good if name in r["processes"]]
            cpu = [p["cpu_ms_per_request"] for p in samples if p["cpu_ms_per_request"] is not None]
            procs[name] = {
                "cpu_ms_per_request": round(median(cpu), 4) if cpu else None,
                "cpu_share": median([p["cpu_share"] for p in samples]),
                "peak_rss_mib": max(p["peak_rss_mib"] for p in samples),
                "rss_before_mib": min(p["rss_before_mib"] for p in samples),
            }
        row["processes"] = procs
        directs = [r["direct"] for r in good if r.get("direct")]
        if directs:
            row["direct"] = {
                "p50_ms": median([d["p50_ms"] for d in directs]),
                "p99_ms": median([d["p99_ms"] for d in directs]),
            }
        rows.append(row)
    return rows


def find(rows: list[dict[str, Any]], label: str, concurrency: int | None = None) -> dict[str, Any]:
    """The row with `label` (and `concurrency`), or {} when it is missing or failed."""
    for row in rows:
        if row.get("label") == label and concurrency in (None, row.get("concurrency")):
            return row if "failed" not in row else {}
    return {}


def bridge_proc(row: dict[str, Any]) -> dict[str, Any]:
    """The bridge's process figures of a row ({} if none)."""
    procs: dict[str, Any] = row.get("processes", {})
    return procs.get("bridge", {}) or {}


def evaluate(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """Every target with its measured value and PASS/FAIL (None when its run failed)."""
    rows, bridges = doc["rows"], doc["bridges"]
    targets: list[dict[str, Any]] = []

    def add(name: str, ok: bool | None, measured: str) -> None:
        targets.append({"target": name, "pass": ok, "measured": measured})

    name = "instant C=128 >= 70% of the echo ceiling, 0 lost"
    bridge128, echo128 = find(rows, "bridge", 128), find(rows, "echo", 128)
    if bridge128 and echo128:
        ratio = bridge128["throughput_rps"] / echo128["throughput_rps"]
        add(
            name,
            ratio >= 0.70 and bridge128["lost"] == 0 and bridge128["errors"] == 0,
            f"{ratio:.0%} ({bridge128['throughput_rps']:.0f} / {echo128['throughput_rps']:.0f}"
            f" req/s), lost {bridge128['lost']}, errors {bridge128['errors']}",
        )
    else:
        add(name, None, "no result (not run, or failed)")

    name = "instant C=128 >= 2x Node-RED (median of per-repetition ratios)"
    entry = next((e for e in doc.get("comparison", []) if e["concurrency"] == 128), None)
    if entry and entry["bridge_over_nodered"] is not None:
        ratio = entry["bridge_over_nodered"]
        per_rep = ", ".join(f"{r:.2f}" for r in entry["bridge_over_nodered_per_rep"])
        add(
            name,
            ratio >= 2.0,
            f"{ratio:.2f}x ({per_rep}); {entry['bridge']['throughput_rps']:.0f} vs"
            f" {entry['nodered']['throughput_rps']:.0f} req/s",
        )
    else:
        reason = doc.get("nodered", {}).get("skipped") or "not run, or failed"
        add(name, None, f"no result ({reason})")

    if entry and entry.get("workers_over_nodered") is not None:
        ratio = entry["workers_over_nodered"]
        per_rep = ", ".join(f"{r:.2f}" for r in entry["workers_over_nodered_per_rep"])
        add(
            "instant C=128 >= 2.5x Node-RED with workers (median of per-repetition ratios)",
            ratio >= 2.5,
            f"{ratio:.2f}x ({per_rep}); {entry['workers']['throughput_rps']:.0f} vs"
            f" {entry['nodered']['throughput_rps']:.0f} req/s",
        )

    name = "C=1 median <= 1.0 ms over the upstream's own latency"
    bridge1, echo1 = find(rows, "bridge", 1), find(rows, "echo", 1)
    direct = bridge1.get("direct")
    if bridge1 and direct:
        over = bridge1["p50_ms"] - direct["p50_ms"]
        harness = f"; harness round trip alone (echo) {echo1['p50_ms']:.2f} ms" if echo1 else ""
        add(
            name,
            over <= 1.0,
            f"+{over:.2f} ms ({bridge1['p50_ms']:.2f} ms vs upstream {direct['p50_ms']:.2f} ms"
            f"{harness})",
        )
    else:
        add(name, None, "no result (not run, or failed)")

    name = "200 ms upstream, C=128 >= 95% of C/latency"
    slow = find(rows, "bridge 200ms", CONCURRENCY)
    ideal = CONCURRENCY / (SLOW_MS / 1000)
    if slow:
        share = slow["throughput_rps"] / ideal
        harness = find(rows, "echo 200ms", CONCURRENCY)
        ceiling = f"; the echo answering after 200 ms: {harness['throughput_rps'] / ideal:.1%}"
        add(
            name,
            share >= 0.95 and slow["lost"] == 0,
            f"{share:.1%} ({slow['throughput_rps']:.0f} of {ideal:.0f} req/s), lost {slow['lost']}"
            + (ceiling if harness else ""),
        )
    else:
        add(name, None, "no result (not run, or failed)")

    cpu = bridge_proc(bridge128).get("cpu_ms_per_request")
    add(
        "CPU per request <= 0.45 ms (instant, C=128)",
        None if cpu is None else cpu <= 0.45,
        "no result (not run, or failed)" if cpu is None else f"{cpu:.3f} ms",
    )

    peaks = [
        bridge_proc(r).get("peak_rss_mib")
        for r in rows
        if r.get("kind") == "chat" and r.get("target") == "bridge" and "failed" not in r
    ]
    found = [p for p in peaks if p is not None]
    add(
        "RSS under load <= 64 MiB",
        max(found) <= 64 if found else None,
        f"{max(found):.1f} MiB peak" if found else "no result (not run, or failed)",
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
        add(
            "start-to-first-reply <= 0.5 s",
            median(starts) <= 0.5,
            f"median {median(starts):.2f} s, worst {starts[-1]:.2f} s over {len(starts)} starts",
        )
    else:
        add("start-to-first-reply <= 0.5 s", None, "no start measured")

    payload_mib = doc["plan"]["audio_bytes"] / MIB
    for kind in ("speech", "transcription"):
        row = next((r for r in rows if r.get("kind") == kind), {})
        fact = next((b for b in bridges if b.get("label", "").startswith(kind)), {})
        name = f"{kind} {payload_mib:g} MiB: peak RSS <= 3x payload over idle"
        peak = bridge_proc(row).get("peak_rss_mib")
        base = fact.get("idle_rss_mib")
        if not row:
            add(name, None, "not run")
            continue
        if "failed" in row or peak is None or base is None or row.get("ok", 0) == 0:
            detail = row.get("failed") or "; ".join(row.get("error_samples", [])) or "no reply"
            add(name, False, f"run failed: {detail[:300]}")
            continue
        over = peak - base
        add(
            name,
            over <= 3 * payload_mib and row["lost"] == 0 and row["errors"] == 0,
            f"+{over:.1f} MiB over idle ({over / payload_mib:.2f}x the payload),"
            f" peak {peak:.1f} MiB",
        )
    return targets


def fmt(value: Any, spec: str = ".1f") -> str:
    """A table cell: formatted number, or '-'."""
    if value is None or value == "":
        return "-"
    return format(value, spec) if isinstance(value, int | float) else str(value)


def table(doc: dict[str, Any]) -> str:
    """The results as one Markdown table (medians over repetitions)."""
    rows = doc["rows"]
    head = (
        "| run | C | reps | sent | ok | lost | err | req/s | vs echo | p50 ms | p90 ms | p99 ms"
        " | max ms | CPU ms/req | peak RSS MiB | other CPU |"
    )
    lines = [head, "|" + "---|" * 16]
    for row in rows:
        if "failed" in row:
            lines.append(f"| {row['label']} | {fmt(row.get('concurrency'))} | FAILED" + " |" * 14)
            continue
        echo = find(rows, "echo", row["concurrency"]) if row["kind"] == "chat" else {}
        ratio = (
            f"{row['throughput_rps'] / echo['throughput_rps']:.0%}"
            if echo and row["label"] in ("bridge", "nodered")
            else "-"
        )
        procs = row["processes"]
        own = procs.get("bridge") or procs.get("echo") or procs.get("nodered") or {}
        lines.append(
            f"| {row['label']} | {row['concurrency']} | {row['reps']} | {row['sent']} | {row['ok']}"
            f" | {row['lost']} | {row['errors']} | {row['throughput_rps']:.0f} | {ratio}"
            f" | {row['p50_ms']:.2f} | {row['p90_ms']:.2f} | {row['p99_ms']:.2f}"
            f" | {row['max_ms']:.1f} | {fmt(own.get('cpu_ms_per_request'), '.3f')}"
            f" | {fmt(own.get('peak_rss_mib'))} | {row['other_cpu_share']:.2f} |"
        )
    return "\n".join(lines)


def comparison(rows: list[dict[str, Any]], runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per C: echo, bridge and Node-RED side by side, with the bridge/Node-RED ratio of every
    repetition (runs of one repetition follow each other) and their median."""
    result = []
    for c in sorted({r["concurrency"] for r in rows if r.get("label") == "nodered"}):
        per_rep: dict[int, dict[str, float]] = {}
        for run in runs:
            if (
                run.get("concurrency") == c
                and "failed" not in run
                and run.get("rep") is not None
                and run["label"] in ("echo", "bridge", "workers", "nodered")
            ):
                per_rep.setdefault(run["rep"], {})[run["label"]] = run["throughput_rps"]
        entry: dict[str, Any] = {"concurrency": c}
        for label in ("bridge", "workers"):
            ratios = [
                round(r[label] / r["nodered"], 3)
                for _, r in sorted(per_rep.items())
                if r.get(label) and r.get("nodered")
            ]
            entry[f"{label}_over_nodered_per_rep"] = ratios
            entry[f"{label}_over_nodered"] = median(ratios) if ratios else None
        for label in ("echo", "bridge", "workers", "nodered"):
            row = find(rows, label, c)
            proc_name = "bridge" if label == "workers" else label
            proc = (row.get("processes") or {}).get(proc_name, {}) if row else {}
            entry[label] = {
                "throughput_rps": row.get("throughput_rps"),
                "throughput_per_rep": [
                    r["throughput_rps"]
                    for r in runs
                    if r.get("label") == label and r.get("concurrency") == c and "failed" not in r
                ],
                "p50_ms": row.get("p50_ms"),
                "p99_ms": row.get("p99_ms"),
                "cpu_ms_per_request": proc.get("cpu_ms_per_request"),
                "peak_rss_mib": proc.get("peak_rss_mib"),
            }
        result.append(entry)
    return result


def comparison_table(doc: dict[str, Any]) -> str:
    """Bridge vs Node-RED vs echo ceiling, one line per C (medians; ratios per repetition)."""
    lines = [
        "| C | echo req/s | bridge req/s | Node-RED req/s | bridge / Node-RED (per rep)"
        " | p50 ms bridge / Node-RED | CPU ms/req bridge / Node-RED"
        " | peak RSS MiB bridge / Node-RED |",
        "|" + "---|" * 8,
    ]
    for e in doc.get("comparison", []):
        b, n, echo = e["bridge"], e["nodered"], e["echo"]
        per_rep = ", ".join(f"{r:.2f}" for r in e["bridge_over_nodered_per_rep"])
        ratio = e["bridge_over_nodered"]
        lines.append(
            f"| {e['concurrency']} | {fmt(echo['throughput_rps'], '.0f')}"
            f" | {fmt(b['throughput_rps'], '.0f')} | {fmt(n['throughput_rps'], '.0f')}"
            f" | **{fmt(ratio, '.2f')}x** ({per_rep})"
            f" | {fmt(b['p50_ms'], '.2f')} / {fmt(n['p50_ms'], '.2f')}"
            f" | {fmt(b['cpu_ms_per_request'], '.3f')} / {fmt(n['cpu_ms_per_request'], '.3f')}"
            f" | {fmt(b['peak_rss_mib'])} / {fmt(n['peak_rss_mib'])} |"
        )
        w = e.get("workers") or {}
        if w.get("throughput_rps"):
            per_rep = ", ".join(f"{r:.2f}" for r in e["workers_over_nodered_per_rep"])
            lines.append(
                f"| {e['concurrency']}, workers | | {fmt(w['throughput_rps'], '.0f')}"
                f" | {fmt(n['throughput_rps'], '.0f')}"
                f" | **{fmt(e['workers_over_nodered'], '.2f')}x** ({per_rep})"
                f" | {fmt(w['p50_ms'], '.2f')} / {fmt(n['p50_ms'], '.2f')}"
                f" | {fmt(w['cpu_ms_per_request'], '.3f')} / {fmt(n['cpu_ms_per_request'], '.3f')}"
                f" | {fmt(w['peak_rss_mib'])} / {fmt(n['peak_rss_mib'])} |"
            )
    return "\n".join(lines)


def summary_lines(doc: dict[str, Any]) -> list[str]:
    """Facts that are not per run: upstream latency, starts, idle RSS, CPU split."""
    lines = []
    bridge1 = find(doc["rows"], "bridge", 1)
    if bridge1.get("direct"):
        d = bridge1["direct"]
        lines.append(
            f"upstream's own latency (aiohttp, sequential, keep-alive): p50 {d['p50_ms']:.3f} ms,"
            f" p99 {d['p99_ms']:.3f} ms"
        )
    for b in doc["bridges"]:
        lines.append(
            f"bridge start ({b['label']}): first reply after"
            f" {fmt(b.get('start_to_first_reply_s'), '.3f')} s,"
            f" idle RSS {fmt(b.get('idle_rss_mib'))} MiB"
        )
    nr = doc.get("nodered", {})
    if nr.get("skipped"):
        lines.append(f"Node-RED: skipped ({nr['skipped']})")
    elif nr:
        versions = ", ".join(f"{k} {v}" for k, v in nr.get("versions", {}).items())
        lines.append(
            f"Node-RED ({versions}): first reply after"
            f" {fmt(nr.get('start_to_first_reply_s'), '.3f')} s, idle RSS"
            f" {fmt(nr.get('idle_rss_mib'))} MiB"
        )
    for label in ("echo", "bridge", "nodered"):
        row = find(doc["rows"], label, 128)
        if row:
            split = ", ".join(
                f"{name} {p['cpu_ms_per_request']:.3f}" for name, p in row["processes"].items()
            )
            lines.append(f"CPU ms per request, {label} at C=128: {split}")
    return lines


def chart(doc: dict[str, Any], path: Path) -> None:
    """Throughput and p99 latency against requests in flight, bridge beside the echo ceiling."""
    try:
        import matplotlib
    except ImportError:
        print("no chart: matplotlib is missing (.venv/bin/pip install -e '.[bench]')")
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4), dpi=100)
    names = {
        "echo": "echo responder (harness ceiling)",
        "bridge": "bridge, instant upstream",
        "nodered": "Node-RED + node-red-openai-api, instant upstream",
    }
    for label, style in (("echo", "s--"), ("bridge", "o-"), ("nodered", "d-.")):
        points = sorted(
            (r["concurrency"], r["throughput_rps"], r["p99_ms"])
            for r in doc["rows"]
            if r.get("label") == label and "failed" not in r
        )
        if not points:
            continue
        name = names[label]
        cs, rps, p99 = zip(*points, strict=True)
        ax1.plot(cs, rps, style, label=name)
        ax2.plot(cs, p99, style, label=name)
    slow = find(doc["rows"], "bridge 200ms")
    if slow:
        ax1.plot(
            [slow["concurrency"]], [slow["throughput_rps"]], "^", label="bridge, 200 ms upstream"
        )
        ax1.axhline(CONCURRENCY / (SLOW_MS / 1000), color="grey", lw=0.8, ls=":")
        ax2.plot([slow["concurrency"]], [slow["p99_ms"]], "^", label="bridge, 200 ms upstream")
    for ax in (ax1, ax2):
        ax.set_xscale("log", base=2)
        ax.set_xticks([1, 16, 128], ["1", "16", "128"])
        ax.set_xlabel("requests in flight (C)")
        ax.grid(alpha=0.3)
    ax1.set_ylabel("replies per second")
    ax1.set_title("Throughput (dotted: 128 / 200 ms)")
    ax2.set_yscale("log")
    ax2.set_ylabel("p99 latency (ms)")
    ax2.set_title("p99 latency")
    ax1.legend(fontsize=8)
    m = doc["machine"]
    fig.suptitle(
        f"openai-mqtt-bridge, {m['nproc']} CPUs ({m['cpu']}), {m['date'][:10]}", fontsize=10
    )
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def shown(path: Path) -> str:
    """`path` relative to the repo root when inside it."""
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def compile_bridge_src(src: Path) -> None:
    """Byte-compile `src/bridge` (as `pip install` does); exit when it is missing or broken."""
    # A tree fresh from `git archive` has no __pycache__, and with PYTHONDONTWRITEBYTECODE=1 every
    # start compiled all of bridge/ again: +2.6 MiB idle RSS and slower starts (issue 13).
    package = src / "bridge"
    if not (package / "__init__.py").is_file():
        raise SystemExit(f"--bridge-src {src}: no bridge/ package in it")
    if not compileall.compile_dir(package, quiet=1):
        raise SystemExit(f"--bridge-src {src}: bridge/ does not compile")


def main() -> int:
    """Run the benchmark; exit 0 when every run completed (targets may still fail)."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="a smoke run of a few seconds")
    parser.add_argument("--out", type=Path, help="results JSON (default bench/results/latest.json)")
    parser.add_argument("--reps", type=int, help="repetitions of each instant run (default 3)")
    parser.add_argument(
        "--only",
        default=",".join(SCENARIOS),
        help=f"comma-separated scenarios to run, of {','.join(SCENARIOS)} (default: all)",
    )
    parser.add_argument(
        "--bridge-src",
        type=Path,
        help="directory holding a bridge/ package to benchmark instead of the installed one",
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="instead of the benchmark: py-spy the bridge under C=128 (bench/profile.svg)",
    )
    parser.add_argument("--profile-concurrency", type=int, default=CONCURRENCY)
    parser.add_argument(
        "--profile-native",
        action="store_true",
        help="py-spy --native: C frames too (uvloop, the kernel calls, SQLite)",
    )
    parser.add_argument("--no-echo", action="store_true", help="skip the echo (ceiling) runs")
    parser.add_argument(
        "--slow-levels", help="comma-separated C values for the 200 ms upstream (default 128)"
    )
    parser.add_argument("--no-nodered", action="store_true", help="skip the Node-RED runs")
    parser.add_argument(
        "--workers",
        metavar="N|auto",
        help="in the instant runs, also a bridge with [runtime] workers = N (its own prefix)",
    )
    parser.add_argument(
        "--nodered-dir",
        type=Path,
        help="cache folder for the Node-RED installation (default .cache/ in the repository)",
    )
    parser.add_argument(
        "--levels", help="comma-separated C values for the instant runs (default 1,16,128)"
    )
    parser.add_argument(
        "--tls",
        action="store_true",
        help="the upstream serves https with a certificate of a CA made for the run (trustme)",
    )
    parser.add_argument(
        "--bridge-env",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="environment for the bridge, e.g. OMB_MQTT__PROTOCOL=3.1.1 (repeatable)",
    )
    args = parser.parse_args()
    plan = QUICK if args.quick else FULL
    if args.reps:
        plan = dataclasses.replace(plan, reps=args.reps)
    if args.levels:
        levels = [int(c) for c in args.levels.split(",")]
        counts = {c: plan.chat.get(c, plan.chat[max(plan.chat)]) for c in levels}
        plan = dataclasses.replace(plan, chat=counts)
    bridge_env = dict(item.split("=", 1) for item in args.bridge_env)
    only = [name.strip() for name in args.only.split(",") if name.strip()]
    unknown = set(only) - set(SCENARIOS)
    if unknown:
        parser.error(f"unknown scenario(s) {', '.join(sorted(unknown))}; pick from {SCENARIOS}")
    if not BRIDGE_EXE.exists():
        raise SystemExit(f"{BRIDGE_EXE} not found: run from the repo's venv (.venv/bin/python)")
    if args.bridge_src is not None:
        compile_bridge_src(args.bridge_src)
    RESULTS.mkdir(exist_ok=True)
    logdir = RESULTS / "logs"
    shutil.rmtree(logdir, ignore_errors=True)
    logdir.mkdir()
    default_name = "quick.json" if args.quick else "latest.json"
    partial = args.bridge_src or bridge_env or args.levels or args.reps or args.no_echo
    partial = partial or args.no_nodered or args.slow_levels or args.workers or args.tls
    if partial or set(only) != set(SCENARIOS):
        default_name = "partial.json"
    out = args.out or RESULTS / default_name
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="omb-bench-") as tmp:
        bench = Bench(plan, Path(tmp), logdir, bridge_src=args.bridge_src, bridge_env=bridge_env)
        bench.with_echo = not args.no_echo
        bench.with_nodered = not args.no_nodered
        bench.workers = args.workers
        if args.slow_levels:
            bench.slow_levels = [int(c) for c in args.slow_levels.split(",")]
        bench.nodered_cache = args.nodered_dir
        if args.tls:
            bench.tls_cert = make_tls(Path(tmp))
        if args.profile:
            try:
                bench.start_broker()
                bench.start_upstream()
                return profile(bench, args.profile_concurrency, native=args.profile_native)
            finally:
                bench.close()
        try:
            bench.start_broker()
            bench.start_upstream()
            print(
                f"broker 127.0.0.1:{bench.broker_port}, upstream ports {bench.instant_port}"
                f" (instant) and {bench.slow_port} ({SLOW_MS:g} ms); {plan.name} plan"
            )
            for name in only:
                if name == "instant":
                    bench.guarded("bridge", bench.run_instant)
                elif name == "slow":
                    bench.guarded("bridge 200ms", bench.run_slow)
                else:
                    bench.guarded(name, bench.run_audio, name)
        finally:
            bench.close()
    doc: dict[str, Any] = {
        "machine": machine_info(),
        "plan": vars_of(plan),
        "bench_config": {
            "max_concurrency": "default",
            "max_connections": "default",
            "broker_max_inflight": BROKER_INFLIGHT,
            "slow_upstream_ms": SLOW_MS,
        },
        "bridge_src": str(args.bridge_src) if args.bridge_src else None,
        "bridge_env": bridge_env,
        "tls": args.tls,
        "rows": aggregate(bench.runs),
        "runs": bench.runs,
        "bridges": bench.bridges,
        "nodered": bench.nodered_facts,
        "wall_s": round(time.monotonic() - started, 1),
    }
    doc["comparison"] = comparison(doc["rows"], bench.runs)
    doc["targets"] = evaluate(doc)
    out.write_text(json.dumps(doc, indent=1) + "\n")
    print()
    print(table(doc))
    print()
    if doc["comparison"]:
        print(comparison_table(doc))
        print()
    for line in summary_lines(doc):
        print(line)
    print()
    for t in doc["targets"]:
        verdict = {True: "PASS", False: "FAIL", None: "N/A "}[t["pass"]]
        print(f"{verdict}  {t['target']}: {t['measured']}")
    if out.name == "latest.json":
        chart(doc, BENCH / "chart.png")
        print(f"\nwrote {shown(out)} and bench/chart.png in {doc['wall_s']:.0f} s")
    else:
        print(f"\nwrote {shown(out)} in {doc['wall_s']:.0f} s")
    return 0 if all("failed" not in r for r in bench.runs) else 1


def make_tls(folder: Path) -> Path:
    """A CA and a certificate for 127.0.0.1 (trustme); every process started from here on trusts
    the CA alone (SSL_CERT_FILE for OpenSSL, NODE_EXTRA_CA_CERTS for Node-RED). The cert's PEM."""
    import trustme  # the test extra; only for --tls

    ca = trustme.CA()
    ca_path, cert_path = folder / "ca.pem", folder / "upstream.pem"
    ca.cert_pem.write_to_path(str(ca_path))
    ca.issue_cert("127.0.0.1").private_key_and_cert_chain_pem.write_to_path(str(cert_path))
    os.environ["SSL_CERT_FILE"] = os.environ["NODE_EXTRA_CA_CERTS"] = str(ca_path)
    return cert_path


def profile(bench: Bench, concurrency: int, seconds: float = 10.0, native: bool = False) -> int:
    """py-spy the bridge under the instant load at `concurrency`: an SVG and a text summary."""
    spy = Path(PY).with_name("py-spy")
    if not spy.exists():
        raise SystemExit(f"{spy} not found: .venv/bin/pip install -e '.[bench]'")
    suffix = "" if concurrency == CONCURRENCY else f"-c{concurrency}"
    suffix += "-native" if native else ""
    svg = BENCH / f"profile{suffix}.svg"
    raw = RESULTS / f"profile-c{concurrency}{'-native' if native else ''}.raw.txt"
    count = int(2 * seconds * (1500 if concurrency > 1 else 700)) + 2000
    with bench.bridge("profile") as facts:
        pid = facts["pid"]
        loader = threading.Thread(
            target=bench.load,
            args=("bridge", "bridge", bench.watch(pid)),
            kwargs={"concurrency": concurrency, "count": count, "warmup": 1000},
        )
        loader.start()
        time.sleep(1.5)
        for fmt_name, path in (("raw", raw), ("flamegraph", svg)):
            # One after the other: two py-spy processes cannot both ptrace the bridge.
            argv = [str(spy), "record", "--pid", str(pid), "--rate", "200"]
            if native:
                argv.append("--native")
            argv += ["--duration", str(int(seconds)), "--format", fmt_name, "-o", str(path)]
            with (RESULTS / f"py-spy-{fmt_name}.log").open("wb") as log:
                try:
                    subprocess.run(argv, stdout=log, stderr=log, timeout=seconds + 30, check=False)
                except subprocess.TimeoutExpired:
                    print(f"py-spy ({fmt_name}) did not finish in time")
        loader.join(bench.plan.time_limit_s + 150)
    text = summarize_profile(raw, concurrency)
    summary = BENCH / f"profile-c{concurrency}{'-native' if native else ''}.txt"
    summary.write_text(text)
    print(text)
    print(f"wrote {svg.relative_to(ROOT)} and {summary.relative_to(ROOT)}")
    return 0


def summarize_profile(raw: Path, concurrency: int, top: int = 25) -> str:
    """Self and inclusive sample shares per function and per package, from py-spy raw stacks."""
    own: dict[str, int] = {}
    inclusive: dict[str, int] = {}
    package: dict[str, int] = {}
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        raw_frames = stack.split(";")
        python = [f for f in raw_frames if f.startswith("<module>")]
        if not python or raw_frames[-1].startswith(_IDLE_LEAVES):
            continue  # another thread (the idle resolver pool), or the loop waiting for I/O
        total += count
        frames = [_frame_name(f) for f in raw_frames]
        own[frames[-1]] = own.get(frames[-1], 0) + count
        for name in set(frames):
            inclusive[name] = inclusive.get(name, 0) + count
        pkg = _package(stack.split(";")[-1])
        package[pkg] = package.get(pkg, 0) + count
    lines = [
        f"py-spy (200 Hz), the bridge under instant load at C={concurrency}: {total} samples"
        " of the event-loop thread while busy (waits for I/O left out)"
    ]
    for title, table_ in (
        ("self time by package", package),
        ("self time by function", own),
        ("inclusive time by function", inclusive),
    ):
        lines.append(f"\n{title}:")
        for name, count in sorted(table_.items(), key=lambda kv: -kv[1])[:top]:
            lines.append(f"  {100 * count / max(total, 1):5.1f}%  {name}")
    return "\n".join(lines) + "\n"


_IDLE_LEAVES = (
    "EpollSelector.select",  # asyncio's loop waiting for I/O
    "Runner.run",  # uvloop's loop (native code) waiting for I/O
    "BaseEventLoop.run_forever",
    "BaseEventLoop.run_until_complete",
)


def _frame_name(frame: str) -> str:
    """'fn (path/to/module.py:123)' -> 'fn (module path from the package root)'."""
    name, _, where = frame.partition(" (")
    path = where.rstrip(")").rsplit(":", 1)[0]
    for marker in ("site-packages/", "python3.11/", "/work/", "/main/"):
        if marker in path:
            path = path.rsplit(marker, 1)[1]
    return f"{name} ({path})"


def _package(frame: str) -> str:
    """The top-level package (or stdlib module) a frame's file belongs to."""
    path = frame.partition(" (")[2].rstrip(")").rsplit(":", 1)[0]
    if "site-packages/" in path:
        return path.rsplit("site-packages/", 1)[1].split("/")[0]
    if "/bridge/" in path:
        return "bridge/" + path.rsplit("/bridge/", 1)[1]
    if "/lib/python3" in path:
        return "stdlib:" + path.rsplit("/", 1)[1]
    return path


def vars_of(plan: Plan) -> dict[str, Any]:
    """A plan as a plain dict (slots dataclass)."""
    return {name: getattr(plan, name) for name in Plan.__dataclass_fields__}


if __name__ == "__main__":
    sys.exit(main())
