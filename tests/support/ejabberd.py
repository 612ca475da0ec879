"""ejabberd (Debian's package, its mod_mqtt) as a node of its own on free loopback ports.

MQTT 5 with `SharedSubscriptionAvailable = 0` and a granted session expiry of 300 s (its
`session_expiry` default) whatever the client asks. Anonymous MQTT login is refused, so one user
is registered (`USER`, `PASSWORD`). Its own node name, Erlang distribution port (no epmd) and
folder under /tmp (Debian's ejabberdctl runs the node as the `ejabberd` user, so pytest's 0700
tmp_path will not do); started in about 2 s here, always stopped (`ejabberdctl stop`, then a
kill of its process group) and its folder removed.
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

USER = "bridge@localhost"
PASSWORD = "secret-of-the-test-node"


class EjabberdNode:
    """`ejabberdctl ... foreground`; `start()` returns once MQTT accepts and the user exists."""

    def __init__(self) -> None:
        self.folder = Path(tempfile.mkdtemp(prefix="omb-ejabberd-"))
        self.host = "127.0.0.1"
        self.port = free_port()
        self.dist_port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    def _ctl(self, *args: str) -> list[str]:
        f = self.folder
        return [
            shutil.which("ejabberdctl") or "/usr/sbin/ejabberdctl",
            *("--config-dir", str(f), "--config", str(f / "ejabberd.yml")),
            *("--spool", str(f / "spool"), "--logs", str(f / "logs")),
            *("--node", f"omb-ejd-{self.port}@localhost"),
            *args,
        ]

    def _environ(self) -> dict[str, str]:
        dist = {"ERL_DIST_PORT": str(self.dist_port), "INET_DIST_INTERFACE": "127.0.0.1"}
        return {**os.environ, **dist}

    def start(self, timeout: float = 30.0) -> Self:
        """Write the config, start the node, wait (bounded) for MQTT, register the user."""
        f = self.folder
        (f / "ejabberd.yml").write_text(
            "hosts:\n  - localhost\nloglevel: warning\ncertfiles: []\n"
            f'listen:\n  -\n    port: {self.port}\n    ip: "127.0.0.1"\n    module: mod_mqtt\n'
            'auth_method: internal\nacl:\n  local:\n    user_regexp: ""\n'
            "modules:\n  mod_mqtt: {}\n"
        )
        for sub in ("spool", "logs"):
            (f / sub).mkdir()
        for path in (f, *f.rglob("*")):
            path.chmod(0o777 if path.is_dir() else 0o666)
        self.proc = subprocess.Popen(
            self._ctl("foreground"),
            env=self._environ(),
            cwd="/tmp",
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ejabberd exited with {self.proc.returncode}")
            try:
                socket.create_connection((self.host, self.port), timeout=0.5).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    self.stop()
                    raise TimeoutError("ejabberd's MQTT listener not up in time") from None
                time.sleep(0.1)  # polling a port that is not open yet; bounded by the deadline
        name, _, host = USER.partition("@")
        subprocess.run(
            self._ctl("register", name, host, PASSWORD),
            env=self._environ(),
            cwd="/tmp",
            capture_output=True,
            timeout=30,
            check=True,
        )
        return self

    def stop(self, timeout: float = 20.0) -> None:
        """`ejabberdctl stop`, then SIGKILL to what is left of the node's process group."""
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if proc.poll() is None:
            subprocess.run(
                self._ctl("stop"),
                env=self._environ(),
                cwd="/tmp",
                capture_output=True,
                timeout=timeout,
                check=False,
            )
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout)
        shutil.rmtree(self.folder, ignore_errors=True)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
