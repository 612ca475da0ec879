"""Strict JSON in and out: orjson on the fast path, the standard library for what orjson refuses."""

from __future__ import annotations

import json
import re
from typing import Any

import orjson


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


# orjson turns integers beyond 64 bits into floats; a run of 20+ digits sends the (small)
# document to the stdlib parser so that such numbers, e.g. a transaction id, survive exactly.
_LONG_NUMBER = re.compile(rb"\d{20}")
_EXACT_CHECK_LIMIT = 1 << 20


def loads(data: bytes) -> Any:
    """Parse JSON bytes (UTF-8); raise ValueError for anything that is not strict JSON."""
    if len(data) > _EXACT_CHECK_LIMIT or not _LONG_NUMBER.search(data):
        try:
            return orjson.loads(data)
        except orjson.JSONDecodeError as exc:
            raise ValueError(str(exc)) from None
    try:
        text = data.decode("utf-8")
        return json.loads(text, parse_constant=_reject_constant)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise ValueError(str(exc)) from None


def dumps(value: Any) -> bytes:
    """Compact JSON bytes for any value `loads` can return."""
    try:
        return orjson.dumps(value)
    except TypeError:
        return json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
