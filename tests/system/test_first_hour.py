"""What a new user meets in the first hour: the trial broker, `call`, config lookup, messages."""

from __future__ import annotations

import base64
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import paho.mqtt.client as paho
import pytest
from support.bridge_runner import TEST_API_KEY, BridgeThread, make_config, write_config
from support.broker import MosquittoBroker, free_port
from support.cli import cli
from support.mqtt_client import TestClient
from support.standin import Reply, Standin

from bridge.errors import InvalidFile
from bridge.methods.catalog import default_table
from bridge.pipeline.multipart import encode_form

REPO = Path(__file__).resolve().parents[2]


# --- the embedded trial broker -------------------------------------------------------------------


def test_trial_broker_takes_a_late_ack_silently(tmp_path: Path, standin: Standin) -> None:
    port = free_port()
    path, env = make_config(
        tmp_path,
        broker_port=port,
        api_base=standin.url,
        prefix="late",
        mqtt={"host": ""},
        service={"read_timeout": 20.0, "total_timeout": 30.0},
    )
    # amqtt waits 5 s for a PUBACK; the bridge acks after its reply, here 6 s later.
    standin.script("GET", "/models", Reply(json={"object": "list", "data": []}, delay=6.0))
    with BridgeThread.from_file(path, env) as bridge:
        with TestClient("127.0.0.1", port, prefix="late", protocol=paho.MQTTv311) as c:
            c.subscribe("late/response/#")
            c.publish("late/request/listModels/slow", {"transaction": 1})
            c.wait_for("late/response/listModels/slow", timeout=20)
            # A second request on the same connection still works after the late ack.
            second = c.request("getModel", {"model": "x", "transaction": 2})
        replies = c.messages("late/response/listModels/slow")
    assert len(replies) == 1 and json.loads(replies[0].payload)["status"] == "ok"
    assert second["transaction"] == 2
    log = bridge.log_text()
    assert "PUBACK" not in log and "Traceback" not in log
    assert " WARNING amqtt" not in log and " ERROR amqtt" not in log
    assert "transitions" not in log


def test_trial_broker_port_taken_prints_one_clear_line(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        path = write_config(
            tmp_path / "b.toml",
            {"mqtt": {"host": "", "port": port}, "logging": {"format": "console"}},
        )
        out = cli("--config", str(path))
    assert out.returncode == 78
    assert "Traceback" not in out.stderr and "amqtt" not in out.stderr.replace("amqtt)", "")
    errors = [line for line in out.stderr.splitlines() if "[error" in line]
    assert len(errors) == 1, out.stderr
    assert f"127.0.0.1:{port} is already in use" in errors[0]
    assert 'host = "127.0.0.1"' in errors[0] and "[mqtt] port" in errors[0]


# --- where the config comes from -----------------------------------------------------------------


def test_call_uses_config_bridge_toml_of_the_current_folder(
    tmp_path: Path, mosquitto: MosquittoBroker, standin: Standin, topic_prefix: str
) -> None:
    path, env = make_config(
        tmp_path, broker_port=mosquitto.port, api_base=standin.url, prefix=topic_prefix
    )
    (tmp_path / "config").mkdir()
    (tmp_path / "config" / "bridge.toml").write_bytes(path.read_bytes())
    standin.script("POST", "/moderations", Reply(json={"flagged": False}))
    with BridgeThread.from_file(path, env):
        out = cli("call", "createModeration", '{"input": "hi"}', cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "config: config/bridge.toml" in out.stderr
    assert json.loads(out.stdout)["data"] == {"flagged": False}
    checked = cli("check-config", cwd=tmp_path)
    assert checked.returncode == 0 and json.loads(checked.stdout)["mqtt"]["topic_prefix"] == (
        topic_prefix
    )
    assert "config: config/bridge.toml" in checked.stderr


def test_omb_config_beats_the_current_folder(tmp_path: Path) -> None:
    (tmp_path / "config").mkdir()
    write_config(tmp_path / "config" / "bridge.toml", {"mqtt": {"topic_prefix": "here"}})
    other = write_config(tmp_path / "other.toml", {"mqtt": {"topic_prefix": "there"}})
    out = cli("check-config", cwd=tmp_path, env={"OMB_CONFIG": str(other)})
    assert json.loads(out.stdout)["mqtt"]["topic_prefix"] == "there"
    assert f"config: {other} ($OMB_CONFIG)" in out.stderr
    nothing = cli("check-config", cwd=tmp_path / "config")
    assert "built-in defaults" in nothing.stderr or "/etc/openai-mqtt-bridge" in nothing.stderr


def test_every_command_refuses_a_missing_config() -> None:
    for args in (["methods"], ["describe", "listModels"], ["check-config"], ["run"]):
        out = cli(*args, "--config", "/missing.toml")
        assert out.returncode == 78, args
        assert "/missing.toml: cannot read" in out.stderr


# --- `call` --------------------------------------------------------------------------------------


def test_call_file_arrives_byte_exact(
    tmp_path: Path, mosquitto: MosquittoBroker, standin: Standin, topic_prefix: str
) -> None:
    path, env = make_config(
        tmp_path, broker_port=mosquitto.port, api_base=standin.url, prefix=topic_prefix
    )
    audio = bytes(range(256)) * 40 + b"RIFF\x00"
    (tmp_path / "hello.wav").write_bytes(audio)
    standin.script("POST", "/audio/transcriptions", Reply(json={"text": "hello"}))
    with BridgeThread.from_file(path, env):
        out = cli(
            "call",
            "createTranscription",
            '{"model": "whisper-1"}',
            "--file",
            f"file={tmp_path / 'hello.wav'}",
            "--config",
            str(path),
        )
    assert out.returncode == 0, out.stderr
    part = standin.last.part("file")
    assert part.data == audio and part.filename == "hello.wav"
    bad = cli("call", "createTranscription", "--file", "nofile=x", "--config", str(path))
    assert bad.returncode == 64 and "its file fields: file" in bad.stderr
    missing = cli("call", "createTranscription", "--file", "file=/nope.wav", "--config", str(path))
    assert missing.returncode == 66 and "/nope.wav" in missing.stderr


def test_call_without_a_bridge_says_so_at_once(
    tmp_path: Path, mosquitto: MosquittoBroker, topic_prefix: str
) -> None:
    path, _ = make_config(
        tmp_path, broker_port=mosquitto.port, api_base="http://127.0.0.1:9/v1", prefix=topic_prefix
    )
    out = cli("call", "listModels", "--timeout", "600", "--config", str(path))
    assert out.returncode == 69
    assert f"no bridge online on {topic_prefix}" in out.stderr
    with TestClient.for_broker(mosquitto, prefix=topic_prefix) as c:
        c.publish(f"{topic_prefix}/bridge/gone/state", {"state": "offline"}, retain=True)
        offline = cli("call", "listModels", "--timeout", "600", "--config", str(path))
        c.publish(f"{topic_prefix}/bridge/gone/state", b"", retain=True)
    assert offline.returncode == 69 and "gone offline" in offline.stderr


def test_call_interrupted_and_timed_out_without_traceback(
    tmp_path: Path, mosquitto: MosquittoBroker, topic_prefix: str
) -> None:
    path, _ = make_config(
        tmp_path, broker_port=mosquitto.port, api_base="http://127.0.0.1:9/v1", prefix=topic_prefix
    )
    with bridge_online(mosquitto, topic_prefix) as fake_bridge:
        timed_out = cli("call", "listModels", "--timeout", "0.5", "--config", str(path))
        # Its own topic: the first call's request, delivered late, said nothing of this one.
        proc = start_call("--suffix", "held", "--config", str(path))
        try:
            fake_bridge.wait_for(f"{topic_prefix}/request/listModels/held", timeout=20)
            proc.send_signal(signal.SIGINT)
            _, err = proc.communicate(timeout=20)
        finally:
            proc.kill()
    assert timed_out.returncode == 75 and "no reply" in timed_out.stderr
    assert proc.returncode == 130 and "Traceback" not in err and "interrupted" in err


@contextlib.contextmanager
def bridge_online(mosquitto: MosquittoBroker, prefix: str) -> Iterator[TestClient]:
    """A client standing in for a bridge: its retained state says online (cleared after), and it
    receives the requests under `prefix`."""
    with TestClient.for_broker(mosquitto, prefix=prefix) as fake_bridge:
        state = f"{prefix}/bridge/mute/state"
        fake_bridge.publish(state, {"state": "online"}, retain=True)
        fake_bridge.subscribe(f"{prefix}/request/#")
        try:
            yield fake_bridge
        finally:
            fake_bridge.publish(state, b"", retain=True)


def start_call(*args: str, ignore_sigint: bool = False) -> subprocess.Popen[str]:
    """`python -m bridge call listModels ARGS`; `ignore_sigint`: with SIGINT ignored, as a script
    starts a background job (and the job starts every process), else at its default."""
    inherited = signal.SIG_IGN if ignore_sigint else signal.default_int_handler
    previous = signal.signal(signal.SIGINT, inherited)
    try:
        return subprocess.Popen(
            [sys.executable, "-m", "bridge", "call", "listModels", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=REPO,
            env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO)},
        )
    finally:
        signal.signal(signal.SIGINT, previous)


@pytest.mark.parametrize("ignore_sigint", [False, True], ids=["sigint-default", "sigint-ignored"])
@pytest.mark.parametrize("moment", ["connecting", "waiting-for-the-reply"])
def test_ctrl_c_interrupts_call_at_once(
    moment: str, ignore_sigint: bool, tmp_path: Path, mosquitto: MosquittoBroker, topic_prefix: str
) -> None:
    with (
        socket.create_server(("127.0.0.1", 0)) as silent,  # accepts, never says CONNACK
        bridge_online(mosquitto, topic_prefix) as fake_bridge,
    ):
        port = silent.getsockname()[1] if moment == "connecting" else mosquitto.port
        path, _ = make_config(
            tmp_path, broker_port=port, api_base="http://127.0.0.1:9/v1", prefix=topic_prefix
        )
        proc = start_call("--suffix", "held", "--config", str(path), ignore_sigint=ignore_sigint)
        try:
            if moment == "connecting":
                silent.settimeout(20)
                conn, _ = silent.accept()
                with conn:
                    conn.settimeout(20)
                    assert conn.recv(1) == b"\x10"  # its CONNECT
                    proc.send_signal(signal.SIGINT)
                    _, err = proc.communicate(timeout=10)
            else:
                fake_bridge.wait_for(f"{topic_prefix}/request/listModels/held", timeout=20)
                proc.send_signal(signal.SIGINT)
                _, err = proc.communicate(timeout=10)
        finally:
            proc.kill()
    assert (proc.returncode, err.splitlines()[-1:]) == (130, ["interrupted"]), err
    assert "Traceback" not in err


def test_a_closed_pipe_is_no_traceback() -> None:
    for args in (["methods"], ["describe", "createTranscription"], ["--help"]):
        read_end, write_end = os.pipe()
        os.close(read_end)  # the reader is gone before anything is written, like `| head -0`
        try:
            proc = subprocess.run(
                [sys.executable, "-m", "bridge", *args],
                stdout=write_end,
                stderr=subprocess.PIPE,
                text=True,
                timeout=60,
                cwd=REPO,
                env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO)},
                check=False,
            )
        finally:
            os.close(write_end)
        assert "Traceback" not in proc.stderr and "BrokenPipe" not in proc.stderr, args


def test_unknown_method_suggests_the_close_ones(tmp_path: Path) -> None:
    for args in (["describe", "createChatCompletions"], ["call", "createChatCompletions"]):
        out = cli(*args, "--config", str(write_config(tmp_path / "c.toml", {})))
        assert out.returncode == 64
        assert "did you mean createChatCompletion" in out.stderr
    assert default_table().suggest("listmodel")[0] == "listModels"


def test_call_help_lists_exit_codes_and_timeout() -> None:
    text = cli("call", "--help").stdout
    assert "how long to wait for the reply" in text
    for code in ("64", "66", "69", "75", "78", "130"):
        assert f"\n  {code} " in text or f"  {code}  " in text, code


def test_methods_columns_line_up() -> None:
    lines = cli("methods").stdout.splitlines()
    verb_columns = {len(line.split("  /", 1)[0].rstrip().rsplit(" ", 1)[0]) for line in lines}
    path_columns = {line.index(" /") for line in lines}
    assert len(verb_columns) == 1 and len(path_columns) == 1


# --- configuration from the environment ----------------------------------------------------------


def test_env_problems_name_the_variable() -> None:
    out = cli(
        "check-config",
        "--config",
        "config/bridge.toml",
        env={"OMB_SERVICE__API_BSE": "http://x", "OPENAI_API_KEY": TEST_API_KEY},
    )
    assert out.returncode == 78
    assert "from environment variable OMB_SERVICE__API_BSE" in out.stderr
    assert "did you mean api_base?" in out.stderr
    assert "invalid configuration (config/bridge.toml and the environment)" in out.stderr
    warned = cli("check-config", "--config", "config/bridge.toml", env={"OMB_MQTT_PORT": "1884"})
    assert warned.returncode == 0
    assert "OMB_MQTT_PORT matches no option" in warned.stderr
    assert "did you mean OMB_MQTT__PORT?" in warned.stderr


def test_misspelt_option_in_a_file_gets_did_you_mean(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('[mqtt]\ntopic_prefx = "x"\n[servic]\n')
    out = cli("check-config", "--config", str(bad))
    assert out.returncode == 78
    assert "mqtt.topic_prefx: unknown option; did you mean topic_prefix?" in out.stderr
    assert "servic: unknown section; did you mean service?" in out.stderr
    assert "environment" not in out.stderr


# --- messages ------------------------------------------------------------------------------------


@pytest.mark.parametrize("text", ["/home/pi/rec/door1", "./hello.wav", "~/rec/door1.wav"])
def test_a_path_where_base64_belongs_is_invalid_file(text: str) -> None:
    op = default_table().find("createTranscription")
    assert op is not None
    with pytest.raises(InvalidFile) as caught:
        encode_form(op, {"model": "whisper-1", "file": text})
    message = caught.value.message
    assert "looks like a file path" in message and "base64" in message and "--file" in message


def test_real_base64_that_starts_like_a_path_still_decodes() -> None:
    op = default_table().find("createTranscription")
    assert op is not None
    data = b"\xff\xd8\xff\xe0" + bytes(300)  # a JPEG's base64 starts with "/9j/"
    text = base64.b64encode(data).decode()
    parts = encode_form(op, {"model": "whisper-1", "file": text})
    assert [p.value for p in parts if p.name == "file"] == [data]


def test_no_host_uses_a_broker_that_already_answers_on_the_port(
    tmp_path: Path, mosquitto: MosquittoBroker, standin: Standin
) -> None:
    """`./test.sh` leaves Debian's Mosquitto on 1883; `./start.sh` with no host then uses it."""
    path, env = make_config(
        tmp_path,
        broker_port=mosquitto.port,
        api_base=standin.url,
        prefix="existing",
        mqtt={"host": ""},
    )
    standin.script("POST", "/moderations", Reply(json={"flagged": False}))
    with (
        BridgeThread.from_file(path, env) as bridge,
        TestClient.for_broker(mosquitto, prefix="existing") as c,
    ):
        reply = c.request("createModeration", {"input": "hi", "transaction": 1})
    assert reply["status"] == "ok"
    notices = [line for line in bridge.log_text().splitlines() if "already answers MQTT" in line]
    assert len(notices) == 1
    assert f"127.0.0.1:{mosquitto.port}" in notices[0]
    assert "embedded amqtt broker on" not in bridge.log_text()


def test_start_sh_help_prints_the_help() -> None:
    out = subprocess.run(
        [str(REPO / "start.sh"), "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("usage:") and "--config" in out.stdout
