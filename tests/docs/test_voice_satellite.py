"""docs/small-devices.md's MicroPython voice satellite, run as written against a real bridge."""

from __future__ import annotations

import contextlib
import io
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from support.broker import MosquittoBroker
from support.realtime_standin import RealtimeStandin, pcm_of, wav_file
from support.small_device import umqtt_simple_module

DOC = (Path(__file__).resolve().parents[2] / "docs" / "small-devices.md").read_text()


def test_the_voice_satellite_streams_a_wav_and_writes_the_answer(
    start_bridge: Callable[..., Any],
    own_mosquitto: MosquittoBroker,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    start = DOC.index("## MicroPython voice satellite")
    match = re.compile(r"```python\n(.*?)```", re.S).search(DOC, start)
    assert match is not None
    with RealtimeStandin() as upstream:
        start_bridge(api_base=upstream.url, prefix="openai", broker_port=own_mosquitto.port)
        question = wav_file(tmp_path / "question.wav", 0.6)
        shim = umqtt_simple_module({"192.168.1.10": ("127.0.0.1", own_mosquitto.port)})
        package = type(sys)("umqtt")
        package.simple = shim  # type: ignore[attr-defined]
        monkeypatch.setitem(sys.modules, "umqtt", package)
        monkeypatch.setitem(sys.modules, "umqtt.simple", shim)
        monkeypatch.chdir(tmp_path)
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            exec(compile(match.group(1), "small-devices.md", "exec"), {"__name__": "__main__"})
        assert out.getvalue() == "you saidecho of your audio"
        assert (tmp_path / "answer.pcm").read_bytes() == pcm_of(question)
        conn = upstream.connections[0]
        assert bytes(conn.audio) == pcm_of(question) and conn.invalid == []
        upstream.wait_for(lambda conns: conns[0].closed_by_client)
