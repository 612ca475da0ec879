"""Home Assistant MQTT discovery and the stats document; pure functions, no I/O.

One retained device-based discovery message (Home Assistant 2024.11+) describes the bridge
instance as a device with a connectivity binary sensor read from the retained state topic and
five sensors read from the periodic stats topic. Topics and ids are derived from the topic
prefix and the instance name, so they stay the same across restarts.
"""

from __future__ import annotations

import functools
import hashlib
import re
from collections.abc import Sequence
from typing import Any

from bridge.config import BridgeConfig
from bridge.jsoncodec import dumps
from bridge.pipeline.stats import Stats
from bridge.redact import Redactor
from bridge.topics import Topics

ORIGIN_NAME = "openai-mqtt-bridge"
STATE_MAX = 255
"""Home Assistant refuses entity states longer than this."""

_NOT_ID = re.compile(r"[^a-zA-Z0-9_-]+")
_ONLINE_TEMPLATE = "{{ value_json.state }}"


def node_id(prefix: str, instance: str) -> str:
    """The discovery object id of one bridge: readable, `[a-zA-Z0-9_-]` only, stable, unique."""
    digest = hashlib.sha256(f"{prefix}\0{instance}".encode()).hexdigest()[:8]
    readable = _NOT_ID.sub("_", f"{prefix}_{instance}").strip("_")[:60]
    return f"omb_{readable}_{digest}"


def discovery_topic(config: BridgeConfig) -> str:
    """`<discovery_prefix>/device/<node id>/config` for this bridge."""
    node = node_id(config.mqtt.topic_prefix, config.mqtt.instance_name)
    return f"{config.homeassistant.discovery_prefix}/device/{node}/config"


def status_topic(config: BridgeConfig) -> str:
    """Where Home Assistant announces itself (`online` after a restart)."""
    return f"{config.homeassistant.discovery_prefix}/status"


def _availability(topics: Topics) -> list[dict[str, str]]:
    return [
        {
            "topic": topics.state,
            "value_template": _ONLINE_TEMPLATE,
            "payload_available": "online",
            "payload_not_available": "offline",
        }
    ]


def discovery_document(config: BridgeConfig, topics: Topics, version: str) -> dict[str, Any]:
    """The device discovery payload as a dict (see `discovery_message`)."""
    prefix = config.mqtt.topic_prefix
    instance = config.mqtt.instance_name
    node = node_id(prefix, instance)
    name = f"OpenAI MQTT bridge {instance}"
    if prefix != "openai":
        name += f" ({prefix})"
    availability = _availability(topics)

    def stat(key: str, title: str, template: str, **extra: Any) -> dict[str, Any]:
        return {
            "p": "sensor",
            "name": title,
            "unique_id": f"{node}_{key}",
            "state_topic": topics.stats,
            "value_template": template,
            "availability": availability,
            **extra,
        }

    components: dict[str, dict[str, Any]] = {
        # No availability here: when the bridge is gone this shows "Disconnected", not unknown.
        "connection": {
            "p": "binary_sensor",
            "name": "Connection",
            "unique_id": f"{node}_connection",
            "device_class": "connectivity",
            "entity_category": "diagnostic",
            "state_topic": topics.state,
            "value_template": _ONLINE_TEMPLATE,
            "payload_on": "online",
            "payload_off": "offline",
            "json_attributes_topic": topics.info,
        },
        "requests": stat(
            "requests",
            "Requests",
            "{{ value_json.requests_total }}",
            state_class="total_increasing",
            icon="mdi:swap-horizontal",
        ),
        "errors": stat(
            "errors",
            "Errors",
            "{{ value_json.errors_total }}",
            state_class="total_increasing",
            icon="mdi:alert-circle-outline",
        ),
        "in_flight": stat(
            "in_flight",
            "Requests in flight",
            "{{ value_json.in_flight }}",
            state_class="measurement",
            icon="mdi:timer-sand",
        ),
        "latency": stat(
            "latency",
            "Last latency",
            "{{ value_json.last_latency_ms }}",
            device_class="duration",
            unit_of_measurement="ms",
            state_class="measurement",
        ),
        "last_error": stat(
            "last_error",
            "Last error",
            "{{ value_json.last_error_text }}",
            entity_category="diagnostic",
            icon="mdi:message-alert-outline",
            json_attributes_topic=topics.stats,
            json_attributes_template=(
                "{{ value_json.last_error | to_json if value_json.last_error else '{}' }}"
            ),
        ),
    }
    return {
        "dev": {
            "ids": [node],
            "name": name,
            "mf": ORIGIN_NAME,
            "mdl": "OpenAI MQTT bridge",
            "sw": version,
        },
        "o": {"name": ORIGIN_NAME, "sw": version},
        "cmps": components,
    }


def discovery_message(config: BridgeConfig, topics: Topics, version: str) -> tuple[str, bytes]:
    """The retained device discovery message: (topic, JSON payload)."""
    return discovery_topic(config), dumps(discovery_document(config, topics, version))


def removal_message(config: BridgeConfig) -> tuple[str, bytes]:
    """The retained empty payload on the discovery topic that makes Home Assistant forget us."""
    return discovery_topic(config), b""


def error_text(error: dict[str, Any] | None) -> str | None:
    """`code: message` of a reply's error object, cut to fit an entity state; None if none."""
    if not error:
        return None
    text = f"{error.get('code', 'error')}: {error.get('message', '')}".strip()
    text = " ".join(text.split())
    return text if len(text) <= STATE_MAX else text[: STATE_MAX - 1] + "…"


@functools.lru_cache(maxsize=4)
def _redactor(secrets: tuple[str, ...]) -> Redactor:
    """One redactor per set of secrets: their forms are computed once, not per publish."""
    return Redactor(list(secrets))


def stats_payload(
    stats: Stats, secrets: Sequence[str] = (), broker_warnings: Sequence[str] = ()
) -> bytes:
    """The `<prefix>/bridge/<instance>/stats` document, with every secret redacted; the
    promises the broker weakens under `broker_warnings` when there are any."""
    error = _redactor(tuple(secrets)).any(stats.last_error)
    document: dict[str, Any] = {
        "requests_total": stats.requests_total,
        "errors_total": stats.errors_total,
        "in_flight": stats.in_flight,
        "last_latency_ms": stats.last_latency_ms,
        "last_error": error,
        "last_error_text": error_text(error),
        "by_code": dict(stats.by_code),
    }
    if broker_warnings:
        document["broker_warnings"] = list(broker_warnings)
    return dumps(document)
