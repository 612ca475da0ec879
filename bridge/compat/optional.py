"""What the bridge's libraries load when it is there, and the bridge never needs."""

from __future__ import annotations

import os
import sys

UNUSED = ("rich",)
"""structlog.dev imports rich when it is installed (the trial broker's amqtt brings it, with
typer) for pretty tracebacks, which the bridge never prints: 4.3 MiB of RSS in each process."""
PURE_PYTHON = {"FROZENLIST_NO_EXTENSIONS": "1"}
"""frozenlist's compiled build is C++: it loads libstdc++ into the process (1.1 MiB of RSS) for
the lists of aiohttp's signals and middlewares, which the bridge builds once and never changes;
frozenlist's documented switch takes its pure-Python list instead."""


def skip_unused() -> None:
    """Make `UNUSED` packages not yet imported unimportable (a library's optional import of them
    falls back as if they were not installed) and set `PURE_PYTHON`'s switches unless the
    environment already sets them; before the libraries are imported (bench/README.md)."""
    for name in UNUSED:
        if name not in sys.modules:
            sys.modules[name] = None  # type: ignore[assignment]
    for switch, value in PURE_PYTHON.items():
        os.environ.setdefault(switch, value)
