"""Request counters for the stats topic and the Home Assistant sensors."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from bridge.errors import BridgeError


@dataclass(slots=True)
class Stats:
    """Counters for the stats topic and Home Assistant sensors."""

    requests_total: int = 0
    errors_total: int = 0
    in_flight: int = 0
    last_latency_ms: float | None = None
    last_error: dict[str, Any] | None = None
    by_code: dict[str, int] = field(default_factory=dict)

    def count(self, error: BridgeError | None, elapsed_ms: float) -> None:
        """Count one answered request, failed with `error` when not None."""
        self.requests_total += 1
        self.last_latency_ms = elapsed_ms
        if error is not None:
            self.errors_total += 1
            self.by_code[error.code] = self.by_code.get(error.code, 0) + 1
            self.last_error = error.to_dict()
