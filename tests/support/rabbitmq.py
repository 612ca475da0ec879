"""A RabbitMQ node of its own (Debian's rabbitmq-server, MQTT plugin) on free loopback ports.

Never the machine's RabbitMQ: its own node name, ports, Mnesia and log folders and config, all in
a temporary folder under /tmp (removed at stop). MQTT 3.1.1 only; retained messages reach only
exact-topic subscriptions (3.10). Started in about 15 s here; `stop()` (always called by the
context manager) kills it. Debian's wrapper runs the node as the `rabbitmq` user, so its folder
is made writable for it.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Self

from support.broker import free_port


class RabbitMqNode:
    """`rabbitmq-server` with the MQTT plugin; `start()` returns once MQTT accepts connections."""

    def __init__(self) -> None:
        # Not pytest's tmp_path: its parents are 0700 and the node runs as the `rabbitmq` user.
        self.folder = Path(tempfile.mkdtemp(prefix="omb-rabbitmq-"))
        self.host = "127.0.0.1"
        self.port = free_port()
        self.amqp_port = free_port()
        self.dist_port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    def _environ(self) -> dict[str, str]:
        f = self.folder
        return {
            **os.environ,
            "HOME": str(f),
            "RABBITMQ_NODENAME": f"omb-test-{self.port}@localhost",
            "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
            "RABBITMQ_NODE_PORT": str(self.amqp_port),
            "RABBITMQ_DIST_PORT": str(self.dist_port),
            "RABBITMQ_MNESIA_BASE": str(f / "mnesia"),
            "RABBITMQ_LOG_BASE": str(f / "log"),
            "RABBITMQ_CONFIG_FILE": str(f / "rabbit"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(f / "enabled_plugins"),
            "RABBITMQ_PID_FILE": str(f / "pid"),
        }

    def start(self, timeout: float = 45.0) -> Self:
        """Write the config, start the node, wait (bounded) until its MQTT port accepts."""
        server = shutil.which("rabbitmq-server") or "/usr/sbin/rabbitmq-server"
        f = self.folder
        for sub in ("mnesia", "log"):
            (f / sub).mkdir(parents=True, exist_ok=True)
        (f / "rabbit.conf").write_text(
            f"listeners.tcp.default = 127.0.0.1:{self.amqp_port}\n"
            f"mqtt.listeners.tcp.default = 127.0.0.1:{self.port}\n"
            "mqtt.allow_anonymous = true\nloopback_users = none\n"
        )
        (f / "enabled_plugins").write_text("[rabbitmq_mqtt].\n")
        for path in (f, *f.rglob("*")):
            path.chmod(0o777 if path.is_dir() else 0o666)
        self.proc = subprocess.Popen(
            [server],
            env=self._environ(),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"rabbitmq-server exited with {self.proc.returncode}")
            try:
                socket.create_connection((self.host, self.port), timeout=0.5).close()
                return self
            except OSError:
                time.sleep(0.2)  # polling a port that is not open yet; bounded by the deadline
        self.stop()
        raise TimeoutError(f"RabbitMQ's MQTT listener not up within {timeout:g} s")

    def stop(self, timeout: float = 20.0) -> None:
        """Stop the node: SIGTERM to its process group (the wrapper and the Erlang VM), then
        SIGKILL."""
        proc, self.proc = self.proc, None
        if proc is None:
            return
        pid_file = self.folder / "pid"
        if pid_file.exists():  # the Erlang VM, in case the wrapper made a session of its own
            with contextlib.suppress(ValueError, ProcessLookupError, PermissionError):
                os.kill(int(pid_file.read_text().strip()), signal.SIGTERM)
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                proc.wait(timeout)
                break
            except subprocess.TimeoutExpired:
                continue
        shutil.rmtree(self.folder, ignore_errors=True)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
