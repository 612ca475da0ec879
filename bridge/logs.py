"""Logging: structlog with one canonical line per request, JSON off a TTY, secrets redacted.

Every line, ours and the libraries' (aiohttp, paho, amqtt via the stdlib `logging` module), passes
through `Redactor`, which replaces each configured secret with `**********`.
"""

from __future__ import annotations

import logging
import sys
from typing import Any, TextIO, cast

import structlog
from structlog.typing import FilteringBoundLogger

from bridge.redact import Redactor


class _StdlibRedactFilter(logging.Filter):
    def __init__(self, redactor: Redactor) -> None:
        super().__init__()
        self.redactor = redactor

    def filter(self, record: logging.LogRecord) -> bool:
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


def configure(
    level: str = "info",
    fmt: str = "auto",
    secrets: list[str] | None = None,
    stream: TextIO | None = None,
) -> None:
    """Set up structlog and stdlib logging for the process (idempotent)."""
    out = stream or sys.stderr
    redactor = Redactor(secrets)  # log lines only: replies get their own, from the bridge's config
    json_out = fmt == "json" or (fmt == "auto" and not out.isatty())
    renderer: Any = (
        structlog.processors.JSONRenderer()
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
    handler.addFilter(_StdlibRedactFilter(redactor))
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    for old in list(root.handlers):
        if getattr(old, "_omb", False):
            root.removeHandler(old)
    handler._omb = True  # type: ignore[attr-defined]  # noqa: SLF001  (our own marker attribute)
    root.addHandler(handler)
    # Library chatter only at WARNING unless we debug; their DEBUG lines may carry URLs.
    root.setLevel(logging.DEBUG if level == "debug" else logging.WARNING)


def get_logger(**context: Any) -> FilteringBoundLogger:
    """A structlog logger bound to `context`."""
    return cast(FilteringBoundLogger, structlog.get_logger("openai-mqtt-bridge").bind(**context))
