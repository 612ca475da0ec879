"""A child process's output, read line by line in a thread, waited on without polling."""

from __future__ import annotations

import subprocess
import threading
from typing import IO


class OutputLines:
    """Collects `proc`'s stdout lines as they come; `wait_for` blocks until one matches."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        assert proc.stdout is not None
        self.lines: list[str] = []
        self._cond = threading.Condition()
        self._closed = False
        threading.Thread(target=self._pump, args=(proc.stdout,), daemon=True).start()

    def _pump(self, stream: IO[str]) -> None:
        for line in stream:
            with self._cond:
                self.lines.append(line)
                self._cond.notify_all()
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def text(self) -> str:
        """Everything read so far."""
        with self._cond:
            return "".join(self.lines)

    def wait_for(self, needle: str, timeout: float = 60.0, *, after: int = 0) -> str:
        """The first line from index `after` on containing `needle` (TimeoutError if none)."""

        def found() -> str | None:
            return next((line for line in self.lines[after:] if needle in line), None)

        with self._cond:
            if not self._cond.wait_for(lambda: found() is not None or self._closed, timeout):
                raise TimeoutError(f"{needle!r} not seen in:\n{''.join(self.lines)[-3000:]}")
            line = found()
            if line is None:
                raise EOFError(f"output ended without {needle!r}:\n{''.join(self.lines)[-3000:]}")
            return line
