"""The embedded trial broker (amqtt): loopback only, MQTT 3.1.1, nothing persisted."""

from __future__ import annotations

import logging
from typing import Any

EMBEDDED_NOTICE = (
    "no [mqtt] host configured: running an embedded amqtt broker on {host}:{port} for trying "
    "things out only (MQTT 3.1.1, no persistence, no shared subscriptions, requests are lost "
    "when the bridge stops); for real use install Mosquitto and set [mqtt] host"
)


class EmbeddedBroker:
    """An amqtt broker bound to 127.0.0.1; `start()` and `stop()` are awaited on our loop."""

    def __init__(self, host: str = "127.0.0.1", port: int = 1883) -> None:
        self.host = host
        self.port = port
        self._broker: Any = None

    async def start(self) -> None:
        """Start listening; raises OSError when the port is taken."""
        from amqtt.broker import Broker

        # amqtt logs every connection at INFO; keep its chatter out of our log.
        logging.getLogger("amqtt").setLevel(logging.WARNING)
        config = {
            "listeners": {"default": {"type": "tcp", "bind": f"{self.host}:{self.port}"}},
            "plugins": {
                "amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True},
            },
        }
        self._broker = Broker(config)
        await self._broker.start()

    async def stop(self) -> None:
        """Shut the broker down."""
        if self._broker is not None:
            await self._broker.shutdown()
            self._broker = None
