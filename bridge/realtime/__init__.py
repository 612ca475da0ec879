"""Realtime sessions over MQTT: the Realtime API, realtime transcription and the Responses
WebSocket mode, one upstream WebSocket per device session (docs/protocol.md#realtime-sessions)."""
