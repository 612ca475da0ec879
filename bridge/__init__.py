"""openai-mqtt-bridge: every OpenAI REST operation over MQTT."""

__version__ = "0.1.0"
