"""`[runtime] workers`: the pure rules, then a supervisor and real worker processes on Mosquitto."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import urllib.request
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from support.bridge_runner import TEST_API_KEY, BridgeProcess, make_config
from support.broker import MosquittoBroker, free_port
from support.cli import LEAKS, cli
from support.mqtt_client import TestClient, durable_client
from support.standin import Reply, Standin

from bridge.config import BridgeConfig, load_config
from bridge.errors import EX_CONFIG, ConfigError
from bridge.ha import discovery as homeassistant
from bridge.pipeline.stats import Stats
from bridge.workers import protocol as workers


def _config(**sections: dict[str, Any]) -> BridgeConfig:
    return BridgeConfig.model_validate(sections)


# --- the pure rules -------------------------------------------------------------------------


def test_auto_is_one_worker_per_core_capped_and_a_number_is_taken_as_given() -> None:
    auto = _config(mqtt={"host": "b"}, runtime={"workers": "auto"})
    assert workers.resolve_workers(auto, cores=lambda: 4) == (4, None)
    assert workers.resolve_workers(auto, cores=lambda: 64) == (workers.AUTO_MAX, None)
    assert workers.resolve_workers(auto, cores=lambda: 1) == (1, None)
    three = _config(mqtt={"host": "b"}, runtime={"workers": 3})
    assert workers.resolve_workers(three, cores=lambda: 1) == (3, None)


def test_the_embedded_broker_gets_one_worker_with_the_reason() -> None:
    config = _config(runtime={"workers": 4})
    assert workers.resolve_workers(config) == (1, workers.EMBEDDED_REASON)


def test_workers_config_from_file_and_environment(tmp_path: Path) -> None:
    path = tmp_path / "b.toml"
    path.write_text('[runtime]\nworkers = "auto"\n', encoding="utf-8")
    assert load_config(path, environ={}).runtime.workers == "auto"
    assert load_config(path, environ={"OMB_RUNTIME__WORKERS": "3"}).runtime.workers == 3
    for bad in ("0", "many", "65"):
        with pytest.raises(ConfigError, match=r"runtime\.workers"):
            load_config(path, environ={"OMB_RUNTIME__WORKERS": bad})


def test_worker_one_keeps_the_single_process_identity_the_others_get_their_own() -> None:
    config = _config(
        mqtt={"host": "b", "instance": "pi", "client_id": "omb"},
        journal={"path": "/var/lib/omb/journal.sqlite3"},
        runtime={"workers": 3},
    )
    first, third = workers.worker_config(config, 1), workers.worker_config(config, 3)
    assert (first.mqtt.client_id, third.mqtt.client_id) == ("omb", "omb-3")
    assert first.journal.path == "/var/lib/omb/journal.sqlite3"
    assert third.journal.path == "/var/lib/omb/journal-3.sqlite3"
    assert first.mqtt.shared_group == third.mqtt.shared_group == "omb-pi"
    assert (first.mqtt.instance, third.runtime.workers) == ("pi", 1)
    assert workers.supervisor_client_id(config) == "omb-supervisor"
    grouped = config.model_copy(
        update={"mqtt": config.mqtt.model_copy(update={"shared_group": "site"})}
    )
    assert workers.worker_config(grouped, 2).mqtt.shared_group == "site"


def test_workers_do_not_inherit_the_systemd_notify_socket() -> None:
    env = {"NOTIFY_SOCKET": "/run/x", "WATCHDOG_USEC": "1", "WATCHDOG_PID": "7", "HOME": "/h"}
    assert workers.worker_environ(env) == {"HOME": "/h"}


def test_report_lines_round_trip_and_garbage_is_not_a_report() -> None:
    stats = Stats(requests_total=5, errors_total=1, in_flight=2, last_latency_ms=3.5)
    stats.by_code["timeout"] = 1
    event, parsed = workers.parse_report(workers.report_line("stats", stats)) or ("", None)
    assert (event, parsed) == ("stats", stats)
    assert workers.parse_report(workers.report_line("ready")) == ("ready", None)
    for garbage in (
        b"",
        b"\xff\n",
        b"[]\n",
        b'{"event": 1}\n',
        b'{"event":"s","stats":{"in_flight":"x"}}',
    ):
        assert workers.parse_report(garbage) is None


def test_a_report_with_a_huge_error_stays_one_readable_line() -> None:
    stats = Stats(requests_total=1, errors_total=1)
    stats.last_error = {"code": "upstream_error", "message": "x" * workers.MAX_LINE, "status": 500}
    line = workers.report_line("stats", stats)
    assert len(line) < workers.MAX_LINE and line.count(b"\n") == 1
    _, parsed = workers.parse_report(line) or ("", None)
    assert parsed is not None and parsed.last_error is not None
    assert parsed.last_error["code"] == "upstream_error"


def test_totals_sum_the_workers_and_keep_what_a_dead_worker_counted() -> None:
    totals = workers.StatsTotals()
    totals.update(
        1,
        Stats(
            requests_total=10,
            errors_total=2,
            in_flight=3,
            last_latency_ms=1.0,
            by_code={"timeout": 2},
        ),
    )
    totals.update(2, Stats(requests_total=5, in_flight=1, last_latency_ms=2.0))
    total = totals.total()
    assert (total.requests_total, total.errors_total, total.in_flight) == (15, 2, 4)
    assert total.last_latency_ms == 2.0  # worker 2 counted last
    assert total.by_code == {"timeout": 2}
    totals.retire(1)  # died; its replacement starts from zero
    totals.update(
        1,
        Stats(
            requests_total=1,
            errors_total=1,
            last_latency_ms=9.0,
            by_code={"timeout": 1},
            last_error={"code": "timeout"},
        ),
    )
    total = totals.total()
    assert (total.requests_total, total.errors_total, total.in_flight) == (16, 3, 1)
    assert (total.last_latency_ms, total.last_error) == (9.0, {"code": "timeout"})
    assert total.by_code == {"timeout": 3}


# --- a supervisor and its workers on Mosquitto ------------------------------------------------


def _start(
    tmp_path: Path,
    mosquitto: MosquittoBroker,
    standin: Standin,
    prefix: str,
    *,
    count: int | str = 2,
    env: dict[str, str] | None = None,
    stats_interval: float = 0,
) -> BridgeProcess:
    path, key_env = make_config(
        tmp_path,
        broker_port=mosquitto.port,
        api_base=standin.url,
        prefix=prefix,
        mqtt={"instance": "pool", "session_expiry": 300},
        extra={
            "runtime": {"workers": count},
            "logging": {"level": "info"},
            "homeassistant": {"discovery": True, "stats_interval": stats_interval},
        },
    )
    return BridgeProcess(path, {**key_env, **(env or {})}, tmp_path / "bridge.log")


def _worker_pids(proc: BridgeProcess) -> dict[int, int]:
    """The latest pid of each worker, from the supervisor's `worker started` lines."""
    pids: dict[int, int] = {}
    for line in proc.log_text().splitlines():
        if '"event": "worker started"' in line:
            record = json.loads(line)
            pids[record["worker"]] = record["pid"]
    return pids


def _logged(proc: BridgeProcess, event: str, **fields: Any) -> bool:
    """Whether `proc` logged a JSON line with this event and these fields."""
    for line in proc.log_text().splitlines():
        if f'"event": "{event}"' in line:
            record = json.loads(line)
            if all(record.get(k) == v for k, v in fields.items()):
                return True
    return False


def _handled_by(proc: BridgeProcess) -> Counter[int]:
    return Counter(
        json.loads(line)["worker"]
        for line in proc.log_text().splitlines()
        if '"event": "request"' in line
    )


def _publish(client: TestClient, first: int, last: int) -> None:
    for i in range(first, last):
        client.publish(
            client.topic("request", "createModeration", f"w{i}"),
            {"transaction": i, "input": str(i)},
        )


@pytest.fixture
def pool(
    tmp_path: Path, mosquitto: MosquittoBroker, standin: Standin, topic_prefix: str
) -> Iterator[BridgeProcess]:
    proc = _start(tmp_path, mosquitto, standin, topic_prefix, stats_interval=0.2)
    try:
        proc.start()
        yield proc
    finally:
        proc.close()
        for pid in _worker_pids(proc).values():
            _kill_quietly(pid)
        assert TEST_API_KEY not in proc.log_text()


def _kill_quietly(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


def test_two_workers_share_the_requests_and_look_like_one_bridge(
    pool: BridgeProcess, client: TestClient, standin: Standin, topic_prefix: str
) -> None:
    total = 400
    client.subscribe(f"{topic_prefix}/#")
    state = client.wait_for_one(f"{topic_prefix}/bridge/+/state")
    assert state.topic == f"{topic_prefix}/bridge/pool/state" and state.json() == {
        "state": "online"
    }
    info = client.wait_for_one(f"{topic_prefix}/bridge/pool/info").json()
    assert info["workers"] == 2
    _publish(client, 0, total)
    replies = client.wait_for(f"{topic_prefix}/response/#", total, timeout=60)
    assert Counter(r.json()["transaction"] for r in replies) == Counter(range(total))
    assert len(standin.requests) == total
    shares = _handled_by(pool)
    assert set(shares) == {1, 2} and min(shares.values()) >= total // 5, shares
    # One bridge to the outside: one state topic, one info, the stats summed over the workers.
    client.wait_for(
        f"{topic_prefix}/bridge/pool/stats", where=lambda m: m.json()["requests_total"] == total
    )
    assert {m.topic for m in client.messages(f"{topic_prefix}/bridge/#")} == {
        f"{topic_prefix}/bridge/pool/{name}" for name in ("state", "info", "stats")
    }
    # One Home Assistant device, whose availability is the supervisor's state topic.
    config = load_config(pool.config_path, environ={})
    client.subscribe(homeassistant.discovery_topic(config))
    device = client.wait_for_one(homeassistant.discovery_topic(config)).json()
    assert device["cmps"]["requests"]["availability"][0]["topic"] == state.topic


def test_a_worker_killed_mid_run_loses_nothing_and_is_replaced(
    pool: BridgeProcess, client: TestClient, standin: Standin, topic_prefix: str
) -> None:
    total = 300
    standin.set_latency(0.05)
    client.subscribe(f"{topic_prefix}/response/#")
    victim = _worker_pids(pool)[2]
    _publish(client, 0, total // 3)
    os.kill(victim, signal.SIGKILL)
    _publish(client, total // 3, total)
    # At least once: a reply that was out but not acknowledged at the kill may come twice, so
    # count distinct transactions, allowing a few duplicate replies.
    seen: set[int] = set()
    for expected in range(total, total + 50):
        messages = client.wait_for(f"{topic_prefix}/response/#", expected, timeout=90)
        seen = {m.json()["transaction"] for m in messages}
        if seen == set(range(total)):
            break
    assert seen == set(range(total))
    log = pool.log_text()
    assert '"event": "worker died; starting another"' in log and "killed by SIGKILL" in log
    assert _worker_pids(pool)[2] != victim
    # The replacement serves: the supervisor still says online and a new request is answered.
    assert client.request("createModeration", {"input": "after"}, suffix="after")["status"] == "ok"
    assert pool.terminate() == 0


def test_sigterm_lets_every_worker_finish_its_requests(
    pool: BridgeProcess, client: TestClient, standin: Standin, topic_prefix: str
) -> None:
    standin.set_latency(1.0)
    client.subscribe(f"{topic_prefix}/#")
    _publish(client, 0, 8)
    standin.wait_for_requests(8, timeout=20)
    assert pool.terminate() == 0
    replies = client.wait_for(f"{topic_prefix}/response/#", 8, timeout=10)
    assert {r.json()["transaction"] for r in replies} == set(range(8))
    assert set(_handled_by(pool)) == {1, 2}
    state = client.messages(f"{topic_prefix}/bridge/pool/state")[-1]
    assert state.json() == {"state": "offline"}
    for pid in _worker_pids(pool).values():
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def test_a_second_sigterm_kills_a_worker_that_cannot_stop(
    pool: BridgeProcess, client: TestClient, topic_prefix: str
) -> None:
    frozen = _worker_pids(pool)[2]
    os.kill(frozen, signal.SIGSTOP)  # a stuck event loop: it cannot act on `stop` or `stop-now`
    assert pool.proc is not None
    pool.proc.send_signal(signal.SIGTERM)
    _await(lambda: _logged(pool, "stopping", role="supervisor"), timeout=20)
    assert pool.terminate(timeout=30) == 0  # the second: stop now, and kill what does not stop
    assert _logged(pool, "worker did not stop; killing it", worker=2)
    _wait_gone(frozen, timeout=10)


def test_workers_stop_when_their_supervisor_is_killed(
    pool: BridgeProcess, client: TestClient, topic_prefix: str
) -> None:
    client.subscribe(f"{topic_prefix}/bridge/pool/state")
    client.wait_for_one(where=lambda m: m.json() == {"state": "online"})
    pids = _worker_pids(pool)
    pool.kill()
    # The last will says offline, and no worker outlives the supervisor (end of file on its link).
    client.wait_for_one(where=lambda m: m.json() == {"state": "offline"}, timeout=20)
    for pid in pids.values():
        _wait_gone(pid, timeout=20)


def _await(condition: Any, timeout: float, what: str = "condition") -> Any:
    """`condition()` once truthy, polling another process (bounded): its log file and its exit
    (it is not our child) have no event to wait on."""
    pause = threading.Event()
    for _ in range(int(timeout / 0.05)):
        if value := condition():
            return value
        pause.wait(0.05)
    raise AssertionError(f"{what}: not within {timeout}s")


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def _wait_gone(pid: int, timeout: float) -> None:
    _await(lambda: _gone(pid), timeout, f"process {pid} gone")


def test_systemd_hears_ready_once_every_worker_serves_and_the_watchdog_after(
    tmp_path: Path, mosquitto: MosquittoBroker, standin: Standin, topic_prefix: str
) -> None:
    notify_path = tmp_path / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sink:
        sink.bind(str(notify_path))
        sink.settimeout(30)
        proc = _start(
            tmp_path,
            mosquitto,
            standin,
            topic_prefix,
            env={"NOTIFY_SOCKET": str(notify_path), "WATCHDOG_USEC": "200000"},
        )
        try:
            proc.start()
            messages = [sink.recv(4096).decode()]
            assert messages[0].startswith("READY=1"), messages
            assert proc.log_text().count('"event": "worker ready"') == 2
            while "WATCHDOG=1" not in messages[-1]:
                messages.append(sink.recv(4096).decode())
            assert proc.terminate() == 0
            while not messages[-1].startswith("STOPPING=1"):
                messages.append(sink.recv(4096).decode())
        finally:
            proc.close()
    # Only the supervisor speaks to systemd: one READY=1, not one per process.
    assert sum(m.startswith("READY=1") for m in messages) == 1


def test_stopped_before_its_workers_could_connect_the_supervisor_still_exits(
    tmp_path: Path,
) -> None:
    path, env = make_config(
        tmp_path, broker_port=free_port(), api_base="http://127.0.0.1:9", prefix="nobroker"
    )
    path.write_text(path.read_text(encoding="utf-8") + "\n[runtime]\nworkers = 2\n")
    proc = BridgeProcess(path, env, tmp_path / "nobroker.log")
    with (tmp_path / "nobroker.log").open("wb") as log:  # the child keeps its own descriptor
        proc.proc = subprocess.Popen(
            [sys.executable, "-m", "bridge", "--config", str(path)],
            stdout=subprocess.DEVNULL,
            stderr=log,
            env=proc.env,
        )
    try:
        # Nothing listens on the broker port: no worker ever serves; stop comes first.
        pids = _await(lambda: len(_worker_pids(proc)) == 2 and _worker_pids(proc), timeout=20)
        assert proc.terminate(timeout=20) == 0
        for pid in pids.values():
            _wait_gone(pid, timeout=20)
    finally:
        proc.close()


def test_with_the_embedded_broker_one_process_serves_and_says_why(tmp_path: Path) -> None:
    path, env = make_config(
        tmp_path,
        broker_port=free_port(),
        api_base="http://127.0.0.1:9",
        prefix="solo",
        mqtt={"host": ""},
        extra={"runtime": {"workers": 2}, "logging": {"level": "info"}},
    )
    proc = BridgeProcess(path, env, tmp_path / "solo.log")
    try:
        proc.start()
        log = proc.log_text()
        assert re.search(r"running 1 worker, not 2: the embedded trial broker has no shared", log)
        assert '"event": "worker started"' not in log
        assert proc.terminate() == 0
    finally:
        proc.close()


def test_an_unusable_tls_file_stops_the_supervisor_with_78_and_one_line(tmp_path: Path) -> None:
    ca = tmp_path / "ca.pem"
    ca.write_text("-----BEGIN CERTIFICATE-----\nnot base64 at all\n-----END CERTIFICATE-----\n")
    path, env = make_config(
        tmp_path,
        broker_port=free_port(),
        api_base="http://127.0.0.1:9",
        prefix="tls",
        extra={"runtime": {"workers": 2}, "mqtt.tls": {"ca_file": str(ca)}},
    )
    proc = cli("--config", str(path), dev=True, env={**env, "HOME": str(tmp_path)})
    assert proc.returncode == EX_CONFIG
    output = proc.stdout + proc.stderr
    assert "cannot use the [mqtt.tls] files" in output
    assert '"event": "worker started"' not in output  # no worker was started for nothing
    for leak in LEAKS:
        assert leak not in output


def test_turning_workers_on_keeps_the_requests_queued_for_the_single_process(
    tmp_path: Path,
    mosquitto: MosquittoBroker,
    standin: Standin,
    topic_prefix: str,
    client: TestClient,
) -> None:
    single = _start(tmp_path, mosquitto, standin, topic_prefix, count=1)
    single.start()
    assert single.terminate() == 0
    client.subscribe(f"{topic_prefix}/response/#")
    _publish(client, 0, 20)  # queued in the stopped bridge's session
    pool = BridgeProcess(single.config_path, single.env, tmp_path / "pool.log")
    pool.config_path.write_text(
        pool.config_path.read_text(encoding="utf-8").replace("workers = 1", "workers = 2"),
        encoding="utf-8",
    )
    try:
        pool.start()
        _publish(client, 20, 60)
        client.wait_for(f"{topic_prefix}/response/#", 60, timeout=60)
        assert pool.terminate() == 0
    finally:
        pool.close()
        for pid in _worker_pids(pool).values():
            _kill_quietly(pid)
    # Each request once: the old session's plain subscription was dropped, not served twice.
    replies = Counter(
        m.json()["transaction"] for m in client.messages(f"{topic_prefix}/response/#")
    )
    assert replies == Counter(range(60))
    assert len(standin.requests) == 60


def test_workers_and_supervisor_ride_out_a_broker_restart(
    tmp_path: Path, own_mosquitto: MosquittoBroker, standin: Standin, topic_prefix: str
) -> None:
    total = 40
    standin.set_latency(1.0)
    client = durable_client(own_mosquitto, topic_prefix)
    proc = _start(tmp_path, own_mosquitto, standin, topic_prefix)
    try:
        proc.start()
        client.subscribe(f"{topic_prefix}/bridge/pool/state")
        _publish(client, 0, total)
        standin.wait_for_requests(total, timeout=20)
        before_restart = client.mark()
        own_mosquitto.restart()  # graceful: Mosquitto saves sessions and in-flight messages
        client.wait_connected(timeout=15)
        replies = client.wait_for(f"{topic_prefix}/response/#", total, timeout=60)
        assert {r.json()["transaction"] for r in replies} == set(range(total))
        # Every process reconnected: the supervisor says online again, both workers serve.
        log = proc.log_text()
        assert log.count('"event": "broker connection lost"') == 3, log[-3000:]
        client.wait_for(
            f"{topic_prefix}/bridge/pool/state",
            after=before_restart,
            where=lambda m: m.json()["state"] == "online",
        )
        after = client.mark()
        _publish(client, total, total + 20)
        client.wait_for(f"{topic_prefix}/response/#", 20, timeout=30, after=after)
        assert proc.terminate() == 0
    finally:
        proc.close()
        client.disconnect()
        for pid in _worker_pids(proc).values():
            _kill_quietly(pid)


def test_a_stuck_worker_is_killed_and_replaced(
    tmp_path: Path, mosquitto: MosquittoBroker, standin: Standin, topic_prefix: str
) -> None:
    proc = _start(tmp_path, mosquitto, standin, topic_prefix)
    text = proc.config_path.read_text(encoding="utf-8")
    proc.config_path.write_text(
        text.replace("workers = 2", "workers = 2\nworker_silence = 2.0"), encoding="utf-8"
    )
    try:
        proc.start()
        stuck = _worker_pids(proc)[1]
        os.kill(stuck, signal.SIGSTOP)  # a frozen event loop, as far as the supervisor can tell
        _wait_gone(stuck, timeout=20)
        with TestClient.for_broker(mosquitto, prefix=topic_prefix) as c:
            # The replacement takes over worker 1's session and serves.
            for i in range(4):
                assert c.request("listModels", {"transaction": i}, suffix=str(i))["status"] == "ok"
        log = proc.log_text()
        assert '"event": "worker stopped reporting; killing it"' in log
        assert _worker_pids(proc)[1] != stuck
        assert proc.terminate() == 0
    finally:
        proc.close()
        for pid in _worker_pids(proc).values():
            _kill_quietly(pid)


def test_switching_workers_off_on_off_runs_every_request_exactly_once(
    tmp_path: Path,
    mosquitto: MosquittoBroker,
    standin: Standin,
    topic_prefix: str,
    client: TestClient,
) -> None:
    """Requests sent while nothing runs, while one bridge runs and while workers run: each one is
    executed once and answered once, across workers off, on, off (issue 23)."""
    pool = _start(tmp_path, mosquitto, standin, topic_prefix, count=2)
    config = pool.config_path
    client.subscribe(f"{topic_prefix}/response/#")

    def run(count: int, name: str, during: tuple[int, int], expect: int) -> None:
        config.write_text(
            re.sub(r"workers = \d+", f"workers = {count}", config.read_text(encoding="utf-8")),
            encoding="utf-8",
        )
        proc = BridgeProcess(config, pool.env, tmp_path / f"{name}.log")
        try:
            proc.start()
            _publish(client, *during)
            client.wait_for(f"{topic_prefix}/response/#", expect, timeout=60)
            assert proc.terminate() == 0
        finally:
            proc.close()
            for pid in _worker_pids(proc).values():
                _kill_quietly(pid)

    run(2, "workers-1", (0, 10), 10)
    _publish(client, 10, 20)  # nothing runs: queued in the group, in both workers' sessions
    run(1, "single-1", (20, 30), 30)  # the single bridge takes over worker 2's session
    _publish(client, 30, 40)  # queued for the single bridge's session
    run(2, "workers-2", (40, 50), 50)
    _publish(client, 50, 60)
    run(1, "single-2", (60, 70), 70)
    replies = Counter(
        m.json()["transaction"] for m in client.messages(f"{topic_prefix}/response/#")
    )
    assert replies == Counter(range(70))
    assert len(standin.requests) == 70


def _console_get(port: int, path: str) -> Any:
    """GET one of the console's JSON answers over real HTTP."""
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}{path}", headers={"Host": f"127.0.0.1:{port}"}
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())


def test_the_supervisor_serves_the_console_with_the_summed_view(
    tmp_path: Path,
    mosquitto: MosquittoBroker,
    standin: Standin,
    client: TestClient,
    topic_prefix: str,
    processes: list[BridgeProcess],
) -> None:
    port = free_port()
    path, key_env = make_config(
        tmp_path,
        broker_port=mosquitto.port,
        api_base=standin.url,
        prefix=topic_prefix,
        mqtt={"instance": "pool"},
        extra={"runtime": {"workers": 2}, "console": {"enabled": True, "port": port}},
    )
    proc = BridgeProcess(path, key_env, tmp_path / "bridge.log")
    processes.append(proc)
    proc.start()
    total = 12
    client.subscribe(f"{topic_prefix}/response/#")  # before publishing: no reply goes unseen
    _publish(client, 0, total)
    client.wait_for(f"{topic_prefix}/response/#", total, timeout=30)
    shares = _handled_by(proc)
    assert set(shares) == {1, 2}  # both workers answered some
    rows = _await(
        lambda: (r := _console_get(port, "/api/requests")["requests"]) and len(r) == total and r,
        15,
        "every worker's requests in the console's live list",
    )
    assert sorted(r["transaction"] for r in rows) == list(range(total))
    status = _await(
        lambda: (
            (s := _console_get(port, "/api/status"))["counters"].get("requests_total") == total
            and s
        ),
        15,
        "the summed counters",
    )
    assert status["workers"] == 2 and status["state"] == "online"
    assert TEST_API_KEY not in json.dumps(status)
    journal = _await(  # both workers' files, each answer journaled once
        lambda: (j := _console_get(port, "/api/status")["journal"])["entries"] == total and j,
        15,
        "every worker's journal entries summed",
    )
    assert journal["kind"] == "sqlite" and len(journal["path"]) == 2 and journal["bytes"] > 0
    # The try page's request goes through the broker to a worker; its answer comes back here.
    try_request = urllib.request.Request(
        f"http://127.0.0.1:{port}/api/try",
        data=json.dumps({"method": "createModeration", "payload": {"input": "x"}}).encode(),
        headers={
            "Host": f"127.0.0.1:{port}",
            "Origin": f"http://127.0.0.1:{port}",
            "X-OMB-Console": "1",
            "Content-Type": "application/json",
        },
        method="POST",
    )
    with urllib.request.urlopen(try_request, timeout=30) as response:
        tried = json.loads(response.read())
    assert tried["code"] is None and tried["topic"].endswith("/createModeration/console/1")
    assert json.loads(tried["reply"]["text"])["status"] == "ok"
    # A streamed try: a worker publishes the events, the supervisor's console reads them back.
    chunks = [
        {"object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {"content": c},
         "finish_reason": None}]} for c in ("a", "b")
    ] + [{"object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {},
          "finish_reason": "stop"}]}]  # fmt: skip
    standin.script("POST", "/chat/completions", Reply(sse=[(None, json.dumps(c)) for c in chunks]))
    payload = {"model": "m", "messages": [{"role": "user", "content": "x"}], "stream": True}
    try_request = urllib.request.Request(
        f"http://127.0.0.1:{port}/api/try/stream",
        data=json.dumps({"method": "createChatCompletion", "payload": payload}).encode(),
        headers=dict(try_request.headers),
        method="POST",
    )
    with urllib.request.urlopen(try_request, timeout=30) as response:
        frames = response.read().decode().split("\n\n")
    events = [
        (name.removeprefix("event: "), json.loads(data.removeprefix("data: ")))
        for name, data in (f.split("\n") for f in frames if f)
    ]
    assert [name for name, _ in events] == ["published", "event", "event", "event", "reply"]
    assert [e["event"]["seq"] for name, e in events if name == "event"] == [0, 1, 2]
    assert json.loads(events[-1][1]["reply"]["text"])["data"]["choices"][0]["message"] == {
        "role": "assistant",
        "content": "ab",
    }
