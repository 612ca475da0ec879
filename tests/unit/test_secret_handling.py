"""Secrets in the config's own output, form field names, and the journal's file modes."""

from __future__ import annotations

import base64
import json
import os
import stat
from pathlib import Path

import pytest
from support.fakes import RecordingLog

from bridge.config import BridgeConfig
from bridge.errors import InvalidParameter
from bridge.journal.sqlite import Journal
from bridge.methods.catalog import default_table
from bridge.pipeline.multipart import encode_form
from bridge.redact import MIN_PIECE, Redactor, StreamScrubber

CONFIG = BridgeConfig.model_validate(
    {
        "service": {
            "api_base": "https://gateway-user:gw-pass-71c3d9@gateway.example/v1",
            "api_key": "sk-config-secret-1234",
            "extra_headers": {"X-Gateway-Token": "gw-token-aa11bb22cc"},
        }
    }
)


def test_extra_headers_and_the_api_base_password_are_secrets() -> None:
    assert {"gw-token-aa11bb22cc", "gw-pass-71c3d9", "sk-config-secret-1234"} <= set(
        CONFIG.secrets()
    )
    shown = json.dumps(CONFIG.redacted())
    for secret in CONFIG.secrets():
        assert secret not in shown
    assert "https://gateway-user:**********@gateway.example/v1" in shown
    assert '"X-Gateway-Token": "**********"' in shown


def test_the_log_redactor_hides_a_cut_key_at_either_end() -> None:
    redactor = Redactor(CONFIG.secrets())
    key = "sk-config-secret-1234"
    assert redactor.text(f"topic=a/{key[:12]}") == "topic=a/**********"
    assert redactor.text(f"{key[6:]} rest") == "********** rest"
    assert redactor.text("sk-conf") == "sk-conf"  # shorter than a piece: ordinary text


@pytest.mark.parametrize("name", ["purpose\r\nX-Injected: 1", 'purpose"; filename="x', "p\x00"])
def test_a_form_field_name_with_control_characters_is_a_validation_error(name: str) -> None:
    op = default_table().find("createFile")
    assert op is not None
    with pytest.raises(InvalidParameter, match="control character or a quote"):
        encode_form(op, {"file": "aGVsbG8=", name: "assistants"})


def _open_journal(path: Path) -> Journal | None:
    return Journal.open(
        path,
        scope="answers",
        max_bytes=1 << 20,
        max_age=60.0,
        max_answer_bytes=1024,
        synchronous="full",
        log=RecordingLog(),
    )


async def test_the_journal_is_private_whatever_the_umask(tmp_path: Path) -> None:
    folder = tmp_path / "state" / "omb"
    old = os.umask(0)
    try:
        journal = _open_journal(folder / "journal.sqlite3")
        assert journal is not None
        assert await journal.record_answer(b"k" * 32, "a/b", b'{"ok": 1}')
        files = sorted(folder.iterdir())
        assert [p.name for p in files] == [
            "journal.sqlite3",
            "journal.sqlite3-shm",
            "journal.sqlite3-wal",
        ]
        assert stat.S_IMODE(folder.stat().st_mode) == 0o700
        assert stat.S_IMODE(folder.parent.stat().st_mode) == 0o700  # made on the way
        for path in files:
            assert stat.S_IMODE(path.stat().st_mode) == 0o600, path.name
        await journal.close()
    finally:
        os.umask(old)


def _scrub_stream(pieces: list[str]) -> list[str]:
    scrubber = StreamScrubber(Redactor(CONFIG.secrets()))
    out = []
    for piece in pieces:
        event = scrubber.any({"choices": [{"delta": {"content": piece}}], "model": "m"})
        out.append(event["choices"][0]["delta"]["content"])
    return out


def test_a_key_streamed_a_character_at_a_time_is_masked_from_its_eighth() -> None:
    key = "sk-config-secret-1234"
    shown = _scrub_stream(["key ", *key, " end"])
    assert "".join(shown[:8]) == "key sk-conf"  # 7 characters: below a piece, ordinary text
    assert shown[8:-1] == ["**********"] * (len(key) - 7)
    assert shown[-1] == " end"


@pytest.mark.parametrize("cut", [1, 7, 8, 13, 20])
def test_a_key_in_two_events_shows_no_piece_of_eight(cut: int) -> None:
    key = "sk-config-secret-1234"
    first, second = _scrub_stream([f"a {key[:cut]}", f"{key[cut:]} b"])
    assert second.endswith(" b") and first.startswith("a ")
    joined = first + second
    assert not any(key[i : i + MIN_PIECE] in joined for i in range(len(key) - MIN_PIECE + 1))


def test_a_base64_key_split_over_events_is_masked_too() -> None:
    token = base64.b64encode(b"gw-token-aa11bb22cc").decode()
    first, second = _scrub_stream([token[:10], token[10:] + " ok"])
    assert first == "**********"  # 10 characters of the base64 form: a piece already
    assert token[10:] not in second and second.endswith(" ok")


def test_text_that_only_looks_like_a_key_passes_unchanged() -> None:
    pieces = ["sk-", "conf", " other text ", "secret", " 1234"]
    assert _scrub_stream(pieces) == pieces


def test_the_api_base_password_is_read_from_the_authority_alone_and_decoded() -> None:
    encoded = BridgeConfig.model_validate(
        {"service": {"api_base": "https://u:gw%40pass%2F71c3@gw.example:8443/v1/@x:y"}}
    )
    assert "gw@pass/71c3" in encoded.secrets()
    shown = encoded.redacted()["service"]["api_base"]
    assert shown == "https://u:**********@gw.example:8443/v1/@x:y"
    # The form written in the file (percent-encoded) is hidden in log lines too.
    assert Redactor(encoded.secrets()).text("base=gw%40pass%2F71c3@gw") == "base=**********@gw"
    at_in_path = BridgeConfig.model_validate(
        {"service": {"api_base": "https://gw.example/v1/@x:y"}}
    )
    assert at_in_path.secrets() == []
    assert at_in_path.redacted()["service"]["api_base"] == "https://gw.example/v1/@x:y"


async def test_a_journal_left_readable_by_others_is_made_private(tmp_path: Path) -> None:
    path = tmp_path / "journal.sqlite3"
    path.touch(mode=0o644)
    path.chmod(0o644)
    journal = _open_journal(path)
    assert journal is not None
    assert await journal.record_answer(b"k" * 32, "a/b", b'{"ok": 1}')
    await journal.close()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
