"""Realtime audio through the bridge: latency per 20 ms chunk of 24 kHz PCM16, each hop, and CPU.

Hop in: a device's MQTT publish of one chunk -> the stand-in receiving its
`input_audio_buffer.append`. Hop out: the stand-in sending a `response.output_audio.delta` ->
the device receiving the raw bytes. The broker alone (a publish of the same size to a plain
subscriber in this process) is measured too: the bridge's added latency is a hop minus that.

    .venv/bin/python bench/realtime.py --sessions 1,20 --seconds 10
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho

sys.path[:0] = [str(Path(__file__).resolve().parents[1] / "tests"), str(Path(__file__).parent)]

from common import latency_summary, make_client, proc_sample  # noqa: E402
from support.bridge_runner import BridgeProcess, make_config  # noqa: E402
from support.broker import MosquittoBroker  # noqa: E402
from support.realtime_standin import RealtimeStandin  # noqa: E402

CHUNK = 960
"""20 ms of 24 kHz mono PCM16."""


class Devices:
    """`n` sessions' devices on one MQTT connection and one sending thread (the harness's own
    cost kept small: one paho thread, one pacing loop for every session)."""

    def __init__(self, port: int, prefix: str, n: int) -> None:
        self.prefix, self.n = prefix, n
        self.sent: dict[bytes, float] = {}
        self.received: dict[bytes, float] = {}
        self.open_count = 0
        self.all_open = threading.Event()
        self.client = make_client(f"bench-{prefix}")
        self.client.on_message = self._message
        self.client.connect("127.0.0.1", port)
        self.client.subscribe(f"{prefix}/response/realtime/#", qos=1)
        self.client.loop_start()

    def _message(self, client: Any, userdata: Any, msg: paho.MQTTMessage) -> None:
        if msg.topic.endswith("/audio"):
            self.received[bytes(msg.payload[:8])] = time.perf_counter()
        elif msg.topic.endswith("/state") and b'"open"' in msg.payload:
            self.open_count += 1
            if self.open_count == self.n:
                self.all_open.set()

    def _topic(self, i: int, verb: str) -> str:
        return f"{self.prefix}/request/realtime/s{i}/{verb}"

    def open(self) -> None:
        for i in range(self.n):
            self.client.publish(self._topic(i, "open"), json.dumps({"outputs": ["audio"]}), qos=1)
        if not self.all_open.wait(20):
            raise SystemExit("sessions did not open")

    def stream(self, seconds: float) -> None:
        start = time.perf_counter()
        for n in range(int(seconds * 50)):
            delay = start + n * 0.02 - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            for i in range(self.n):
                head = i.to_bytes(2, "big") + n.to_bytes(6, "big")
                self.sent[head] = time.perf_counter()
                self.client.publish(self._topic(i, "audio"), head + bytes(CHUNK - 8), qos=1)

    def close(self) -> None:
        for i in range(self.n):
            self.client.publish(self._topic(i, "close"), b"", qos=1).wait_for_publish(5)
        self.client.loop_stop()
        self.client.disconnect()


def broker_alone(port: int, count: int) -> dict[str, float]:
    """Latency of a 960-byte QoS 1 publish to a plain subscriber (the broker hop alone)."""
    got: dict[int, float] = {}
    done = threading.Event()
    sub = make_client("bench-sub")

    def on_message(client: Any, userdata: Any, msg: paho.MQTTMessage) -> None:
        got[int.from_bytes(msg.payload[:8], "big")] = time.perf_counter()
        if len(got) == count:
            done.set()

    sub.on_message = on_message
    sub.connect("127.0.0.1", port)
    sub.subscribe("bench/alone", qos=1)
    sub.loop_start()
    pub = make_client("bench-pub")
    pub.connect("127.0.0.1", port)
    pub.loop_start()
    time.sleep(0.5)  # the subscription settles (a bench, not a test: no event for it)
    sent: dict[int, float] = {}
    for n in range(count):
        sent[n] = time.perf_counter()
        pub.publish("bench/alone", n.to_bytes(8, "big") + bytes(CHUNK - 8), qos=1)
        time.sleep(0.02)
    done.wait(10)
    for client in (pub, sub):
        client.loop_stop()
        client.disconnect()
    return latency_summary([(got[n] - sent[n]) * 1000 for n in got])


def run(sessions: int, seconds: float, broker: MosquittoBroker, workdir: Path) -> dict[str, Any]:
    """One bridge process, `sessions` devices streaming for `seconds`; the hops and CPU."""
    with RealtimeStandin() as upstream:
        upstream.behaviour, upstream.validate = "echo", False
        prefix = f"bench{sessions}"
        path, env = make_config(
            workdir,
            broker_port=broker.port,
            api_base=upstream.url,
            prefix=prefix,
            extra={"logging": {"level": "info"}, "realtime": {"max_sessions": 64}},
        )
        bridge = BridgeProcess(path, env, workdir / f"bridge-{sessions}.log").start()
        try:
            assert bridge.proc is not None
            devices = Devices(broker.port, prefix, sessions)
            devices.open()
            before = proc_sample(bridge.proc.pid)
            devices.stream(seconds)
            deadline = time.monotonic() + 10
            total = sessions * int(seconds * 50)
            while time.monotonic() < deadline and len(devices.received) < total:
                time.sleep(0.05)
            after = proc_sample(bridge.proc.pid)
            arrivals = {h: t for c in upstream.connections for t, h in c.arrivals}
            echoed = {h: t for c in upstream.connections for t, h in c.echoed}
            hop_in = [(arrivals[h] - t) * 1000 for h, t in devices.sent.items() if h in arrivals]
            hop_out = [
                (devices.received[h] - echoed[h]) * 1000
                for h in devices.sent
                if h in devices.received and h in echoed
            ]
            devices.close()
        finally:
            bridge.terminate()
    assert before is not None and after is not None
    cpu = after.cpu_s - before.cpu_s
    return {
        "sessions": sessions,
        "chunks_sent": total,
        "chunks_back": len(hop_out),
        "hop_in": latency_summary(hop_in),
        "hop_out": latency_summary(hop_out),
        "bridge_cpu_s": round(cpu, 3),
        "cpu_ms_per_session_second": round(cpu * 1000 / (sessions * seconds), 3),
        "bridge_cpu_share_of_one_core": round(cpu / seconds, 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sessions", default="1,20")
    parser.add_argument("--seconds", type=float, default=10.0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        broker = MosquittoBroker(workdir / "mosquitto")
        broker.start()
        try:
            results = {
                "broker_alone": broker_alone(broker.port, 250),
                "runs": [
                    run(int(n), args.seconds, broker, workdir) for n in args.sessions.split(",")
                ],
                "cpus": os.cpu_count(),
                "loadavg": os.getloadavg(),
            }
        finally:
            broker.close()
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
