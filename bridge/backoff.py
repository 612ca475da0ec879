"""Capped exponential backoff with full jitter, and the parsing of upstream retry hints."""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Mapping
from email.utils import parsedate_to_datetime


class Backoff:
    """Delays for attempts: min * 2**n capped at max, with jitter in [delay/2, delay]."""

    def __init__(
        self,
        minimum: float,
        maximum: float,
        rand: Callable[[], float] = random.random,
    ) -> None:
        self.minimum = minimum
        self.maximum = maximum
        self._rand = rand
        self.attempt = 0

    def ceiling(self, attempt: int) -> float:
        """The un-jittered delay before attempt `attempt` (0-based) after a failure."""
        return float(min(self.maximum, self.minimum * (2.0 ** min(attempt, 62))))

    def next_delay(self) -> float:
        """The delay to wait now; each call moves one step up the ladder."""
        top = self.ceiling(self.attempt)
        self.attempt += 1
        return top / 2 + top / 2 * self._rand()

    def give_up_delay(self) -> float:
        """The longest delay (for failures that retrying soon cannot fix, e.g. bad credentials)."""
        self.attempt = 63
        return self.maximum / 2 + self.maximum / 2 * self._rand()

    def reset(self) -> None:
        """Back to the first step after a success."""
        self.attempt = 0


def retry_after_seconds(headers: Mapping[str, str], now: float | None = None) -> float | None:
    """Seconds the server asked us to wait (`retry-after-ms`, `Retry-After`), or None."""
    ms = headers.get("retry-after-ms")
    if ms is not None:
        try:
            value = float(ms) / 1000.0
        except ValueError:
            value = -1.0
        if value >= 0:
            return value
    raw = headers.get("retry-after")
    if raw is None:
        return None
    try:
        value = float(raw)
    except ValueError:
        try:
            when = parsedate_to_datetime(raw).timestamp()
        except (TypeError, ValueError, IndexError, OverflowError):
            return None
        value = when - (time.time() if now is None else now)
    return max(0.0, value)
