"""Secrets in the config's own output, form field names, and the journal's file modes."""

from __future__ import annotations

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
from bridge.redact import Redactor

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


async def test_the_journal_is_private_whatever_the_umask(tmp_path: Path) -> None:
    folder = tmp_path / "state" / "omb"
    old = os.umask(0)
    try:
        journal = Journal.open(
            folder / "journal.sqlite3",
            scope="answers",
            max_bytes=1 << 20,
            max_age=60.0,
            max_answer_bytes=1024,
            synchronous="full",
            log=RecordingLog(),
        )
        assert journal is not None
        assert await journal.record_answer(b"k" * 32, "a/b", b'{"ok": 1}')
        files = sorted(folder.iterdir())
        assert [p.name for p in files] == [
            "journal.sqlite3",
            "journal.sqlite3-shm",
            "journal.sqlite3-wal",
        ]
        assert stat.S_IMODE(folder.stat().st_mode) == 0o700
        for path in files:
            assert stat.S_IMODE(path.stat().st_mode) == 0o600, path.name
        await journal.close()
    finally:
        os.umask(old)
