"""Process-wide start-up steps, each made once per process: allocator, collector, library shims.

The allocator: glibc serves big allocations with mmap and returns them on free, but each such free
also raises its mmap threshold (up to 32 MiB), so after the first large request the next 25-33 MiB
buffers come from the heap, where freed space is kept and fragments. Measured with four 25 MiB
uploads in a row: peak +70, +84, +91, +91 MiB over idle with glibc's default, +68 each time with the
threshold pinned at 1 MiB (tests/system/test_files_streams.py sends three and checks the bound).
"""

from __future__ import annotations

import gc
import os
from collections.abc import Mapping

from bridge.compat import shims

MMAP_THRESHOLD = 1 << 20
"""Allocations from this size on always get their own mapping, unmapped when freed."""

_M_MMAP_THRESHOLD = -3  # from <malloc.h>

GC_YOUNG_THRESHOLD = 10_000
"""Allocations between young garbage collections (CPython's default: 700)."""


def pin_mmap_threshold(environ: Mapping[str, str] = os.environ) -> bool:
    """Pin glibc's mmap threshold at MMAP_THRESHOLD; False if not glibc or the operator set one."""
    if "MALLOC_MMAP_THRESHOLD_" in environ:
        return False
    try:
        libc = os.confstr("CS_GNU_LIBC_VERSION") or ""
    except (ValueError, OSError):
        return False
    if not libc.startswith("glibc"):
        return False
    import ctypes  # only here: 5 ms of import that only glibc systems need

    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # e.g. a statically linked interpreter
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD))


def prepare_bridge() -> list[str]:
    """Steps for a process that serves requests: the collector and the shims; shims left off.

    The shims are those of the libraries loaded (the transports import their compat module).
    """
    # With many requests in flight every young collection walks all of their live objects;
    # CPython's 700 ran one every ~15 requests at C = 128 (bench/README.md, issue 17).
    gc.set_threshold(GC_YOUNG_THRESHOLD, *gc.get_threshold()[1:])
    return shims.install()


def prepare_supervisor() -> list[str]:
    """Steps for the workers' supervisor (its MQTT connection's shims); shims left off."""
    return shims.install()
