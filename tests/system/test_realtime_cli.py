"""`openai-mqtt-bridge realtime` as a user runs it, against a real bridge and the stand-in."""

from __future__ import annotations

import wave
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from support.bridge_runner import make_config
from support.broker import MosquittoBroker
from support.cli import LEAKS, cli
from support.realtime_standin import RealtimeStandin, pcm_of, wav_file

StartBridge = Callable[..., Any]


@pytest.mark.parametrize("group", ["", "voice"])
def test_realtime_cli_speaks_a_wav_file_and_writes_the_answer(
    start_bridge: StartBridge,
    mosquitto: MosquittoBroker,
    topic_prefix: str,
    tmp_path: Path,
    group: str,
) -> None:
    """Alone or in a `$share` group (then the session's input is the member's own topic)."""
    with RealtimeStandin() as upstream:
        start_bridge(api_base=upstream.url, mqtt={"shared_group": group})
        question = wav_file(tmp_path / "question.wav", 0.5)
        config, _env = make_config(
            tmp_path, broker_port=mosquitto.port, api_base=upstream.url, prefix=topic_prefix
        )
        answer = tmp_path / "answer.wav"
        done = cli("realtime", "--config", str(config), str(question), "-o", str(answer), "--fast")
        assert done.returncode == 0, done.stderr
        assert done.stdout.strip() == "you saidecho of your audio"
        assert "session closed: client_close" in done.stderr
        with wave.open(str(answer), "rb") as wav:
            assert (wav.getframerate(), wav.getnchannels(), wav.getsampwidth()) == (24000, 1, 2)
        assert pcm_of(answer) == pcm_of(question)
        assert bytes(upstream.connections[0].audio) == pcm_of(question)
        assert upstream.connections[0].invalid == []
        assert not any(leak in done.stderr for leak in LEAKS)


def test_realtime_cli_refuses_a_wav_it_cannot_send(tmp_path: Path) -> None:
    stereo = tmp_path / "stereo.wav"
    with wave.open(str(stereo), "wb") as wav:
        wav.setnchannels(2)
        wav.setsampwidth(2)
        wav.setframerate(44100)
        wav.writeframes(b"\0" * 400)
    config = tmp_path / "c.toml"
    config.write_text('[mqtt]\nhost = "127.0.0.1"\nport = 9\n')
    done = cli("realtime", "--config", str(config), str(stereo))
    assert done.returncode == 1
    assert "need 16-bit mono 24 kHz PCM" in done.stderr and "Traceback" not in done.stderr
