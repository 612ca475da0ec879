"""A private Mosquitto broker for tests: own config, own free port, own log."""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import IO, Self

__all__ = ["MosquittoBroker", "MosquittoError", "MosquittoNotInstalled", "find_mosquitto"]

_CANDIDATES = ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto", "/usr/bin/mosquitto")
_READY_MARK = " running"
_IN_USE_MARK = "Address already in use"
_PORT_ATTEMPTS = 5
_RESIGNAL_INTERVAL = 0.1


class MosquittoError(RuntimeError):
    """The broker failed to start, stop or behave."""


class MosquittoNotInstalled(MosquittoError):
    """No mosquitto executable was found."""


def find_mosquitto() -> str:
    """Path of the mosquitto executable, or raise MosquittoNotInstalled with a hint."""
    found = shutil.which("mosquitto")
    if found:
        return found
    for candidate in _CANDIDATES:
        if os.access(candidate, os.X_OK):
            return candidate
    raise MosquittoNotInstalled(
        "mosquitto is not installed (looked in PATH and "
        f"{', '.join(_CANDIDATES)}); install it with `apt-get install mosquitto`"
    )


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free on `host` a moment ago (bind port 0, read it, close)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


class MosquittoBroker:
    """One Mosquitto process listening on 127.0.0.1 at a free port.

    The config, log and persistence database live in `workdir` (a fresh temporary
    directory when not given, removed by `close()`). `start()` returns once the broker
    logged that it is running (it logs that after its listener is open).

    `max_inflight_messages` is left at Mosquitto's default (20) unless given: it only
    governs MQTT 3.1.1 clients and MQTT 5 clients that send no Receive Maximum; an
    MQTT 5 client's Receive Maximum replaces it (higher or lower), so that is what
    governs the bridge. 0 means unlimited.
    """

    host = "127.0.0.1"

    def __init__(
        self,
        workdir: Path | str | None = None,
        *,
        port: int | None = None,
        persistence: bool = False,
        autosave_interval: int | None = None,
        autosave_on_changes: bool = False,
        max_queued_messages: int = 100_000,
        max_inflight_messages: int | None = None,
        verbose: bool = False,
        extra_config: Sequence[str] = (),
        executable: str | None = None,
    ) -> None:
        self.executable = executable or find_mosquitto()
        self._own_workdir = workdir is None
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="mosquitto-"))
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.persistence = persistence
        self.autosave_interval = autosave_interval
        self.autosave_on_changes = autosave_on_changes
        self.max_queued_messages = max_queued_messages
        self.max_inflight_messages = max_inflight_messages
        self.verbose = verbose
        self.extra_config = list(extra_config)
        self._fixed_port = port
        self.port: int = port or 0
        self.config_path = self.workdir / "mosquitto.conf"
        self.log_path = self.workdir / "mosquitto.log"
        self.persistence_dir = self.workdir / "persistence"
        self._proc: subprocess.Popen[bytes] | None = None
        self._reader: threading.Thread | None = None
        self._log_file: IO[str] | None = None
        self._lines: list[str] = []
        self._run_start = 0  # index in _lines where the current process's log starts
        self._eof = True
        self._cond = threading.Condition()

    # ----------------------------------------------------------------- properties
    @property
    def url(self) -> str:
        """`mqtt://127.0.0.1:<port>`."""
        return f"mqtt://{self.host}:{self.port}"

    @property
    def pid(self) -> int | None:
        """The process id while a process exists."""
        return self._proc.pid if self._proc else None

    @property
    def running(self) -> bool:
        """Whether the broker process is alive."""
        return self._proc is not None and self._proc.poll() is None

    # --------------------------------------------------------------------- config
    def _config_text(self) -> str:
        lines = [
            f"listener {self.port} {self.host}",
            "allow_anonymous true",
            "set_tcp_nodelay true",
            f"max_queued_messages {self.max_queued_messages}",
            "log_dest stderr",
            "log_timestamp true",
            "log_timestamp_format %Y-%m-%dT%H:%M:%S",
            "connection_messages true",
        ]
        if self.max_inflight_messages is not None:
            lines.append(f"max_inflight_messages {self.max_inflight_messages}")
        log_types = ["all"] if self.verbose else ["error", "warning", "notice", "information"]
        lines += [f"log_type {kind}" for kind in log_types]
        if os.geteuid() == 0:
            # As root, Mosquitto drops to the `mosquitto` user, which could not write
            # our persistence directory; stay as whoever we are.
            lines.append(f"user {pwd.getpwuid(os.geteuid()).pw_name}")
        if self.persistence:
            self.persistence_dir.mkdir(parents=True, exist_ok=True)
            lines += [
                "persistence true",
                f"persistence_location {self.persistence_dir}/",
                "persistence_file mosquitto.db",
            ]
            if self.autosave_interval is not None:
                lines.append(f"autosave_interval {self.autosave_interval}")
            if self.autosave_on_changes:
                lines.append("autosave_on_changes true")
        lines += self.extra_config
        return "\n".join(lines) + "\n"

    # ------------------------------------------------------------------ lifecycle
    def start(self, timeout: float = 10.0) -> Self:
        """Start the broker and wait until it accepts connections.

        Without a fixed port, a port that turns out to be taken in the meantime
        is replaced by another one (a bounded number of times).
        """
        if self.running:
            raise MosquittoError(f"mosquitto already running on port {self.port}")
        attempts = 1 if (self._fixed_port or self.port) else _PORT_ATTEMPTS
        for attempt in range(attempts):
            if not self.port:
                self.port = free_port(self.host)
            try:
                self._spawn_and_wait(timeout)
                return self
            except MosquittoError:
                in_use = _IN_USE_MARK in self._current_log()
                if not in_use or attempt == attempts - 1 or self._fixed_port:
                    raise
                self.port = 0
        raise AssertionError("unreachable")  # pragma: no cover

    def _spawn_and_wait(self, timeout: float) -> None:
        self.config_path.write_text(self._config_text())
        with self._cond:
            self._run_start = len(self._lines)
            self._eof = False
        if self._log_file is None:
            self._log_file = self.log_path.open("a", encoding="utf-8")
        self._proc = subprocess.Popen(
            [self.executable, "-c", str(self.config_path)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            cwd=self.workdir,
        )
        assert self._proc.stderr is not None
        self._reader = threading.Thread(
            target=self._read_log,
            args=(self._proc.stderr,),
            name=f"mosquitto-log-{self._proc.pid}",
            daemon=True,
        )
        self._reader.start()
        with self._cond:
            ready = self._cond.wait_for(
                lambda: self._eof or _READY_MARK in self._current_log_locked(), timeout
            )
        if not ready or self._eof:
            self._reap(kill=True)
            what = "exited" if ready else f"did not report running within {timeout:.1f}s"
            raise MosquittoError(
                f"mosquitto on port {self.port} {what}; its log:\n{self._current_log()}"
            )

    def _read_log(self, stream: IO[bytes]) -> None:
        """Copy the broker's stderr into memory and the log file, line by line."""
        try:
            for raw in iter(stream.readline, b""):
                line = raw.decode("utf-8", "replace")
                with self._cond:
                    self._lines.append(line)
                    if self._log_file is not None and not self._log_file.closed:
                        self._log_file.write(line)
                        self._log_file.flush()
                    self._cond.notify_all()
        finally:
            stream.close()
            with self._cond:
                self._eof = True
                self._cond.notify_all()

    def _reap(self, *, kill: bool, timeout: float = 10.0) -> int | None:
        """End the process (SIGKILL or SIGTERM), wait for it and its log reader."""
        proc = self._proc
        if proc is None:
            return None
        try:
            code = self._signal_until_exit(
                proc, signal.SIGKILL if kill else signal.SIGTERM, timeout
            )
            if code is None:
                proc.kill()
                code = proc.wait(timeout)
                raise MosquittoError(f"mosquitto ignored SIGTERM for {timeout:.1f}s")
        finally:
            if self._reader is not None:
                self._reader.join(timeout)
                self._reader = None
            self._proc = None
        return code

    @staticmethod
    def _signal_until_exit(
        proc: subprocess.Popen[bytes], signum: int, timeout: float
    ) -> int | None:
        """Send `signum` until the process exits; its exit code, or None on timeout.

        Mosquitto 2.0 installs its handlers, logs "running" and only then sets its run
        flag, so a SIGTERM in that window is lost: hence the repeats.
        """
        deadline = time.monotonic() + timeout
        for _ in range(max(1, int(timeout / _RESIGNAL_INTERVAL)) + 1):
            if proc.poll() is None:
                proc.send_signal(signum)
            remaining = deadline - time.monotonic()
            try:
                return proc.wait(max(0.0, min(_RESIGNAL_INTERVAL, remaining)))
            except subprocess.TimeoutExpired:
                if remaining <= _RESIGNAL_INTERVAL:
                    return None
        return None

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM (Mosquitto saves its persistence database) and wait; returns the exit code."""
        return self._reap(kill=False, timeout=timeout)

    def kill(self, timeout: float = 10.0) -> int | None:
        """SIGKILL: nothing is saved; returns the exit code."""
        return self._reap(kill=True, timeout=timeout)

    def restart(self, *, kill: bool = False, timeout: float = 10.0) -> Self:
        """Stop (or kill) and start again on the same port with the same config."""
        self._reap(kill=kill, timeout=timeout)
        port = self.port
        self._spawn_and_wait(timeout)
        assert self.port == port
        return self

    def close(self) -> None:
        """Stop the broker, close the log, remove a workdir we created ourselves."""
        try:
            self.stop()
        finally:
            if self._log_file is not None:
                with self._cond:
                    self._log_file.close()
                    self._log_file = None
            if self._own_workdir:
                shutil.rmtree(self.workdir, ignore_errors=True)

    # ------------------------------------------------------------------------ log
    def log_text(self) -> str:
        """Everything the broker logged, across restarts."""
        with self._cond:
            return "".join(self._lines)

    def _current_log_locked(self) -> str:
        return "".join(self._lines[self._run_start :])

    def _current_log(self) -> str:
        with self._cond:
            return self._current_log_locked()

    def wait_for_log(self, text: str, timeout: float = 10.0, *, count: int = 1) -> bool:
        """Wait until `text` occurs `count` times in the log (across restarts)."""
        with self._cond:
            return self._cond.wait_for(lambda: "".join(self._lines).count(text) >= count, timeout)

    # ------------------------------------------------------------ context manager
    def __enter__(self) -> Self:
        if not self.running:
            self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"<MosquittoBroker {self.host}:{self.port} {state}>"
