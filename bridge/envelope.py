"""The one reply envelope, `{"status", "method", "transaction"?, "data" | "error"}`, as bytes."""

from __future__ import annotations

from typing import Any

from bridge.errors import BridgeError
from bridge.jsoncodec import dumps

_MISSING: Any = object()
"""Marks a request without a `transaction` key (null is a valid transaction)."""


def _head(status: bytes, method: str, transaction: Any) -> bytes:
    head = b'{"status":' + status + b',"method":' + dumps(method)
    if transaction is not _MISSING:
        head += b',"transaction":' + dumps(transaction)
    return head


def ok_raw(method: str, transaction: Any, data_json: bytes | list[bytes]) -> bytes:
    """A success envelope around already-valid JSON (bytes or fragments), spliced in one copy."""
    parts = [_head(b'"ok"', method, transaction), b',"data":']
    if isinstance(data_json, bytes):
        parts.append(data_json)
    else:
        parts.extend(data_json)
    parts.append(b"}")
    return b"".join(parts)


def ok(method: str, transaction: Any, data: Any) -> bytes:
    """A success envelope around a JSON-serialisable value."""
    return ok_raw(method, transaction, dumps(data))


def error(method: str, transaction: Any, exc: BridgeError) -> bytes:
    """An error envelope rendering `exc` as the `error` object."""
    return _head(b'"error"', method, transaction) + b',"error":' + dumps(exc.to_dict()) + b"}"


MISSING = _MISSING
