"""What the broker granted in its CONNACK, and which of the bridge's promises that weakens.

Pure: no I/O. MQTT 3.1.1 CONNACKs carry no properties, so every field is None there (unknown);
an MQTT 5 property the broker leaves out means the protocol's default (available, unlimited).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from bridge.config import BridgeConfig

SHARED_REFUSAL = (
    "the broker at {broker} {why}: a shared group ([mqtt] shared_group or [runtime] workers) "
    "would receive no requests. Use Mosquitto, EMQX, HiveMQ, VerneMQ or NanoMQ "
    "(docs/scaling.md#brokers), or run one bridge: remove [mqtt] shared_group and set "
    "[runtime] workers = 1"
)
"""The one line a bridge exits 78 with when its shared group cannot work."""


@dataclass(frozen=True, slots=True)
class BrokerGrants:
    """The CONNACK's answer to what the bridge asked for; None: not stated (MQTT 3.1.1)."""

    protocol: str
    """`5` or `3.1.1`."""
    shared_available: bool | None = None
    session_expiry: int | None = None
    """The session expiry the broker grants, when it overrides ours."""
    receive_maximum: int | None = None
    """How many unacknowledged QoS 1 messages the broker takes from us at once."""
    maximum_packet_size: int | None = None
    retain_available: bool | None = None

    @classmethod
    def from_connack(cls, protocol: str, properties: Any) -> BrokerGrants:
        """Read the CONNACK properties (paho's Properties object, or None for MQTT 3.1.1)."""
        if properties is None or protocol != "5":
            return cls(protocol)

        def number(name: str) -> int | None:
            value = getattr(properties, name, None)
            return value if isinstance(value, int) else None

        shared, retain = number("SharedSubscriptionAvailable"), number("RetainAvailable")
        return cls(
            protocol,
            shared_available=True if shared is None else bool(shared),
            session_expiry=number("SessionExpiryInterval"),
            receive_maximum=number("ReceiveMaximum"),
            maximum_packet_size=number("MaximumPacketSize"),
            retain_available=True if retain is None else bool(retain),
        )

    def weakened(self, config: BridgeConfig) -> list[str]:
        """One sentence per granted value that weakens a promise of `config` (empty: none)."""
        session_expiry = config.mqtt.session_expiry
        max_concurrency = config.limits.max_concurrency
        max_packet_size = config.mqtt.max_packet_size
        out: list[str] = []
        if self.session_expiry is not None and self.session_expiry < session_expiry:
            out.append(
                f"the broker keeps the session {self.session_expiry} s, not the configured "
                f"{session_expiry} s: requests sent while the bridge is away longer are dropped"
            )
        if self.receive_maximum is not None and self.receive_maximum < max_concurrency:
            out.append(
                f"the broker's Receive Maximum is {self.receive_maximum}, below [limits] "
                f"max_concurrency {max_concurrency}: brokers with such a window usually also "
                f"hand over at most that many requests at once"
            )
        if self.maximum_packet_size is not None and self.maximum_packet_size < max_packet_size:
            out.append(
                f"the broker takes packets up to {self.maximum_packet_size} bytes: larger "
                "replies become payload_too_large errors"
            )
        if self.retain_available is False:
            out.append(
                "the broker keeps no retained messages: the bridge's state, info and Home "
                "Assistant discovery are seen only by clients connected when they are published"
            )
        return out

    def as_info(self) -> dict[str, Any]:
        """The `broker` object of the info and stats documents (only what the broker stated)."""
        out: dict[str, Any] = {"protocol": self.protocol}
        for name in (
            "shared_available",
            "session_expiry",
            "receive_maximum",
            "maximum_packet_size",
            "retain_available",
        ):
            value = getattr(self, name)
            if value is not None:
                out[name] = value
        return out
