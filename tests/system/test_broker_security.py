"""Broker TLS (hostname checked) and username/password, against a real Mosquitto."""

from __future__ import annotations

import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.bridge_runner import TEST_API_KEY, BridgeThread, make_config
from support.broker import MosquittoBroker, free_port
from support.mqtt_client import TestClient
from support.standin import Standin

from bridge.config import load_config

PASSWORD = "broker-pass-7f3a9c2e"


def _run(*args: str) -> None:
    subprocess.run(args, check=True, capture_output=True, timeout=60)


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CA and a server certificate for `localhost`, made with openssl."""
    if shutil.which("openssl") is None:
        pytest.fail("openssl is needed for the TLS tests (apt-get install openssl)")
    d = tmp_path_factory.mktemp("certs")
    _run(
        "openssl",
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "2",
        "-subj",
        "/CN=test-ca",
        "-keyout",
        str(d / "ca.key"),
        "-out",
        str(d / "ca.pem"),
    )
    _run(
        "openssl",
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-subj",
        "/CN=localhost",
        "-keyout",
        str(d / "server.key"),
        "-out",
        str(d / "server.csr"),
    )
    (d / "ext.cnf").write_text("subjectAltName=DNS:localhost\n")
    _run("openssl", "x509", "-req", "-in", str(d / "server.csr"), "-CA", str(d / "ca.pem"),
         "-CAkey", str(d / "ca.key"), "-CAcreateserial", "-days", "2",
         "-extfile", str(d / "ext.cnf"), "-out", str(d / "server.pem"))  # fmt: skip
    for key in ("ca.key", "server.key"):
        (d / key).chmod(0o644)  # Mosquitto may drop privileges before reading it
    return d


@pytest.fixture
def secure_broker(tmp_path: Path, certs: Path) -> Iterator[tuple[MosquittoBroker, int]]:
    passwd = tmp_path / "passwd"
    passwd.touch()
    _run("mosquitto_passwd", "-b", str(passwd), "bridge", PASSWORD)
    passwd.chmod(0o644)
    tls_port = free_port()
    broker = MosquittoBroker(
        tmp_path / "mosquitto",
        extra_config=[
            f"password_file {passwd}",
            f"listener {tls_port} 127.0.0.1",
            f"cafile {certs / 'ca.pem'}",
            f"certfile {certs / 'server.pem'}",
            f"keyfile {certs / 'server.key'}",
        ],
    )
    broker.start()
    try:
        yield broker, tls_port
    finally:
        broker.close()


def test_tls_with_password(
    tmp_path: Path, secure_broker: tuple[MosquittoBroker, int], certs: Path, standin: Standin
) -> None:
    broker, tls_port = secure_broker
    path, env = make_config(
        tmp_path,
        broker_port=tls_port,
        api_base=standin.url,
        prefix="tls",
        mqtt={"host": "localhost", "username": "bridge", "tls": {"ca_file": str(certs / "ca.pem")}},
    )
    env = {**env, "MQTT_PASSWORD": PASSWORD}
    with (
        BridgeThread.from_file(path, env) as bridge,
        TestClient.for_broker(broker, prefix="tls") as c,
    ):
        assert c.request("listModels", {"transaction": 1})["status"] == "ok"
    log = bridge.log_text()
    assert PASSWORD not in log and TEST_API_KEY not in log
    assert re.search(
        r"New client connected from 127.0.0.1:\d+ as bridge-tls .* u'bridge'", broker.log_text()
    )


def test_wrong_hostname_is_refused(
    tmp_path: Path, secure_broker: tuple[MosquittoBroker, int], certs: Path, standin: Standin
) -> None:
    _, tls_port = secure_broker
    path, env = make_config(
        tmp_path,
        broker_port=tls_port,
        api_base=standin.url,
        prefix="tls-ip",
        mqtt={"host": "127.0.0.1", "tls": {"ca_file": str(certs / "ca.pem")}},
    )
    runner = BridgeThread(load_config(path, environ=env))
    with pytest.raises(TimeoutError):
        runner.start(timeout=2)
    try:
        assert "SSLCertVerificationError" in runner.log_text() or "certificate" in runner.log_text()
    finally:
        runner.stop()


def test_bad_password_backs_off_to_the_maximum(
    tmp_path: Path, secure_broker: tuple[MosquittoBroker, int], standin: Standin
) -> None:
    broker, _ = secure_broker
    path, env = make_config(
        tmp_path,
        broker_port=broker.port,
        api_base=standin.url,
        prefix="badpw",
        mqtt={"username": "bridge", "reconnect_min": 0.05, "reconnect_max": 0.4, "protocol": "5"},
    )
    runner = BridgeThread(load_config(path, environ={**env, "MQTT_PASSWORD": "wrong"}))
    with pytest.raises(TimeoutError):
        runner.start(timeout=1.5)
    try:
        refusals = [
            float(re.search(r'"retry_in": ([0-9.]+)', line).group(1))  # type: ignore[union-attr]
            for line in runner.log_text().splitlines()
            if '"broker refused the connection"' in line
        ]
        assert refusals, runner.log_text()[-2000:]
        # Straight to the maximum (jittered within its upper half), never the 0.05 s minimum.
        assert all(0.2 <= delay <= 0.4 for delay in refusals), refusals
        assert len(refusals) <= 8  # about 1.5 s / 0.3 s: no spinning
        assert "wrong" not in runner.log_text()
    finally:
        runner.stop()
