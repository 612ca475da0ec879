"""docs/protocol.md's table of error codes is the code's: every wire code, with its retryability."""

from __future__ import annotations

import re
from pathlib import Path

from bridge.errors import ERROR_CODES

PROTOCOL = Path(__file__).resolve().parents[2] / "docs" / "protocol.md"


def test_every_error_code_is_in_the_protocol_table_and_nothing_else() -> None:
    text = PROTOCOL.read_text()
    section = text[text.index("\n## Error codes") :]
    section = section[: section.index("\n## ", 5)]
    rows = re.findall(r"^\| `([a-z_0-9]+)` \| (yes|no|only [^|]+) \|", section, re.M)
    documented = {code: retryable for code, retryable in rows}
    assert sorted(documented) == sorted(ERROR_CODES)
    for code, cls in ERROR_CODES.items():
        if documented[code] in ("yes", "no"):
            assert (documented[code] == "yes") is cls.retryable, code
