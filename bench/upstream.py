"""A cheap stand-in service host: aiohttp's low-level server, canned answers, fixed latency.

Run as `python bench/upstream.py --listen 0:0 --listen 0:200` (port:delay_ms pairs; port 0 picks a
free one). Prints one JSON line `{"ports": [...]}` once every listener is open, then serves until
SIGTERM. Every listener answers:

- POST .../chat/completions: a canned chat.completion JSON after the listener's delay;
- POST .../audio/speech: `--speech-bytes` random bytes as audio/mpeg;
- POST .../audio/transcriptions: reads the multipart body, answers {"text": "ok", "bytes": n}
  where n is the size of the `file` part (so the harness can check the upload arrived whole).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
from collections.abc import Awaitable, Callable

from aiohttp import BodyPartReader, web
from aiohttp.web_server import Server
from common import CHAT_COMPLETION

CHAT_BODY = json.dumps(CHAT_COMPLETION, separators=(",", ":")).encode()
JSON_HEADERS = {"Content-Type": "application/json", "x-request-id": "req_bench"}
Handler = Callable[[web.BaseRequest], Awaitable[web.StreamResponse]]


def make_handler(delay_s: float, speech: bytes) -> Handler:
    """The request handler for one listener."""

    async def handle(request: web.BaseRequest) -> web.StreamResponse:
        path = request.path
        if path.endswith("/chat/completions"):
            await request.read()
            if delay_s:
                await asyncio.sleep(delay_s)
            return web.Response(body=CHAT_BODY, headers=JSON_HEADERS)
        if path.endswith("/audio/speech"):
            await request.read()
            return web.Response(body=speech, content_type="audio/mpeg")
        if path.endswith("/audio/transcriptions"):
            received = 0
            reader = await request.multipart()
            while (part := await reader.next()) is not None:
                if isinstance(part, BodyPartReader) and part.name == "file":
                    while chunk := await part.read_chunk(1 << 20):
                        received += len(chunk)
                else:
                    await part.release()
            body = json.dumps({"text": "ok", "bytes": received}).encode()
            return web.Response(body=body, headers=JSON_HEADERS)
        body = json.dumps({"error": {"message": f"no route {path}", "type": "bench"}}).encode()
        return web.Response(status=404, body=body, headers=JSON_HEADERS)

    return handle


async def serve(listens: list[tuple[int, float]], speech_bytes: int) -> None:
    """Open every listener, announce the ports, serve until SIGTERM/SIGINT."""
    loop = asyncio.get_running_loop()
    speech = os.urandom(speech_bytes) if speech_bytes else b""
    servers = []
    ports = []
    for port, delay_ms in listens:
        server = Server(make_handler(delay_ms / 1000, speech), access_log=None)
        listener = await loop.create_server(server, "127.0.0.1", port, backlog=1024)
        servers.append(listener)
        ports.append(listener.sockets[0].getsockname()[1])
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    sys.stdout.write(json.dumps({"ports": ports}) + "\n")
    sys.stdout.flush()
    await stop.wait()
    for listener in servers:
        listener.close()


def main() -> None:
    """Parse `--listen port:delay_ms` (repeatable) and `--speech-bytes`, then serve."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--listen", action="append", default=[], help="port:delay_ms")
    parser.add_argument("--speech-bytes", type=int, default=0)
    args = parser.parse_args()
    listens = [(int(p), float(d)) for p, d in (item.split(":") for item in args.listen)]
    asyncio.run(serve(listens or [(0, 0.0)], args.speech_bytes))


if __name__ == "__main__":
    main()
