"""Fake devices on their real topics, acting as zigbee2mqtt, Tasmota and Home Assistant's MQTT
entities' devices do, for the recipes of docs/tools.md.

The conventions are the projects' own:

- zigbee2mqtt: commands as JSON on `zigbee2mqtt/<name>/set` (`{"state": "OFF"}`; a bare value is
  taken as the state), the device's whole state as JSON on `zigbee2mqtt/<name>`, retained only
  with the device option `retain: true`;
- Tasmota: `cmnd/<topic>/POWER` takes `ON`/`OFF`/`TOGGLE`/`1`/`0`/`2` in any case (empty: a
  query) and answers `{"POWER":"ON"}` on `stat/<topic>/RESULT`, then `ON` on `stat/<topic>/POWER`
  (retained only with `PowerRetain 1`); `tele/<topic>/LWT` `Online`, retained;
- a device behind a Home Assistant `mqtt` light or lock (default schema): `ON`/`OFF` or
  `LOCK`/`UNLOCK` on the command topic, the state `ON`/`OFF` or `LOCKED`/`UNLOCKED` on the state
  topic, retained as Home Assistant's docs recommend.

Each device is one MQTT 3.1.1 client (as the real ones) and records every command it got.
"""

from __future__ import annotations

import json
import threading
from typing import Any, Self

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

__all__ = ["Firmware", "HaMqttDevice", "TasmotaPlug", "Zigbee2mqttDevice"]

_TASMOTA_ON = {"on", "1", "true"}
_TASMOTA_OFF = {"off", "0", "false"}
_TASMOTA_TOGGLE = {"toggle", "2"}


class Firmware:
    """One device's MQTT client: subscribes to `filters`, records commands, publishes states."""

    def __init__(self, host: str, port: int, client_id: str, filters: list[str]) -> None:
        self.host, self.port, self.filters, self.client_id = host, port, filters, client_id
        self.received: list[tuple[str, bytes]] = []
        self._cond = threading.Condition()
        self._subscribed = threading.Event()
        self._client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv311
        )
        self._client.on_connect = self._on_connect
        self._client.on_subscribe = lambda *a: self._subscribed.set()
        self._client.on_message = self._on_message

    def start(self) -> Self:
        """Connect, subscribe and publish the states it starts with; return once all is done."""
        self._client.connect(self.host, self.port)
        self._client.loop_start()
        if not self._subscribed.wait(10):
            raise TimeoutError(f"{self.client_id!r} not subscribed")
        for topic, payload, retain in self.initial():
            self._client.publish(topic, payload, qos=1, retain=retain).wait_for_publish(10)
        return self

    def stop(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def initial(self) -> list[tuple[str, bytes, bool]]:
        """(topic, payload, retain) published once subscribed."""
        return []

    def handle(self, topic: str, payload: bytes) -> list[tuple[str, bytes, bool]]:
        """What the device publishes in answer to a command."""
        raise NotImplementedError

    def _on_connect(self, client: mqtt.Client, *args: Any) -> None:
        client.subscribe([(f, 1) for f in self.filters])

    def _on_message(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        if message.retain:
            return  # a retained command from earlier: real firmware must not act on it either
        payload = bytes(message.payload)
        with self._cond:  # recorded before the answer goes out: whoever sees it sees this
            self.received.append((message.topic, payload))
            self._cond.notify_all()
        for topic, answer, retain in self.handle(message.topic, payload):
            client.publish(topic, answer, qos=1, retain=retain)

    def commands(self, topic: str) -> list[bytes]:
        """Every payload the device got on `topic`, in order."""
        with self._cond:
            return [p for t, p in self.received if t == topic]

    def wait_commands(self, topic: str, n: int, timeout: float = 10.0) -> list[bytes]:
        """Wait until `topic` got `n` commands; returns them."""
        with self._cond:
            if not self._cond.wait_for(lambda: len(self.commands(topic)) >= n, timeout):
                raise TimeoutError(f"{topic!r} got {self.commands(topic)!r}, not {n}")
        return self.commands(topic)


class Zigbee2mqttDevice(Firmware):
    """A device under zigbee2mqtt: JSON state on `<base>/<name>`, commands on `.../set`."""

    def __init__(
        self,
        host: str,
        port: int,
        name: str,
        state: dict[str, Any],
        *,
        retain: bool = False,
        base: str = "zigbee2mqtt",
    ) -> None:
        self.topic = f"{base}/{name}"
        self.state = dict(state)
        self.retain = retain
        super().__init__(host, port, f"z2m-{name}", [f"{self.topic}/set"])

    def initial(self) -> list[tuple[str, bytes, bool]]:
        return [(self.topic, self._state(), self.retain)]

    def _state(self) -> bytes:
        return json.dumps(self.state, sort_keys=True).encode()

    def handle(self, topic: str, payload: bytes) -> list[tuple[str, bytes, bool]]:
        try:
            command = json.loads(payload)
        except ValueError:
            command = payload.decode(errors="replace")
        if not isinstance(command, dict):
            command = {"state": command}  # zigbee2mqtt takes a bare value as the state
        if "state" in command and "state" in self.state:
            wanted = str(command["state"]).upper()
            if wanted == "TOGGLE":
                wanted = "OFF" if self.state["state"] == "ON" else "ON"
            if wanted not in {"ON", "OFF"}:
                return []  # zigbee2mqtt logs an error and publishes nothing
            self.state["state"] = wanted
        for key in ("brightness",):
            if key in command and key in self.state:
                self.state[key] = int(command[key])
        return [(self.topic, self._state(), self.retain)]


class TasmotaPlug(Firmware):
    """A Tasmota plug with one relay under `%prefix%/%topic%/` (the default FullTopic)."""

    def __init__(
        self,
        host: str,
        port: int,
        topic: str,
        power: str = "OFF",
        *,
        power_retain: bool = False,
    ) -> None:
        self.topic, self.power = topic, power
        self.power_retain = power_retain
        super().__init__(host, port, f"tasmota-{topic}", [f"cmnd/{topic}/#"])

    def initial(self) -> list[tuple[str, bytes, bool]]:
        out = [(f"tele/{self.topic}/LWT", b"Online", True)]
        if self.power_retain:
            out.append((f"stat/{self.topic}/POWER", self.power.encode(), True))
        return out

    def handle(self, topic: str, payload: bytes) -> list[tuple[str, bytes, bool]]:
        command = topic.rsplit("/", 1)[1]
        if command.upper() not in {"POWER", "POWER1"}:
            return [(f"stat/{self.topic}/RESULT", b'{"Command":"Unknown"}', False)]
        value = payload.decode(errors="replace").strip().lower()
        if value in _TASMOTA_ON:
            self.power = "ON"
        elif value in _TASMOTA_OFF:
            self.power = "OFF"
        elif value in _TASMOTA_TOGGLE:
            self.power = "OFF" if self.power == "ON" else "ON"
        elif value not in {"", "?"}:
            return [(f"stat/{self.topic}/RESULT", b'{"Command":"Error"}', False)]
        result = json.dumps({"POWER": self.power}, separators=(",", ":")).encode()
        return [
            (f"stat/{self.topic}/RESULT", result, False),
            (f"stat/{self.topic}/POWER", self.power.encode(), self.power_retain),
        ]


class HaMqttDevice(Firmware):
    """The device behind a Home Assistant `mqtt` entity with the default payloads.

    `states` maps each command payload to the state the device reports (a light:
    `{b"ON": b"ON", b"OFF": b"OFF"}`, a lock: `{b"LOCK": b"LOCKED", b"UNLOCK": b"UNLOCKED"}`);
    anything else is ignored, as such firmware does."""

    def __init__(
        self,
        host: str,
        port: int,
        command_topic: str,
        state_topic: str,
        states: dict[bytes, bytes],
        state: bytes,
    ) -> None:
        self.command_topic, self.state_topic = command_topic, state_topic
        self.states, self.state = states, state
        name = command_topic.replace("/", "-")
        super().__init__(host, port, f"device-{name}", [command_topic])

    def initial(self) -> list[tuple[str, bytes, bool]]:
        return [(self.state_topic, self.state, True)]

    def handle(self, topic: str, payload: bytes) -> list[tuple[str, bytes, bool]]:
        if payload not in self.states:
            return []
        self.state = self.states[payload]
        return [(self.state_topic, self.state, True)]
