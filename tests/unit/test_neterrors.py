"""Connection errors named by their cause, from real failed connections on loopback."""

from __future__ import annotations

import asyncio
import shutil
import socket
import ssl
import subprocess
from pathlib import Path

import aiohttp
import pytest
from support.broker import free_port

from bridge.neterrors import connection_cause
from bridge.service.aiohttp_transport import aiohttp_cause


async def _failure(url: str) -> BaseException:
    async with aiohttp.ClientSession() as session:
        try:
            async with session.get(url, timeout=aiohttp.ClientTimeout(total=10)):
                pass
        except aiohttp.ClientError as exc:
            return exc
    raise AssertionError(f"{url} answered")


async def test_refused() -> None:
    exc = await _failure(f"http://127.0.0.1:{free_port()}/v1/models")
    assert aiohttp_cause(exc) == "connection refused"
    assert connection_cause(ConnectionRefusedError(111, "Connection refused")) == (
        "connection refused"
    )


@pytest.fixture
def self_signed(tmp_path: Path) -> tuple[Path, Path]:
    """A self-signed certificate and its key, made with openssl."""
    if shutil.which("openssl") is None:
        pytest.fail("openssl is needed for the TLS tests (apt-get install openssl)")
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(
        [
            *("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1"),
            *("-subj", "/CN=127.0.0.1", "-keyout", str(key), "-out", str(cert)),
        ],
        check=True,
        capture_output=True,
    )
    return cert, key


async def test_untrusted_certificate(self_signed: tuple[Path, Path]) -> None:
    cert, key = self_signed
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)

    async def hang_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.close()

    server = await asyncio.start_server(hang_up, "127.0.0.1", 0, ssl=context)
    port = server.sockets[0].getsockname()[1]
    try:
        exc = await _failure(f"https://127.0.0.1:{port}/v1/models")
    finally:
        server.close()
        await server.wait_closed()
    assert aiohttp_cause(exc).startswith("TLS certificate not trusted (self")


def test_name_not_resolved_and_others() -> None:
    key = aiohttp.client_reqrep.ConnectionKey(
        "api.example.invalid", 443, True, True, None, None, None
    )
    dns = aiohttp.ClientConnectorError(key, socket.gaierror(socket.EAI_NONAME, "Name unknown"))
    assert aiohttp_cause(dns) == "name not resolved"
    unreachable = aiohttp.ClientConnectorError(key, OSError(113, "No route to host"))
    assert aiohttp_cause(unreachable) == "host unreachable"
    assert aiohttp_cause(aiohttp.ServerDisconnectedError()) == ("the server closed the connection")
    assert connection_cause(ValueError("odd")) == "ValueError"
