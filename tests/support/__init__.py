"""Integration-test infrastructure: a private Mosquitto, an OpenAI stand-in, an MQTT client."""

from .broker import MosquittoBroker, MosquittoError, MosquittoNotInstalled
from .mqtt_client import MQTTv5, MQTTv311, Received, TestClient
from .standin import UNSET, Part, RecordedRequest, Reply, Script, Standin

__all__ = [
    "UNSET",
    "MQTTv5",
    "MQTTv311",
    "MosquittoBroker",
    "MosquittoError",
    "MosquittoNotInstalled",
    "Part",
    "Received",
    "RecordedRequest",
    "Reply",
    "Script",
    "Standin",
    "TestClient",
]
