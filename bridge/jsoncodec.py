"""Strict JSON in and out: orjson on the fast path, the standard library for what orjson refuses."""

from __future__ import annotations

import json
import math
import re
from typing import Any

import orjson


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


# orjson turns integers beyond 64 bits into floats; a run of 20+ digits sends the (small)
# document to the stdlib parser so that such numbers, e.g. a transaction id, survive exactly.
_LONG_NUMBER = re.compile(rb"\d{20}")
_EXACT_CHECK_LIMIT = 1 << 20


def utf8_problem(exc: UnicodeDecodeError) -> str:
    """Where and why bytes are not UTF-8: `invalid UTF-8 at byte 14 (0xe9: invalid ...)`."""
    bad = exc.object[exc.start : exc.start + 1]
    return f"invalid UTF-8 at byte {exc.start} (0x{bad.hex()}: {exc.reason})"


def loads(data: bytes) -> Any:
    """Parse JSON bytes (UTF-8); raise ValueError for anything that is not strict JSON."""
    if len(data) > _EXACT_CHECK_LIMIT or not _LONG_NUMBER.search(data):
        try:
            return orjson.loads(data)
        except orjson.JSONDecodeError as exc:
            # orjson reports any invalid UTF-8 as "surrogates not allowed" at char 0.
            if "not valid UTF-8" in str(exc):
                try:
                    str(data, "utf-8")
                except UnicodeDecodeError as bad:
                    raise ValueError(utf8_problem(bad)) from None
            raise ValueError(str(exc)) from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(utf8_problem(exc)) from None
    return loads_text(text)


# A \uD800-\uDFFF escape; only then can the standard library's result hold a lone surrogate.
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


def loads_text(text: str) -> Any:
    """Parse JSON text as strictly as `loads`, with integers of any size exact.

    orjson copies its whole input before it parses; the standard library does not, which is what
    a payload of tens of MiB needs (the caller drops the bytes once it holds the text).
    """
    try:
        value = json.loads(text, parse_constant=_reject_constant, parse_float=_finite_float)
    except (ValueError, RecursionError) as exc:
        raise ValueError(str(exc)) from None
    if _SURROGATE_ESCAPE.search(text) is not None and _holds_lone_surrogate(value):
        raise ValueError("a \\u escape encodes a lone surrogate, which is not valid Unicode")
    return value


def _finite_float(literal: str) -> float:
    number = float(literal)
    if math.isinf(number):  # orjson refuses 1e400 too; it would be sent on as Infinity
        raise ValueError(f"number {literal[:40]} is out of range")
    return number


def _holds_lone_surrogate(value: Any) -> bool:
    pending = [value]
    while pending:
        item = pending.pop()
        if isinstance(item, str):
            if not _encodable(item):
                return True
        elif isinstance(item, dict):
            pending.extend(item.keys())
            pending.extend(item.values())
        elif isinstance(item, list):
            pending.extend(item)
    return False


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def dumps(value: Any) -> bytes:
    """Compact JSON bytes for any value `loads` can return."""
    try:
        return orjson.dumps(value)
    except TypeError:
        return json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
