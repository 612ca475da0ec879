"""The command line, run as a user would: `python -m bridge ...` in a subprocess."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

from support.bridge_runner import TEST_API_KEY, BridgeThread, make_config
from support.broker import MosquittoBroker
from support.cli import cli
from support.standin import Reply, Standin

from bridge import __version__
from bridge.methods.catalog import default_table

REPO = Path(__file__).resolve().parents[2]


def test_version() -> None:
    out = cli("--version")
    assert out.returncode == 0 and __version__ in out.stdout


def test_check_config_ok_prints_the_redacted_config() -> None:
    out = cli(
        "check-config", "--config", "config/bridge.toml", env={"OPENAI_API_KEY": TEST_API_KEY}
    )
    assert out.returncode == 0, out.stderr
    effective = json.loads(out.stdout)
    assert effective["service"]["api_key"] == "**********"
    assert TEST_API_KEY not in out.stdout + out.stderr


def test_check_config_reports_every_problem_and_exits_78(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('[mqtt]\nport = "x"\ncolour = 1\n[service]\napi_key_name = "a b"\n')
    out = cli("--config", str(bad), "check-config")
    assert out.returncode == 78
    for where in ("mqtt.port", "mqtt.colour", "service.api_key_name"):
        assert where in out.stderr
    assert cli("run", "--config", str(bad)).returncode == 78


def test_methods_and_groups() -> None:
    out = cli("methods")
    table = default_table()
    assert out.returncode == 0 and len(out.stdout.splitlines()) == len(table) + len(table.extra)
    [generic] = [line for line in out.stdout.splitlines() if line.startswith("callEndpoint ")]
    assert generic.split()[1:] == ["any-endpoint", "ANY", "/<path", "from", "the", "payload>"]
    audio = cli("methods", "--group", "audio").stdout.splitlines()
    assert any(line.startswith("createSpeech ") for line in audio)
    assert all(" audio " in line for line in audio)
    assert cli("methods", "--group", "nope").returncode == 64


def test_describe_answers_what_goes_in_the_payload() -> None:
    out = cli("describe", "createtranscription")
    assert out.returncode == 0
    text = out.stdout
    for needle in (
        "POST",
        "/audio/transcriptions",
        "file",
        "model",
        "openai/request/createTranscription",
    ):
        assert needle in text
    assert cli("describe", "nope").returncode == 64


def test_call_round_trip(
    tmp_path: Path, mosquitto: MosquittoBroker, standin: Standin, topic_prefix: str
) -> None:
    path, env = make_config(
        tmp_path, broker_port=mosquitto.port, api_base=standin.url, prefix=topic_prefix
    )
    standin.script("POST", "/moderations", Reply(json={"flagged": False}))
    with BridgeThread.from_file(path, env):
        out = cli("call", "createModeration", '{"input": "hi"}', "--config", str(path))
        piped = cli("call", "getThread", "-", "--config", str(path), stdin="{}")
    assert out.returncode == 0, out.stderr
    reply = json.loads(out.stdout)
    assert reply["status"] == "ok" and reply["data"] == {"flagged": False}
    assert isinstance(reply["transaction"], str) and reply["transaction"]
    assert piped.returncode == 1
    assert json.loads(piped.stdout)["error"]["code"] == "missing_parameter"


def test_call_reply_option_flags(
    tmp_path: Path, mosquitto: MosquittoBroker, standin: Standin, topic_prefix: str
) -> None:
    path, env = make_config(
        tmp_path, broker_port=mosquitto.port, api_base=standin.url, prefix=topic_prefix
    )
    chat = {"choices": [{"index": 0, "message": {"role": "assistant", "content": "Grüße!"}}]}
    audio = bytes(range(256)) * 40
    standin.script("POST", "/chat/completions", Reply(json=chat))
    standin.script("POST", "/audio/speech", Reply(body=audio, content_type="audio/mpeg"))
    standin.script("GET", "/models/nope", Reply.error(404, "The model 'nope' does not exist"))
    question = '{"model": "m", "messages": []}'
    speech = '{"model": "tts-1", "voice": "alloy", "input": "hi"}'
    select = ("--select", "choices[0].message.content")
    with BridgeThread.from_file(path, env):
        plain = cli(
            "call",
            "createChatCompletion",
            question,
            *select,
            "--format",
            "plain",
            "--max-bytes",
            "32",
            "--config",
            str(path),
        )
        selected = cli("call", "createChatCompletion", question, *select, "--config", str(path))
        raw = cli(
            "call",
            "createSpeech",
            speech,
            "--format",
            "raw",
            "--chunk-bytes",
            "1000",
            "--output",
            str(tmp_path / "out.mp3"),
            "--config",
            str(path),
        )
        error = cli(
            "call", "retrieveModel", '{"model": "nope"}', "--format", "plain", "--config", str(path)
        )
        bad = cli("call", "listModels", "--select", "a[", "--config", str(path))
    assert (plain.returncode, plain.stdout) == (0, "Grüße!\n"), plain.stderr
    assert json.loads(selected.stdout)["data"] == "Grüße!"
    assert raw.returncode == 0, raw.stderr
    assert (tmp_path / "out.mp3").read_bytes() == audio
    assert error.returncode == 1 and error.stdout == ""
    # stderr: which config file was used (issue 14), then the ERROR line.
    assert error.stderr.splitlines()[-1].startswith(
        "ERROR upstream_error: service host answered HTTP 404"
    )
    assert bad.returncode == 64 and "_bridge.select is not a JMESPath expression" in bad.stderr
    assert all(b"_bridge" not in r.body for r in standin.requests)
    assert len(standin.requests) == 4  # the bad --select never reached the bridge


def test_call_stops_at_a_payload_too_large_reply_without_transaction(
    tmp_path: Path, mosquitto: MosquittoBroker, standin: Standin, topic_prefix: str
) -> None:
    """The bridge cannot read a too-large request's transaction; `call` knows its own topic."""
    path, env = make_config(
        tmp_path,
        broker_port=mosquitto.port,
        api_base=standin.url,
        prefix=topic_prefix,
        limits={"max_request_bytes": 1024},
    )
    payload = json.dumps({"input": "x" * 4000})
    with BridgeThread.from_file(path, env):
        started = time.monotonic()
        out = cli("call", "createModeration", payload, "--timeout", "30", "--config", str(path))
        took = time.monotonic() - started
    assert out.returncode == 1, out.stderr
    assert json.loads(out.stdout)["error"]["code"] == "payload_too_large"
    assert took < 20
    assert standin.requests == []


def test_call_with_stream_prints_each_event_as_it_arrives(
    tmp_path: Path, mosquitto: MosquittoBroker, standin: Standin, topic_prefix: str
) -> None:
    path, env = make_config(
        tmp_path, broker_port=mosquitto.port, api_base=standin.url, prefix=topic_prefix
    )
    chunks = [
        {"choices": [{"index": 0, "delta": {"content": word}, "finish_reason": None}]}
        for word in ("Hel", "lo")
    ] + [{"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}]
    # Each later event comes 1.5 s after the one before: the first line must be out by then.
    standin.script(
        "POST",
        "/chat/completions",
        Reply(sse=[(None, json.dumps(c)) for c in chunks] + [(None, "[DONE]")], sse_delay=1.5),
    )
    question = json.dumps({"model": "m", "messages": [], "stream": True, "transaction": "s1"})
    with BridgeThread.from_file(path, env):
        command = ["call", "createChatCompletion", question, "--config", str(path)]
        proc = subprocess.Popen(
            [sys.executable, "-m", "bridge", *command],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO)},
        )
        try:
            assert proc.stdout is not None
            first = json.loads(proc.stdout.readline())
            still_running = proc.poll() is None
            rest, _ = proc.communicate(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    assert first["seq"] == 0 and first["transaction"] == "s1"
    assert first["data"]["choices"][0]["delta"]["content"] == "Hel"
    assert still_running
    lines = [json.loads(line) for line in rest.splitlines()]
    assert [e["seq"] for e in lines[:-1]] == [1, 2]
    assert lines[-1]["status"] == "ok" and lines[-1]["transaction"] == "s1"
    assert proc.returncode == 0


def test_an_access_pattern_that_matches_no_method_is_a_config_error(tmp_path: Path) -> None:
    bad = tmp_path / "access.toml"
    bad.write_text('[access]\nallow_methods = ["createSpech", "createChat*"]\n')
    for command in (("check-config",), ("run",)):
        out = cli(*command, "--config", str(bad))
        assert out.returncode == 78, out.stderr
        assert "access.allow_methods: 'createSpech' matches no method" in out.stderr
        assert "did you mean createSpeech" in out.stderr
        assert "createChat*" not in out.stderr  # that one matches
