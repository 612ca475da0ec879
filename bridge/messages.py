"""What the MQTT transport hands to the request pipeline, and what its publishes fail with."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(slots=True)
class InboundMessage:
    """One message received on the request subscription."""

    topic: str
    payload: bytes
    qos: int
    retain: bool
    dup: bool
    mid: int
    generation: int
    """Connection generation it arrived on; an ack is only valid while the session lives."""
    response_topic: str | None = None
    correlation_data: bytes | None = None


class PublishFailed(Exception):
    """A publish could not be queued or was refused by the broker."""

    def __init__(self, message: str, *, retry_later: bool = False) -> None:
        super().__init__(message)
        self.retry_later = retry_later
        """True when the failure is local and passing (e.g. the offline queue is full)."""
