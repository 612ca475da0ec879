"""Run the real bridge for tests: in a thread with its own event loop, or as a separate process."""

from __future__ import annotations

import asyncio
import io
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Coroutine, Mapping
from pathlib import Path
from typing import Any, Self, TypeVar

from bridge.config import BridgeConfig, load_config
from bridge.runtime import logs
from bridge.runtime.daemon import Bridge
from support.broker import free_port

T = TypeVar("T")

TEST_API_KEY = "sk-test-SECRET-4f7c2a9e8b1d"
"""The API key every test bridge uses; no log line or reply may ever contain it."""
TEST_MQTT_PASSWORD = "mqtt-PASSWORD-93e1c0ffee"
"""The MQTT password tests give a bridge; like the key, it must never reach a log."""
TEST_HTTP_PATH = os.environ.get("BRIDGE_TEST_HTTP_PATH", "lean")
"""The HTTP path of a test bridge whose config does not choose one: `lean` (the default) or
`aiohttp` (`[service] lean_http = false`); .ci/run runs the system tests once on each."""
if TEST_HTTP_PATH not in ("lean", "aiohttp"):
    raise ValueError(f"BRIDGE_TEST_HTTP_PATH must be lean or aiohttp, not {TEST_HTTP_PATH!r}")


def write_config(path: Path, sections: Mapping[str, Mapping[str, Any]]) -> Path:
    """Write a TOML config from nested dicts (strings, numbers, booleans, lists, tables)."""

    def value(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, int | float):
            return repr(v)
        if isinstance(v, list):
            return "[" + ", ".join(value(x) for x in v) + "]"
        if isinstance(v, dict):
            return (
                "{" + ", ".join(f"{k!r} = {value(x)}".replace("'", '"') for k, x in v.items()) + "}"
            )
        text = str(v).replace("\\", "\\\\").replace('"', '\\"')
        return f'"{text}"'

    lines: list[str] = []
    for section, options in sections.items():
        lines.append(f"[{section}]")
        for key, val in options.items():
            lines.append(f"{key} = {value(val)}")
        lines.append("")
    path.write_text("\n".join(lines), encoding="utf-8")
    return path


def make_config(
    tmp_path: Path,
    *,
    broker_port: int,
    api_base: str,
    prefix: str,
    mqtt: Mapping[str, Any] | None = None,
    service: Mapping[str, Any] | None = None,
    limits: Mapping[str, Any] | None = None,
    access: Mapping[str, Any] | None = None,
    extra: Mapping[str, Mapping[str, Any]] | None = None,
    api_key: str = TEST_API_KEY,
) -> tuple[Path, dict[str, str]]:
    """A config file for a test bridge and the environment carrying its API key."""
    sections: dict[str, dict[str, Any]] = {
        "mqtt": {
            "host": "127.0.0.1",
            "port": broker_port,
            "topic_prefix": prefix,
            "instance": "test",
            "client_id": f"bridge-{prefix.replace('/', '-')}",
            "reconnect_min": 0.05,
            "reconnect_max": 0.5,
            **(mqtt or {}),
        },
        "service": {
            "api_base": api_base,
            "connect_timeout": 2.0,
            "read_timeout": 5.0,
            "total_timeout": 10.0,
            "lean_http": TEST_HTTP_PATH == "lean",
            **(service or {}),
        },
        "limits": {"shutdown_grace": 5.0, **(limits or {})},
        "logging": {"level": "debug", "format": "json"},
        "homeassistant": {"discovery": False, "stats_interval": 0},
        # Many test bridges run at once: the console only where a test asks for it (port 0).
        "console": {"enabled": False},
        # Each test bridge journals into its own temporary folder, never the user's state dir.
        "journal": {"path": str(tmp_path / f"journal-{prefix.replace('/', '-')}.sqlite3")},
    }
    if access:
        sections["access"] = dict(access)
    for name, options in (extra or {}).items():
        sections.setdefault(name, {}).update(options)
    path = write_config(tmp_path / f"bridge-{prefix.replace('/', '-')}.toml", sections)
    env = {"OPENAI_API_KEY": api_key} if api_key else {}
    return path, env


def private_state(config_path: Path, env: Mapping[str, str]) -> dict[str, str]:
    """`env` with `XDG_STATE_HOME` beside the config file unless it names a state directory."""
    out = dict(env)
    if "XDG_STATE_HOME" not in out and "STATE_DIRECTORY" not in out:
        out["XDG_STATE_HOME"] = str(config_path.parent / "state")
    return out


class BridgeThread:
    """The bridge on its own event loop in a thread; logs go to `self.log_text()`."""

    def __init__(self, config: BridgeConfig) -> None:
        self.config = config
        self._stream = io.StringIO()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._bridge: Bridge | None = None
        self._ready = threading.Event()
        self._finished = threading.Event()
        self.exit_code: int | None = None
        self.error: BaseException | None = None
        self.tasks_left: list[str] | None = None
        """The tasks still on the bridge's loop when `Bridge.run` returned (none expected)."""

    @classmethod
    def from_file(cls, path: Path, env: Mapping[str, str]) -> Self:
        """Load `path` with `env` as the environment (nothing from the test process leaks in).

        A config without a `[journal] path` journals next to the config file, never into the
        state directory of the user running the tests.
        """
        return cls(load_config(path, environ=private_state(path, env)))

    def start(self, timeout: float = 15.0) -> Self:
        """Start and wait until the bridge is connected and subscribed."""
        logs.configure("debug", "json", self.config.secrets(), stream=self._stream)
        self._thread = threading.Thread(target=self._main, name="bridge", daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout):
            raise TimeoutError(f"bridge not ready in {timeout}s:\n{self.log_text()[-3000:]}")
        if self.error is not None:
            raise RuntimeError("bridge failed to start") from self.error
        return self

    def _main(self) -> None:
        async def run() -> int:
            self._loop = asyncio.get_running_loop()
            self._bridge = Bridge(self.config)
            waiter = asyncio.create_task(self._signal_ready(self._bridge))
            try:
                return await self._bridge.run()
            finally:
                ours = {asyncio.current_task(), waiter}
                self.tasks_left = sorted(
                    getattr(task.get_coro(), "__qualname__", task.get_name())
                    for task in asyncio.all_tasks()
                    if task not in ours
                )
                waiter.cancel()

        try:
            self.exit_code = asyncio.run(run())
        except BaseException as exc:  # noqa: BLE001  (handed to the test thread, which raises it)
            self.error = exc
        finally:
            self._ready.set()
            self._finished.set()

    async def _signal_ready(self, bridge: Bridge) -> None:
        await bridge.ready.wait()
        self._ready.set()

    @property
    def bridge(self) -> Bridge:
        """The running Bridge (only touch it from its loop, e.g. via `call`)."""
        assert self._bridge is not None
        return self._bridge

    def call(self, fn: Any, *args: Any, timeout: float = 10.0) -> Any:
        """Run `fn(*args)` on the bridge's loop and return its result."""
        assert self._loop is not None

        async def wrapper() -> Any:
            return fn(*args)

        return asyncio.run_coroutine_threadsafe(wrapper(), self._loop).result(timeout)

    def wait(self, coroutine: Coroutine[Any, Any, T], timeout: float = 10.0) -> T:
        """Run `coroutine` on the bridge's loop and return its result."""
        assert self._loop is not None
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(timeout)

    def stop(self, timeout: float = 20.0) -> int | None:
        """Graceful stop (like SIGTERM); returns the exit code."""
        if self._loop is not None and self._bridge is not None and not self._finished.is_set():
            self._loop.call_soon_threadsafe(self._bridge.stop)
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                raise TimeoutError("bridge did not stop")
        if self.error is not None:
            raise RuntimeError("bridge crashed") from self.error
        return self.exit_code

    def log_text(self) -> str:
        """Everything the bridge logged so far."""
        return self._stream.getvalue()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class BridgeProcess:
    """The bridge as `python -m bridge --config FILE`, for kill -9 and signal tests."""

    def __init__(self, config_path: Path, env: Mapping[str, str], log_path: Path) -> None:
        self.config_path = config_path
        self.env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "PYTHONPATH": str(Path(__file__).resolve().parents[2]),
            **private_state(config_path, env),
        }
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None
        self._log_file: Any = None
        self._offset = 0

    def start(self, timeout: float = 20.0) -> Self:
        """Spawn the process and wait for its `ready` log line."""
        self._log_file = open(self.log_path, "ab")  # noqa: SIM115 - closed in wait()
        self._offset = self.log_path.stat().st_size
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "bridge", "--config", str(self.config_path)],
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            env=self.env,
        )
        deadline = _Deadline(timeout)
        while not deadline.expired():
            if '"event": "ready"' in self._new_log():
                return self
            if self.proc.poll() is not None:
                raise RuntimeError(f"bridge exited with {self.proc.returncode}:\n{self.log_text()}")
            deadline.pause()
        raise TimeoutError(f"bridge not ready:\n{self.log_text()[-3000:]}")

    def _new_log(self) -> str:
        return self.log_path.read_bytes()[self._offset :].decode("utf-8", "replace")

    def log_text(self) -> str:
        """Everything every run of this process logged."""
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def kill(self) -> int:
        """SIGKILL, no chance to clean up; returns the exit status."""
        assert self.proc is not None
        self.proc.kill()
        return self.wait()

    def terminate(self, timeout: float = 30.0) -> int:
        """SIGTERM, graceful; returns the exit status."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return self.wait(timeout)

    def wait(self, timeout: float = 30.0) -> int:
        """Wait for exit and close the log."""
        assert self.proc is not None
        code = self.proc.wait(timeout)
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None
        return code

    def close(self) -> None:
        """Kill the process if it still runs."""
        if self.proc is not None and self.proc.poll() is None:
            self.kill()
        elif self._log_file is not None:
            self._log_file.close()
            self._log_file = None


class _Deadline:
    """A bounded polling loop for waiting on another process's log file."""

    def __init__(self, seconds: float) -> None:
        import time

        self._time = time
        self.end = time.monotonic() + seconds
        self._event = threading.Event()

    def expired(self) -> bool:
        return self._time.monotonic() >= self.end

    def pause(self) -> None:
        # Another process writes the file: there is no event to wait on, so poll briefly.
        self._event.wait(0.02)


def broken_tls_config(tmp_path: Path) -> Path:
    """Embedded broker on a free port, and a CA file that exists but is not a certificate."""
    ca = tmp_path / "ca.pem"
    ca.write_text("-----BEGIN CERTIFICATE-----\nnot base64 at all\n-----END CERTIFICATE-----\n")
    path = tmp_path / "bridge.toml"
    path.write_text(
        f'[mqtt]\nhost = ""\nport = {free_port()}\n\n[mqtt.tls]\nca_file = "{ca}"\n\n'
        '[service]\napi_base = "http://127.0.0.1:9/v1"\n\n[homeassistant]\ndiscovery = false\n'
    )
    return path
