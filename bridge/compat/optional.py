"""Optional packages the bridge's libraries load whenever installed, and the bridge never uses."""

from __future__ import annotations

import sys

UNUSED = ("rich",)
"""structlog.dev imports rich when it is installed (the trial broker's amqtt brings it, with
typer) for pretty tracebacks, which the bridge never prints: 4.3 MiB of RSS in each process
(bench/README.md, issue 27)."""


def skip_unused() -> None:
    """Make `UNUSED` packages not yet imported in this process unimportable (ImportError), so
    that a library's optional import of them falls back as if they were not installed."""
    for name in UNUSED:
        if name not in sys.modules:
            sys.modules[name] = None  # type: ignore[assignment]
