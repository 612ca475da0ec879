"""Logging: structlog with one canonical line per request, JSON off a TTY, secrets redacted.

Every line, ours and the libraries' (aiohttp, paho, amqtt via the stdlib `logging` module), passes
through `Redactor`, which replaces each configured secret with `**********`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import sys
from collections.abc import Callable
from typing import Any, TextIO, cast

import structlog
from structlog.typing import FilteringBoundLogger

from bridge.redact import Redactor


class _StdlibRedactFilter(logging.Filter):
    """Redacts library records and, unless `tracebacks`, folds their traceback into one line."""

    def __init__(self, redactor: Redactor, tracebacks: bool = False) -> None:
        super().__init__()
        self.redactor = redactor
        self.tracebacks = tracebacks

    def filter(self, record: logging.LogRecord) -> bool:
        if not self.tracebacks and (record.exc_info or record.exc_text):
            exc = record.exc_info[1] if record.exc_info else None
            summary = f" ({type(exc).__name__}: {exc})" if exc is not None else ""
            record.msg = f"{record.getMessage()}{summary}"
            record.args = None
            record.exc_info = None
            record.exc_text = None
        if self.redactor.secrets:
            record.msg = self.redactor.text(record.getMessage())
            record.args = None
        return True


_LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}


def _json_line(event: Any, **kwargs: Any) -> str:
    """One log line as `json.dumps` writes it, from an encoder made once: `json.dumps` with a
    `default` builds a new JSONEncoder for every line (a line for every request)."""
    default = kwargs.pop("default", None)
    encoder = _ENCODERS.get(default) if not kwargs else None
    if encoder is None:
        if kwargs:
            return json.dumps(event, default=default, **kwargs)
        encoder = _ENCODERS[default] = json.JSONEncoder(default=default)
    return encoder.encode(event)


_ENCODERS: dict[Any, json.JSONEncoder] = {}


class _LogStream:
    """The log's stream. When its reader goes away (`bridge 2>&1 | head`), the rest of the log goes
    to /dev/null and the callbacks of `when_log_gone` run once: a broken pipe is no crash."""

    def __init__(self, out: TextIO) -> None:
        self.out = out
        self.gone = False

    def write(self, text: str) -> int:
        if not self.gone:
            try:
                return self.out.write(text)
            except (BrokenPipeError, ConnectionResetError):
                self._lost()
        return len(text)

    def flush(self) -> None:
        if not self.gone:
            try:
                self.out.flush()
            except (BrokenPipeError, ConnectionResetError):
                self._lost()

    def isatty(self) -> bool:
        return self.out.isatty()

    def _lost(self) -> None:
        self.gone = True
        # What is still buffered must not fail again at the interpreter's final flush.
        with contextlib.suppress(OSError, ValueError):
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, self.out.fileno())
            os.close(devnull)
        for callback in list(_GONE_CALLBACKS):
            callback()


_GONE_CALLBACKS: list[Callable[[], None]] = []


def when_log_gone(callback: Callable[[], None]) -> Callable[[], None]:
    """Run `callback` (from the thread that logged) once the log's reader is gone; the function
    that unregisters it."""
    _GONE_CALLBACKS.append(callback)

    def unregister() -> None:
        with contextlib.suppress(ValueError):
            _GONE_CALLBACKS.remove(callback)

    return unregister


def stop_when_log_gone(stop: Callable[[], None]) -> Callable[[], None]:
    """Call `stop` on the running loop once the log's reader is gone (a graceful stop, exit 0);
    the function that unregisters it."""
    loop = asyncio.get_running_loop()

    def gone() -> None:
        loop.call_soon_threadsafe(stop)

    return when_log_gone(gone)


def configure(
    level: str = "info",
    fmt: str = "auto",
    secrets: list[str] | None = None,
    stream: TextIO | None = None,
    libraries: bool = False,
) -> None:
    """Set up structlog and stdlib logging for the process (idempotent).

    The libraries' own lines (aiohttp, paho, amqtt, transitions) show from WARNING up, one line
    each; with `libraries` and level debug, also their debug lines and tracebacks.
    """
    out: Any = _LogStream(stream or sys.stderr)
    redactor = Redactor(secrets)  # log lines only: replies get their own, from the bridge's config
    json_out = fmt == "json" or (fmt == "auto" and not out.isatty())
    renderer: Any = (
        structlog.processors.JSONRenderer(serializer=_json_line)
        if json_out
        else structlog.dev.ConsoleRenderer(colors=False)
    )
    processors: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.format_exc_info,
        redactor,
        renderer,
    ]
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS[level]),
        logger_factory=structlog.PrintLoggerFactory(out),
        cache_logger_on_first_use=False,
    )
    handler = logging.StreamHandler(out)
    library_debug = libraries and level == "debug"
    handler.addFilter(_StdlibRedactFilter(redactor, tracebacks=library_debug))
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    for old in list(root.handlers):
        if getattr(old, "_omb", False):
            root.removeHandler(old)
    handler._omb = True  # type: ignore[attr-defined]  # noqa: SLF001  (our own marker attribute)
    root.addHandler(handler)
    # Library chatter (about a dozen amqtt/transitions lines per connection) only when asked for;
    # their DEBUG lines may carry URLs.
    root.setLevel(logging.DEBUG if library_debug else logging.WARNING)


def get_logger(**context: Any) -> FilteringBoundLogger:
    """A structlog logger bound to `context`."""
    return cast(FilteringBoundLogger, structlog.get_logger("openai-mqtt-bridge").bind(**context))
