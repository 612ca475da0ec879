"""The embedded trial broker (amqtt): loopback only, MQTT 3.1.1, nothing persisted."""

from __future__ import annotations

import asyncio
import contextlib
import copy
import errno
import logging
from typing import Any

EMBEDDED_NOTICE = (
    "no [mqtt] host configured: running an embedded amqtt broker on {host}:{port} for trying "
    "things out only (MQTT 3.1.1, no persistence, no shared subscriptions, requests are lost "
    "when the bridge stops); for real use install Mosquitto and set [mqtt] host"
)

# amqtt waits 5 s (a constant in its protocol handler) for a PUBACK, then logs a warning and an
# ERROR with a traceback. The bridge acknowledges a request only after its reply is out, so every
# request slower than 5 s meets that; the late PUBACK that follows is harmless too.
_LATE_ACK_TEXTS = (
    "Timeout waiting for PUBACK",
    "Received PUBACK for unknown pending message Id",
    "PUBACK waiter with Id",
)
# Reported by the bridge itself, in one line (`port_busy_message`).
_STARTUP_FAILED = "Broker startup failed"
# At shutdown amqtt drops what it has not delivered yet (typically the bridge's own `offline`
# state); the trial broker promises nothing across a stop, so that is no news to the user.
_SHUTDOWN_DROPS = ("messages not broadcasted",)


EXISTING_BROKER_NOTICE = (
    "no [mqtt] host configured and a broker already answers MQTT on {host}:{port}: using it "
    "instead of the embedded trial broker (set [mqtt] host to choose a broker)"
)

# An MQTT 3.1.1 CONNECT: clean session, keepalive 10 s, client id "omb-probe".
_PROBE_CONNECT = b"\x10\x15\x00\x04MQTT\x04\x02\x00\x0a\x00\x09omb-probe"
_CONNACK = 0x20
_DISCONNECT = b"\xe0\x00"


async def answers_mqtt(host: str, port: int, wait: float = 1.5) -> bool:
    """Whether something on host:port answers an MQTT CONNECT with a CONNACK (then disconnects)."""
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), wait)
    except (OSError, TimeoutError):
        return False
    try:
        writer.write(_PROBE_CONNECT)
        await writer.drain()
        head = await asyncio.wait_for(reader.read(4), wait)
        if len(head) >= 2 and head[0] == _CONNACK:
            writer.write(_DISCONNECT)
            await writer.drain()
            return True
        return False
    except (OSError, TimeoutError):
        return False
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


def port_busy_message(port: int) -> str:
    """The one line printed when the trial broker's port is taken: what happened, both ways out."""
    return (
        f"cannot start the embedded trial broker: 127.0.0.1:{port} is already in use (often a "
        f'Mosquitto already running there). Either use that broker: set [mqtt] host = "127.0.0.1" '
        f"(or OMB_MQTT__HOST=127.0.0.1), or move the trial broker to a free port: set [mqtt] "
        f"port = 18830 (or OMB_MQTT__PORT=18830)"
    )


class PortInUse(OSError):
    """The trial broker's port is taken."""


def is_late_ack_noise(record: logging.LogRecord) -> bool:
    """Whether `record` is amqtt complaining about a PUBACK that came after its 5 s wait."""
    text = record.getMessage()
    if any(t in text for t in _LATE_ACK_TEXTS):
        return True
    exc = record.exc_info[1] if record.exc_info else None
    return exc is not None and any(t in str(exc) for t in _LATE_ACK_TEXTS)


class _AmqttRelay(logging.Handler):
    """Passes amqtt's records on to the root handlers, minus late-ack noise and tracebacks."""

    def emit(self, record: logging.LogRecord) -> None:
        text = record.getMessage()
        if (
            is_late_ack_noise(record)
            or text.startswith(_STARTUP_FAILED)
            or any(t in text for t in _SHUTDOWN_DROPS)
        ):
            return
        if record.exc_info or record.exc_text:
            exc = record.exc_info[1] if record.exc_info else None
            record = copy.copy(record)
            summary = f" ({type(exc).__name__}: {exc})" if exc is not None else ""
            record.msg = f"{record.getMessage()}{summary}"
            record.args = None
            record.exc_info = None
            record.exc_text = None
        logging.getLogger().handle(record)


def quiet_amqtt_logging() -> None:
    """Route amqtt's log through `_AmqttRelay` (idempotent); levels follow the root logger."""
    amqtt_log = logging.getLogger("amqtt")
    amqtt_log.setLevel(logging.NOTSET)
    amqtt_log.propagate = False
    if not any(isinstance(h, _AmqttRelay) for h in amqtt_log.handlers):
        amqtt_log.addHandler(_AmqttRelay())


class EmbeddedBroker:
    """An amqtt broker bound to 127.0.0.1; `start()` and `stop()` are awaited on our loop."""

    def __init__(self, host: str = "127.0.0.1", port: int = 1883) -> None:
        self.host = host
        self.port = port
        self._broker: Any = None

    async def start(self) -> None:
        """Start listening; raises PortInUse when the port is taken, another error otherwise."""
        from amqtt.broker import Broker

        quiet_amqtt_logging()
        config = {
            "listeners": {"default": {"type": "tcp", "bind": f"{self.host}:{self.port}"}},
            "plugins": {
                "amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True},
            },
        }
        self._broker = Broker(config)
        try:
            await self._broker.start()
        except Exception as exc:  # amqtt wraps the bind error in its own BrokerError
            self._broker = None
            cause = exc.__cause__
            if isinstance(cause, OSError) and cause.errno == errno.EADDRINUSE:
                raise PortInUse(errno.EADDRINUSE, port_busy_message(self.port)) from None
            raise

    async def stop(self) -> None:
        """Shut the broker down."""
        if self._broker is not None:
            await self._broker.shutdown()
            self._broker = None
