"""The command line as a user runs it: `python -m bridge ...` in a clean environment."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

LEAKS = ("Traceback", "Unclosed", "was destroyed but it is pending", "ResourceWarning")
"""What a command's output must never show: a traceback, or an unclosed resource (`dev=True`)."""


def cli(
    *args: str,
    stdin: str | None = None,
    env: dict[str, str] | None = None,
    cwd: Path = REPO,
    dev: bool = False,
) -> subprocess.CompletedProcess[str]:
    """Run the CLI with `args` (from `cwd`, the repository by default) and return its result;
    `dev` runs Python's development mode, which reports unclosed resources."""
    return subprocess.run(
        [sys.executable, *(["-X", "dev"] if dev else []), "-m", "bridge", *args],
        capture_output=True,
        text=True,
        input=stdin,
        timeout=60,
        cwd=cwd,
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO), **(env or {})},
        check=False,
    )
