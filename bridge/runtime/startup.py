"""What the bridge says when it starts: a short summary of its configuration, and what is missing.

Pure: no I/O. The full effective configuration is what `openai-mqtt-bridge check-config` prints.
"""

from __future__ import annotations

import ipaddress
from typing import Any

import yarl

from bridge.config import BridgeConfig

# Host names that name a machine on the local network rather than a public service.
_LOCAL_SUFFIXES = (".local", ".lan", ".home.arpa", ".internal", ".localdomain")


def is_local_host(host: str) -> bool:
    """Whether `host` is this machine or the local network (where servers usually need no key)."""
    name = host.strip("[]").lower().rstrip(".")
    if name == "localhost" or name.endswith((".localhost", *_LOCAL_SUFFIXES)):
        return True
    try:
        address = ipaddress.ip_address(name)
    except ValueError:
        return "." not in name and bool(name)  # a bare name: a LAN or container host
    return address.is_loopback or address.is_private or address.is_link_local


def missing_key_warning(config: BridgeConfig) -> str | None:
    """The warning for a service host that gets no API key, or None when it may need none."""
    if config.service.api_key.get_secret_value():
        return None
    host = yarl.URL(config.service.api_base).host or ""
    if is_local_host(host):
        return None
    return (
        f"no API key set: {host} will refuse every request (401); set OPENAI_API_KEY, "
        "[service] api_key_file or the systemd credential openai_api_key"
    )


def summary(config: BridgeConfig, config_source: str | None = None) -> dict[str, Any]:
    """The `starting` line's fields: broker, prefix, service host, key, concurrency, full config."""
    mqtt = config.mqtt
    broker = f"{mqtt.host or '127.0.0.1'}:{mqtt.port}"
    if mqtt.embedded:
        broker += " (no [mqtt] host: one already answering there, else the embedded trial broker)"
    elif mqtt.tls.active:
        broker += " (TLS)"
    check = "openai-mqtt-bridge check-config"
    if config_source:
        check += f" --config {config_source}"
    return {
        "broker": broker,
        "prefix": mqtt.topic_prefix,
        "instance": mqtt.instance_name,
        # Credentials in the URL (http://user:pass@host) stay out of the log.
        "service": str(yarl.URL(config.service.api_base).with_user(None)),
        "api_key": "set" if config.service.api_key.get_secret_value() else "not set",
        "concurrency": config.limits.max_concurrency,
        "full_config": check,
    }
