"""A "house" of fake devices on the broker: zigbee2mqtt-, Tasmota- and Home Assistant-style.

Each device listens on its set/command topic and publishes its new state retained, as the real
firmware does; `silent` devices never answer (a request tool times out on them).
"""

from __future__ import annotations

import json
import threading
from typing import Any, Self

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from support.broker import MosquittoBroker


class House:
    """Fake devices under `root`; `received[topic]` lists every payload a set topic got."""

    def __init__(self, broker: MosquittoBroker, root: str) -> None:
        self.root = root
        self.received: dict[str, list[bytes]] = {}
        self._lock = threading.Lock()
        self._ready = threading.Event()
        self._client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"house-{id(self)}")
        self._client.on_connect = self._on_connect
        self._client.on_message = self._on_message
        self._broker = broker

    def z2m(self, device: str) -> str:
        """zigbee2mqtt's state topic of `device` (its set topic is this + `/set`)."""
        return f"{self.root}/zigbee2mqtt/{device}"

    def start(self) -> Self:
        self._client.connect("127.0.0.1", self._broker.port)
        self._client.loop_start()
        if not self._ready.wait(10):
            raise TimeoutError("house not subscribed")
        # Retained states the model can read.
        self._publish(self.z2m("kitchen_light"), {"state": "ON", "brightness": 200})
        self._publish(self.z2m("hall_sensor"), {"temperature": 21.5, "humidity": 40})
        self._publish(f"{self.root}/tasmota/stat/garage/POWER", "OFF")
        return self

    def _publish(self, topic: str, payload: Any) -> None:
        data = payload if isinstance(payload, str) else json.dumps(payload)
        self._client.publish(topic, data, qos=1, retain=True).wait_for_publish(10)

    def _on_connect(self, client: mqtt.Client, *args: Any) -> None:
        client.subscribe(
            [(f"{self.root}/zigbee2mqtt/+/set", 1), (f"{self.root}/tasmota/cmnd/+/POWER", 1)]
        )
        client.on_subscribe = lambda *a: self._ready.set()

    def _on_message(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        with self._lock:
            self.received.setdefault(message.topic, []).append(bytes(message.payload))
        levels = message.topic.split("/")
        if message.topic.endswith("/set") and levels[-2] != "silent_lock":
            state = json.loads(message.payload)
            client.publish(message.topic[: -len("/set")], json.dumps(state), qos=1, retain=True)
        elif "/tasmota/cmnd/" in message.topic:
            device = levels[-2]
            client.publish(
                f"{self.root}/tasmota/stat/{device}/POWER", message.payload, qos=1, retain=True
            )

    def payloads(self, topic: str) -> list[bytes]:
        """What `topic` received so far."""
        with self._lock:
            return list(self.received.get(topic, []))

    def stop(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
