"""The MQTT transport as the other layers see it: what it hands them, what they may ask of it,
and what its publishes fail with."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol


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
    ack_with: Callable[[InboundMessage], None] | None = None
    """Set when it came on another connection than the publisher's (a dormant worker's session
    being drained): acknowledging goes there."""


class PublishFailed(Exception):
    """A publish could not be queued or was refused by the broker."""

    def __init__(self, message: str, *, retry_later: bool = False) -> None:
        super().__init__(message)
        self.retry_later = retry_later
        """True when the failure is local and passing (e.g. the offline queue is full)."""


class StreamPublisher(Protocol):
    """The publish half of the MQTT transport (MqttTransport implements it)."""

    def publish(
        self,
        topic: str,
        payload: bytes,
        *,
        retain: bool = False,
        qos: int = 1,
        correlation_data: bytes | None = None,
        content_type: str | None = None,
    ) -> asyncio.Future[None]:
        """Queue a publish; the future completes on the broker's PUBACK.

        Correlation Data and Content Type are MQTT 5 properties (dropped over MQTT 3.1.1).
        """

    def fits(self, topic: str, payload_size: int) -> bool:
        """Whether the broker accepts a packet this large."""


class Publisher(StreamPublisher, Protocol):
    """What delivery needs from the MQTT transport: publishing, plus acknowledging."""

    def ack(self, message: InboundMessage) -> None:
        """Acknowledge a request message."""


class StatusTransport(Publisher, Protocol):
    """What the status publisher needs: publishing and acknowledging, plus the connection."""

    connected: asyncio.Event

    @property
    def protocol_label(self) -> str:
        """The MQTT protocol in use, e.g. `MQTT 5`."""
