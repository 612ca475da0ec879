"""A stand-in for the OpenAI Realtime and Responses WebSocket servers: a real aiohttp WebSocket
server on 127.0.0.1 that checks every client event against the vendored spec's schemas."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import functools
import json
import math
import socket
import struct
import threading
import time
import wave
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self

import jsonschema
from aiohttp import web
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

from support.openapi_spec import LATEST, document

SPEC_URI = "urn:openai-openapi"
CLIENT_SCHEMA = {
    "/v1/realtime": ["RealtimeClientEvent", "RealtimeClientEventTranscriptionSessionUpdate"],
    "/v1/responses": ["ResponsesClientEvent"],
}
SERVER_SCHEMA = "RealtimeServerEvent"
"""What every realtime server event the stand-in sends is checked against (before sending)."""
AUDIO_DELTA_BYTES = 4800
"""The stand-in's answer audio goes out in deltas of this many bytes (100 ms of PCM16)."""


def _server_validators() -> dict[str, jsonschema.protocols.Validator]:
    """A validator per event type of SERVER_SCHEMA's variants (its discriminator is `type`)."""
    schemas = document(LATEST)["components"]["schemas"]
    validators = {}
    for variant in schemas[SERVER_SCHEMA]["anyOf"]:
        name = variant["$ref"].rpartition("/")[2]
        validators[schemas[name]["properties"]["type"]["enum"][0]] = _validator([name])
    return validators


def _validator(names: list[str]) -> jsonschema.protocols.Validator:
    """A validator of `anyOf` the named component schemas, refs resolved in the spec."""
    resource = Resource.from_contents(document(LATEST), default_specification=DRAFT202012)
    registry: Registry[Any] = Registry().with_resource(SPEC_URI, resource)
    schema = {"anyOf": [{"$ref": f"{SPEC_URI}#/components/schemas/{n}"} for n in names]}
    cls = jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator)
    return cls(schema, registry=registry)


@dataclass
class Connection:
    """One upstream WebSocket as the stand-in saw it."""

    path: str
    query: dict[str, str]
    headers: dict[str, str]
    events: list[dict[str, Any]] = field(default_factory=list)
    invalid: list[str] = field(default_factory=list)
    """Client events that failed the spec's schema (with the first error)."""
    audio: bytearray = field(default_factory=bytearray)
    """Every `input_audio_buffer.append`'s audio, in arrival order."""
    closed_by_client: bool = False
    arrivals: list[tuple[float, bytes]] = field(default_factory=list)
    """`echo` behaviour: (perf_counter, first 8 audio bytes) of each append as it arrived."""
    echoed: list[tuple[float, bytes]] = field(default_factory=list)
    """`echo` behaviour: (perf_counter, first 8 bytes) of each delta just before it was sent."""
    sent_invalid: list[str] = field(default_factory=list)
    """Realtime server events of the stand-in's own that failed the spec's schema."""
    outputs: list[dict[str, Any]] = field(default_factory=list)
    """`function_call_output` items received since the last answer."""
    responses: int = 0
    """Responses answered on this connection (their ids are resp_1, resp_2, ...)."""


class RealtimeStandin:
    """The server in its own thread; `behaviour` decides what it does after a `response.create`:
    `answer` (echo the audio, a transcript, a call of `function_call`; after
    `function_call_output` items, a transcript quoting them), `calls` (a new call every time,
    outputs or not), `close` (close with 1011),
    `stall` (stop reading and answering pings), `garbage` (a frame that is no JSON event), `leak`
    (a text delta carrying the key it was sent; `leak-split`: over five deltas), `hold` (the
    answer waits for `release()`).
    `echo` (for bench/realtime.py) answers each append at once with its audio as a delta and
    records both moments; `validate = False` skips the schema check (its cost is the stand-in's)."""

    host = "127.0.0.1"

    def __init__(self) -> None:
        self.port = 0
        self.behaviour = "answer"
        self.validate = True
        self.function_call = ("lights_on", '{"room":"kitchen"}')
        """The (name, arguments) of the function the model calls in its answer."""
        self.hold: asyncio.Event | None = None
        """`hold` behaviour: set by `release()`; the answer waits for it."""
        self.held = threading.Event()
        """Set when a `response.create` is being held."""
        self.connections: list[Connection] = []
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping: asyncio.Event | None = None
        self._validators = {path: _validator(names) for path, names in CLIENT_SCHEMA.items()}
        self._server_validators = _server_validators()

    @property
    def url(self) -> str:
        """The `api_base` a bridge is configured with."""
        return f"http://{self.host}:{self.port}/v1"

    def start(self) -> Self:
        """Start listening; returns once the port is bound."""
        self._thread = threading.Thread(target=lambda: asyncio.run(self._main()), daemon=True)
        self._thread.start()
        if not self._ready.wait(10):
            raise TimeoutError("realtime stand-in did not start")
        return self

    def stop(self) -> None:
        """Close every socket and the server; join the thread."""
        if self._loop is not None and self._stopping is not None:
            with contextlib.suppress(RuntimeError):
                self._loop.call_soon_threadsafe(self._stopping.set)
        if self._thread is not None:
            self._thread.join(10)
            self._thread = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def release(self) -> None:
        """Let a held answer go (`hold` behaviour)."""
        assert self._loop is not None and self.hold is not None
        self._loop.call_soon_threadsafe(self.hold.set)

    def wait_for(self, predicate: Any, timeout: float = 10.0) -> None:
        """Wait until `predicate(self.connections)` holds (checked on every change)."""
        with self._cond:
            if not self._cond.wait_for(lambda: predicate(self.connections), timeout):
                raise TimeoutError(f"realtime stand-in: condition not met in {timeout}s")

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stopping = asyncio.Event()
        app = web.Application()
        app.router.add_get("/v1/realtime", self._serve)
        app.router.add_get("/v1/responses", self._serve)
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
        await runner.setup()
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.bind((self.host, 0))
        self.port = sock.getsockname()[1]
        await web.SockSite(runner, sock).start()
        self._ready.set()
        try:
            await self._stopping.wait()
        finally:
            await runner.cleanup()

    def _changed(self) -> None:
        with self._cond:
            self._cond.notify_all()

    async def _serve(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(autoping=True, max_msg_size=32 * 1024 * 1024)
        await ws.prepare(request)
        conn = Connection(request.path, dict(request.query), dict(request.headers))
        with self._cond:
            self.connections.append(conn)
            self._cond.notify_all()
        session = {
            "type": "realtime",
            "object": "realtime.session",
            "id": "sess_1",
            "model": request.query.get("model", "gpt-realtime"),
        }
        created = {"type": "session.created", "event_id": "evt_0", "session": session}
        if request.path == "/v1/realtime":
            await self._send(ws, conn, created)
        else:
            await ws.send_json(created)
        assert self._stopping is not None
        stopping = asyncio.ensure_future(self._stopping.wait())
        try:
            while not ws.closed:
                receive = asyncio.ensure_future(ws.receive())
                await asyncio.wait({receive, stopping}, return_when=asyncio.FIRST_COMPLETED)
                if not receive.done():
                    receive.cancel()
                    break
                msg = receive.result()
                if msg.type is not web.WSMsgType.TEXT:
                    conn.closed_by_client = msg.type in (web.WSMsgType.CLOSE, web.WSMsgType.CLOSED)
                    break
                try:
                    if not await self._event(ws, conn, request.path, msg.data):
                        break
                except ConnectionResetError:  # the bridge closed while an answer went out
                    conn.closed_by_client = True
                    break
        finally:
            stopping.cancel()
            self._changed()
            await ws.close()
        return ws

    async def _event(
        self, ws: web.WebSocketResponse, conn: Connection, path: str, text: str
    ) -> bool:
        """Record and answer one client event; False when the behaviour ends the connection."""
        event = json.loads(text)
        if self.behaviour == "echo" and event.get("type") == "input_audio_buffer.append":
            return await self._echo(ws, conn, event)
        errors = list(self._validators[path].iter_errors(event)) if self.validate else []
        conn.events.append(event)
        if errors:
            conn.invalid.append(f"{event.get('type')}: {errors[0].message[:300]}")
            await ws.send_json(
                {
                    "type": "error",
                    "event_id": "evt_err",
                    "error": {
                        "type": "invalid_request_error",
                        "message": "schema",
                        "event_id": None,
                    },
                }
            )
        if event.get("type") == "input_audio_buffer.append" and not errors:
            conn.audio += base64.b64decode(event["audio"])
        item = event.get("item") if event.get("type") == "conversation.item.create" else None
        if isinstance(item, dict) and item.get("type") == "function_call_output":
            conn.outputs.append(item)
        self._changed()
        if event.get("type") != "response.create":
            return True
        if self.behaviour == "close":
            await ws.close(code=1011, message=b"stand-in closes")
            return False
        if self.behaviour == "stall":
            assert self._stopping is not None
            await self._stopping.wait()
            return False
        if self.behaviour == "hold":
            self.hold = asyncio.Event()
            self.held.set()
            await self.hold.wait()
        if self.behaviour in ("leak", "leak-split"):
            key = conn.headers.get("Authorization", "").removeprefix("Bearer ")
            pieces = [f"my key is {key}"]
            if self.behaviour == "leak-split":  # a middle piece: neither its start nor its end
                pieces = ["my key is ", key[:5], key[5:17], key[17:], " ok"]
            for piece in pieces:
                await ws.send_json(
                    {
                        "type": "response.output_text.delta",
                        "event_id": "evt_l",
                        "response_id": "r",
                        "item_id": "i",
                        "output_index": 0,
                        "content_index": 0,
                        "delta": piece,
                    }
                )
            await ws.send_json({"type": "response.done", "event_id": "evt_d", "response": {}})
            return True
        if self.behaviour == "garbage":
            await ws.send_str("this is not JSON {")
            return True
        if path == "/v1/responses":
            await self._responses_answer(ws)
        elif conn.outputs and self.behaviour != "calls":
            await self._realtime_final(ws, conn)
        else:
            await self._realtime_answer(ws, conn)
        return True

    async def _send(self, ws: web.WebSocketResponse, conn: Connection, event: Any) -> None:
        """Send one realtime server event, checked against the spec's schema first."""
        if self.validate:
            validator = self._server_validators.get(event["type"])
            if validator is None:
                conn.sent_invalid.append(f"{event['type']}: not a {SERVER_SCHEMA} type")
            else:
                errors = list(validator.iter_errors(event))
                if errors:
                    conn.sent_invalid.append(f"{event['type']}: {errors[0].message[:300]}")
        await ws.send_json(event)

    async def _echo(self, ws: web.WebSocketResponse, conn: Connection, event: Any) -> bool:
        audio = base64.b64decode(event["audio"])
        conn.arrivals.append((time.perf_counter(), audio[:8]))
        conn.echoed.append((time.perf_counter(), audio[:8]))
        await ws.send_str(
            '{"type":"response.output_audio.delta","event_id":"e","response_id":"r",'
            '"item_id":"i","output_index":0,"content_index":0,"delta":"' + event["audio"] + '"}'
        )
        return True

    async def _realtime_answer(self, ws: web.WebSocketResponse, conn: Connection) -> None:
        audio = bytes(conn.audio)
        conn.responses += 1
        n_resp = conn.responses
        response_id = f"resp_{n_resp}"
        ids = {
            "response_id": response_id,
            "item_id": "item_1",
            "output_index": 0,
            "content_index": 0,
        }
        send = functools.partial(self._send, ws, conn)
        await send({"type": "response.created", "event_id": "evt_1", "response": {}})
        await send(
            {
                "type": "conversation.item.input_audio_transcription.delta",
                "event_id": "evt_2",
                "item_id": "item_0",
                "content_index": 0,
                "delta": "you said",
            }
        )
        for n, at in enumerate(range(0, len(audio), AUDIO_DELTA_BYTES)):
            piece = base64.b64encode(audio[at : at + AUDIO_DELTA_BYTES]).decode()
            await send(
                {
                    "type": "response.output_audio.delta",
                    "event_id": f"evt_a{n}",
                    **ids,
                    "delta": piece,
                }
            )
        for n, word in enumerate(("echo ", "of ", "your ", "audio")):
            await send(
                {
                    "type": "response.output_audio_transcript.delta",
                    "event_id": f"evt_t{n}",
                    **ids,
                    "delta": word,
                }
            )
        name, arguments = self.function_call
        call = {
            "id": f"item_f{n_resp}",
            "object": "realtime.item",
            "type": "function_call",
            "status": "completed",
            "call_id": f"call_{n_resp}",
            "name": name,
            "arguments": arguments,
        }
        await send(
            {
                "type": "response.function_call_arguments.done",
                "event_id": "evt_f",
                "response_id": response_id,
                "item_id": call["id"],
                "output_index": 1,
                "call_id": call["call_id"],
                "name": name,
                "arguments": arguments,
            }
        )
        await send(
            {
                "type": "response.output_item.done",
                "event_id": "evt_fi",
                "response_id": response_id,
                "output_index": 1,
                "item": call,
            }
        )
        await send(_response_done(response_id, [call]))

    async def _realtime_final(self, ws: web.WebSocketResponse, conn: Connection) -> None:
        """The answer after function outputs: a transcript quoting each output, no calls."""
        conn.responses += 1
        response_id = f"resp_{conn.responses}"
        text = " ".join(f"{o['call_id']} said {o['output']}" for o in conn.outputs)
        conn.outputs.clear()
        send = functools.partial(self._send, ws, conn)
        await send({"type": "response.created", "event_id": "evt_1", "response": {}})
        await send(
            {
                "type": "response.output_audio_transcript.delta",
                "event_id": "evt_t0",
                "response_id": response_id,
                "item_id": "item_m",
                "output_index": 0,
                "content_index": 0,
                "delta": text,
            }
        )
        message = {
            "id": "item_m",
            "object": "realtime.item",
            "type": "message",
            "status": "completed",
            "role": "assistant",
            "content": [{"type": "output_audio", "transcript": text}],
        }
        await send(_response_done(response_id, [message]))

    async def _responses_answer(self, ws: web.WebSocketResponse) -> None:
        await ws.send_json({"type": "response.created", "sequence_number": 0, "response": {}})
        for n, word in enumerate(("Hello", " there")):
            await ws.send_json(
                {
                    "type": "response.output_text.delta",
                    "sequence_number": n + 1,
                    "item_id": "msg_1",
                    "output_index": 0,
                    "content_index": 0,
                    "delta": word,
                }
            )
        await ws.send_json({"type": "response.completed", "sequence_number": 3, "response": {}})


def _response_done(response_id: str, output: list[dict[str, Any]]) -> dict[str, Any]:
    """A `response.done` event with its response's output items (no audio, as the spec says)."""
    response = {
        "object": "realtime.response",
        "id": response_id,
        "status": "completed",
        "output": output,
    }
    return {"type": "response.done", "event_id": f"evt_d_{response_id}", "response": response}


def wav_file(path: Path, seconds: float, pitch: float = 440.0) -> Path:
    """A 24 kHz mono PCM16 WAV file of a tone."""
    frames = b"".join(
        struct.pack("<h", int(12000 * math.sin(2 * math.pi * pitch * n / 24000)))
        for n in range(int(24000 * seconds))
    )
    with wave.open(str(path), "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(24000)
        out.writeframes(frames)
    return path


def pcm_of(path: Path) -> bytes:
    """The PCM frames of a WAV file."""
    with wave.open(str(path), "rb") as wav:
        return wav.readframes(wav.getnframes())
