"""A private PostgreSQL cluster for tests: Debian's binaries, a free port, trust auth, thrown away.

It never uses a server already running on the machine. The server refuses to run as root, so
when the tests run as root it is started as the `postgres` system user (`runuser`), in a
temporary directory that user owns.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import subprocess
import tempfile
from pathlib import Path
from types import TracebackType
from typing import Self

from .broker import free_port


class PostgresNotInstalled(RuntimeError):
    """No initdb/pg_ctl under /usr/lib/postgresql/*/bin (test.sh installs them)."""


def find_bin_dir() -> Path:
    """The newest /usr/lib/postgresql/<version>/bin holding initdb and pg_ctl."""
    candidates = sorted(
        glob.glob("/usr/lib/postgresql/*/bin"), key=lambda p: int(Path(p).parent.name or 0)
    )
    for directory in reversed(candidates):
        if Path(directory, "initdb").exists() and Path(directory, "pg_ctl").exists():
            return Path(directory)
    raise PostgresNotInstalled("PostgreSQL server binaries not found; run ./test.sh")


class PostgresServer:
    """`initdb` + `pg_ctl start` on 127.0.0.1:<free port>; `url` reaches database `test`."""

    def __init__(self) -> None:
        self.bin = find_bin_dir()
        self.port = free_port()
        self.workdir = Path(tempfile.mkdtemp(prefix="omb-pg-"))
        self.data = self.workdir / "data"
        self._user: str | None = "postgres" if os.geteuid() == 0 else None
        if self._user is not None:
            entry = pwd.getpwnam(self._user)
            os.chown(self.workdir, entry.pw_uid, entry.pw_gid)
        self.started = False

    @property
    def url(self) -> str:
        """The connection URL of the `test` database (user postgres, no password)."""
        return f"postgresql://postgres@127.0.0.1:{self.port}/test"

    def _run(self, *argv: str, timeout: float = 60) -> None:
        prefix = ["runuser", "-u", self._user, "--"] if self._user is not None else []
        result = subprocess.run(
            [*prefix, *argv], capture_output=True, text=True, timeout=timeout, check=False
        )
        if result.returncode != 0:
            raise RuntimeError(f"{argv[0]} failed: {result.stdout[-2000:]}{result.stderr[-2000:]}")

    def start(self) -> Self:
        """Create the cluster, start it, create database `test`; waits until it accepts."""
        self._run(
            str(self.bin / "initdb"), "-D", str(self.data), "-U", "postgres", "-A", "trust",
            "--no-sync",
        )  # fmt: skip
        options = (
            f"-p {self.port} -c listen_addresses=127.0.0.1 -k {self.workdir} "
            "-c fsync=off -c max_connections=50"
        )
        self._run(
            str(self.bin / "pg_ctl"), "-D", str(self.data), "-o", options,
            "-l", str(self.workdir / "server.log"), "-w", "-t", "60", "start",
        )  # fmt: skip
        self.started = True
        self._run(
            str(self.bin / "createdb"), "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres",
            "test",
        )  # fmt: skip
        return self

    def stop(self) -> None:
        """Stop the server (fast) and delete its files."""
        if self.started:
            with contextlib.suppress(RuntimeError, subprocess.TimeoutExpired):
                self._run(str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", "fast", "stop")
            self.started = False
        shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
