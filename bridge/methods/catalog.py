"""The default method table: every generated operation plus `callEndpoint`, built once."""

from __future__ import annotations

import functools

from bridge.methods.endpoint import CALL_ENDPOINT
from bridge.methods.model import MethodTable
from bridge.methods.table import OPERATIONS


@functools.cache
def default_table() -> MethodTable:
    """The generated table of every operation, built once per process."""
    return MethodTable(OPERATIONS, extra=(CALL_ENDPOINT,))
