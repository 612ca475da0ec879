"""The upstream WebSocket of realtime sessions: the realtime subsystem's only use of aiohttp."""

from __future__ import annotations

import aiohttp

from bridge.neterrors import connection_cause
from bridge.realtime.session import UpstreamClosed


class AiohttpWebSockets:
    """Opens upstream WebSockets over one aiohttp session (`Upstream` connections)."""

    def __init__(self, connect_timeout: float, heartbeat: float) -> None:
        self._connect_timeout = connect_timeout
        self._heartbeat = heartbeat
        self._session: aiohttp.ClientSession | None = None

    async def connect(self, url: str, headers: dict[str, str]) -> AiohttpUpstream:
        """Open one WebSocket; raises UpstreamClosed (reason `connect_failed`) when it cannot."""
        if self._session is None:
            # Only the handshake is bounded: a session may last as long as its limits allow.
            timeout = aiohttp.ClientTimeout(total=None, connect=self._connect_timeout)
            self._session = aiohttp.ClientSession(timeout=timeout)
        try:
            ws = await self._session.ws_connect(
                url,
                headers=headers,
                heartbeat=self._heartbeat,
                timeout=aiohttp.ClientWSTimeout(ws_close=2.0),
                max_msg_size=16 * 1024 * 1024,
                autoclose=True,
                compress=0,
            )
        except aiohttp.WSServerHandshakeError as exc:
            raise UpstreamClosed("connect_failed", f"upstream refused: HTTP {exc.status}") from None
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            raise UpstreamClosed("connect_failed", connection_cause(exc)) from None
        return AiohttpUpstream(ws)

    async def close(self) -> None:
        """Close the pooled session (every socket must be closed first)."""
        if self._session is not None:
            await self._session.close()
            self._session = None


class AiohttpUpstream:
    """One open upstream WebSocket."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self._ws = ws

    async def send(self, text: str) -> None:
        """Send one text frame; raises UpstreamClosed when the socket is gone."""
        try:
            await self._ws.send_str(text)
        except (aiohttp.ClientError, ConnectionError, RuntimeError) as exc:
            raise UpstreamClosed("upstream_error", str(exc) or type(exc).__name__) from None

    async def receive(self) -> str:
        """The next text frame; raises UpstreamClosed with the reason when the socket ends."""
        msg = await self._ws.receive()
        if msg.type is aiohttp.WSMsgType.TEXT:
            return str(msg.data)
        if msg.type is aiohttp.WSMsgType.BINARY:
            raise UpstreamClosed("upstream_error", "upstream sent a binary frame")
        if msg.type is aiohttp.WSMsgType.ERROR and isinstance(msg.data, aiohttp.ServerTimeoutError):
            raise UpstreamClosed("upstream_lost", "no answer to the heartbeat")
        if msg.type is aiohttp.WSMsgType.ERROR:
            raise UpstreamClosed("upstream_error", str(msg.data) or "WebSocket error")
        code = self._ws.close_code
        if code == aiohttp.WSCloseCode.ABNORMAL_CLOSURE or code is None:
            raise UpstreamClosed("upstream_lost", "the connection was lost")
        raise UpstreamClosed("upstream_closed", f"upstream closed the WebSocket (code {code})")

    async def close(self) -> None:
        """Close the socket cleanly (idempotent)."""
        await self._ws.close()
