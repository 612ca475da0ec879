"""BrokerGrants: the CONNACK read as paho hands it over, and the promises it weakens."""

from __future__ import annotations

from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from bridge.config import BridgeConfig
from bridge.mqtt.grants import BrokerGrants


def _connack(**values: int) -> Properties:
    props = Properties(PacketTypes.CONNACK)  # type: ignore[no-untyped-call]
    for name, value in values.items():
        setattr(props, name, value)
    return props


def test_ejabberd_like_connack_weakens_expiry_concurrency_and_sharing() -> None:
    grants = BrokerGrants.from_connack(
        "5",
        _connack(SharedSubscriptionAvailable=0, SessionExpiryInterval=300, ReceiveMaximum=1),
    )
    assert grants.shared_available is False
    warnings = grants.weakened(BridgeConfig())
    assert len(warnings) == 2
    assert "300 s, not the configured 86400 s" in warnings[0]
    assert "Receive Maximum is 1" in warnings[1]
    assert grants.as_info() == {
        "protocol": "5",
        "shared_available": False,
        "session_expiry": 300,
        "receive_maximum": 1,
        "retain_available": True,
    }


def test_mqtt5_defaults_are_available_and_weaken_nothing() -> None:
    grants = BrokerGrants.from_connack("5", _connack())
    assert grants.shared_available is True
    assert grants.retain_available is True
    assert grants.weakened(BridgeConfig()) == []


def test_mqtt311_states_nothing() -> None:
    grants = BrokerGrants.from_connack("3.1.1", None)
    assert grants.shared_available is None
    assert grants.weakened(BridgeConfig()) == []
    assert grants.as_info() == {"protocol": "3.1.1"}


def test_small_packets_and_no_retain_are_said() -> None:
    grants = BrokerGrants.from_connack("5", _connack(MaximumPacketSize=65536, RetainAvailable=0))
    warnings = grants.weakened(BridgeConfig())
    assert any("65536 bytes" in w for w in warnings)
    assert any("no retained messages" in w for w in warnings)
