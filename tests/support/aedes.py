"""aedes (npm), the broker inside node-red-contrib-aedes, as a test broker on a free port.

MQTT 3.1.1 only and no shared subscriptions: a `$share/...` filter is accepted and matches nothing.
The package is installed into the repository's ignored `.cache/aedes` when missing (test.sh does the
same on a fresh machine); the broker runs in memory as `node` on 127.0.0.1 and is always stopped.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from pathlib import Path
from typing import Self

from support.broker import free_port

REPO = Path(__file__).resolve().parents[2]
PREFIX = REPO / ".cache" / "aedes"
VERSION = "aedes@1"

_SERVER = """
const net = require('net');
const { Aedes } = require('aedes');
(async () => {
  const aedes = await Aedes.createBroker();
  const server = net.createServer(aedes.handle);
  server.listen(Number(process.argv[1]), '127.0.0.1', () => console.log('listening'));
  const stop = () => server.close(() => aedes.close(() => process.exit(0)));
  process.on('SIGTERM', stop);
  process.stdin.on('end', stop);  // the test process died: never outlive it
  process.stdin.resume();
})();
"""


def ensure_installed(timeout: float = 180.0) -> Path:
    """The folder holding node_modules/aedes, installed with `npm install --prefix` if missing."""
    if not (PREFIX / "node_modules" / "aedes" / "package.json").exists():
        npm = shutil.which("npm")
        if npm is None:
            raise RuntimeError("npm is not installed (./test.sh installs it)")
        PREFIX.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            [npm, "install", "--silent", "--no-audit", "--no-fund", f"--prefix={PREFIX}", VERSION],
            check=True,
            timeout=timeout,
            capture_output=True,
        )
    return PREFIX


class AedesBroker:
    """`node -e <server> PORT` with aedes; `start()` returns once it accepts connections."""

    def __init__(self) -> None:
        self.host = "127.0.0.1"
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 20.0) -> Self:
        """Start node and wait (bounded) until the port accepts a TCP connection."""
        prefix = ensure_installed()
        self.proc = subprocess.Popen(
            ["node", "-e", _SERVER, str(self.port)],
            cwd=prefix,
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"aedes exited with {self.proc.returncode}")
            try:
                socket.create_connection((self.host, self.port), timeout=0.5).close()
                return self
            except OSError:
                time.sleep(0.05)  # polling a port that is not open yet; bounded by the deadline
        self.stop()
        raise TimeoutError("aedes did not listen in time")

    def stop(self, timeout: float = 10.0) -> None:
        """Stop node (SIGTERM, then SIGKILL)."""
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout)
        if proc.stdin is not None:
            proc.stdin.close()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
