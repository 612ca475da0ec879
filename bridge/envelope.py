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


def ok_raw(method: str, transaction: Any, data_json: bytes) -> bytes:
    """A success envelope around `data_json`, already-valid JSON bytes (spliced, not re-encoded)."""
    return _head(b'"ok"', method, transaction) + b',"data":' + data_json + b"}"


def ok(method: str, transaction: Any, data: Any) -> bytes:
    """A success envelope around a JSON-serialisable value."""
    return ok_raw(method, transaction, dumps(data))


def error(method: str, transaction: Any, exc: BridgeError) -> bytes:
    """An error envelope rendering `exc` as the `error` object."""
    return _head(b'"error"', method, transaction) + b',"error":' + dumps(exc.to_dict()) + b"}"


MISSING = _MISSING
