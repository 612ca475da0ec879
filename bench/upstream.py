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
import ssl
import sys
from collections.abc import Awaitable, Callable

from aiohttp import BodyPartReader, web
from aiohttp.web_server import Server
from common import CHAT_COMPLETION

CHAT_BODY = json.dumps(CHAT_COMPLETION, separators=(",", ":")).encode()
SENTENCES = (
    "The living room light is on and set to 80 percent brightness.",
    "The temperature in the bedroom is 21.5 degrees Celsius, within your comfort range.",
    "Tomorrow will be mostly cloudy with a chance of light rain in the afternoon.",
    "Your next calendar event is a call with Anna at 3 pm.",
    "The washing machine finished its cycle twelve minutes ago.",
    "I could not find a device called garage heater; did you mean the garage fan?",
    "The front door is locked and the alarm is armed in away mode.",
    "Energy use today is 7.4 kWh, about 12 percent lower than yesterday.",
    "Traffic on the A9 is heavy near the airport exit; expect a delay of about 15 minutes.",
    "The recipe needs two eggs, 200 g of flour, a pinch of salt and 300 ml of milk.",
    "Remember to take the recycling bin out tonight; collection is early on Tuesday.",
    "I have added oat milk, tomatoes and coffee beans to your shopping list.",
)


def chat_body(size: int) -> bytes:
    """The canned chat.completion, its content made of distinct sentences to about `size` bytes
    (0: the short canned answer)."""
    if not size:
        return CHAT_BODY
    answer = json.loads(CHAT_BODY)
    content = answer["choices"][0]["message"]["content"]
    for sentence in SENTENCES:
        if len(json.dumps(answer, separators=(",", ":"))) + len(sentence) >= size:
            break
        content += " " + sentence
        answer["choices"][0]["message"]["content"] = content
    return json.dumps(answer, separators=(",", ":")).encode()


JSON_HEADERS = {"Content-Type": "application/json", "x-request-id": "req_bench"}
Handler = Callable[[web.BaseRequest], Awaitable[web.StreamResponse]]


def make_handler(delay_s: float, speech: bytes, chat: bytes = CHAT_BODY) -> Handler:
    """The request handler for one listener."""

    async def handle(request: web.BaseRequest) -> web.StreamResponse:
        path = request.path
        if path.endswith("/chat/completions"):
            await request.read()
            if delay_s:
                await asyncio.sleep(delay_s)
            return web.Response(body=chat, headers=JSON_HEADERS)
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


async def serve(
    listens: list[tuple[int, float]],
    speech_bytes: int,
    chat_bytes: int = 0,
    tls: ssl.SSLContext | None = None,
) -> None:
    """Open every listener (over TLS with `tls`), announce the ports, serve until SIGTERM."""
    loop = asyncio.get_running_loop()
    speech = os.urandom(speech_bytes) if speech_bytes else b""
    chat = chat_body(chat_bytes)
    servers = []
    ports = []
    for port, delay_ms in listens:
        server = Server(make_handler(delay_ms / 1000, speech, chat), access_log=None)
        listener = await loop.create_server(server, "127.0.0.1", port, backlog=1024, ssl=tls)
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
    """Parse `--listen port:delay_ms` (repeatable), `--speech-bytes`, `--chat-bytes`; serve."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--listen", action="append", default=[], help="port:delay_ms")
    parser.add_argument("--speech-bytes", type=int, default=0)
    parser.add_argument("--chat-bytes", type=int, default=0, help="chat answer of about N bytes")
    parser.add_argument("--tls-cert", help="PEM with the certificate chain and key: serve https")
    args = parser.parse_args()
    listens = [(int(p), float(d)) for p, d in (item.split(":") for item in args.listen)]
    tls = None
    if args.tls_cert:
        tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        tls.load_cert_chain(args.tls_cert)
    asyncio.run(serve(listens or [(0, 0.0)], args.speech_bytes, args.chat_bytes, tls))


if __name__ == "__main__":
    main()
