"""What the service layer sends: one HTTP request and its form parts, built by the pipeline."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class FormPart:
    """One multipart part; `filename`/`content_type` are set for files and typed text parts."""

    name: str
    value: bytes
    filename: str | None = None
    content_type: str | None = None


@dataclass(frozen=True, slots=True)
class HttpRequest:
    """One HTTP request to the service host, ready to send."""

    method: str
    url: str
    """Absolute URL, already percent-encoded (send it without re-quoting)."""
    headers: dict[str, str]
    json_body: bytes | None = None
    form: tuple[FormPart, ...] | None = None
