"""Presets a device calls with plain text, and conversations that remember (docs/tools.md)."""
