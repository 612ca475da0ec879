"""Secret redaction: every configured secret becomes `**********` in text, bytes and values."""

from __future__ import annotations

from collections.abc import MutableMapping
from typing import Any

REDACTED = "**********"


class Redactor:
    """Replaces every occurrence of the configured secrets in strings, bytes and nested values."""

    def __init__(self, secrets: list[str] | None = None) -> None:
        self.secrets: list[str] = []
        self.set(secrets or [])

    def set(self, secrets: list[str]) -> None:
        """Replace the secrets to hide (longest first, so a secret containing another is whole)."""
        self.secrets = sorted({s for s in secrets if len(s) >= 4}, key=len, reverse=True)
        self._bytes = [s.encode("utf-8") for s in self.secrets]

    def text(self, value: str) -> str:
        """`value` with every secret replaced."""
        for secret in self.secrets:
            if secret in value:
                value = value.replace(secret, REDACTED)
        return value

    def data(self, value: bytes) -> bytes:
        """`value` (e.g. a reply payload) with every secret replaced."""
        for secret in self._bytes:
            if secret in value:
                value = value.replace(secret, REDACTED.encode())
        return value

    def any(self, value: Any) -> Any:
        """Redact strings inside dicts, lists and tuples; other values unchanged."""
        if isinstance(value, str):
            return self.text(value)
        if isinstance(value, dict):
            return {k: self.any(v) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [self.any(v) for v in value]
        return value

    def __call__(
        self, logger: Any, method: str, event_dict: MutableMapping[str, Any]
    ) -> MutableMapping[str, Any]:
        """structlog processor: redact every value of the event."""
        if self.secrets:
            # Values replaced in place (the keys stay); numbers and None need no look.
            for key, val in event_dict.items():
                if type(val) is str:
                    event_dict[key] = self.text(val)
                elif isinstance(val, dict | list | tuple | str):
                    event_dict[key] = self.any(val)
        return event_dict
