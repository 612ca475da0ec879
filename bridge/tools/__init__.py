"""MQTT topics as model tools: config, argument checks, the tool loop (docs/tools.md)."""
