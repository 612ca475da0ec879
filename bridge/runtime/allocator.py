"""Give the memory of large requests back to the system: one glibc setting, made at start-up.

glibc serves big allocations with mmap and returns them on free, but each such free also raises
its mmap threshold (up to 32 MiB), so after the first large request the next 25-33 MiB buffers
come from the heap, where freed space is kept and fragments. Measured with four 25 MiB uploads
in a row: peak +70, +84, +91, +91 MiB over idle with glibc's default, +68 each time with the
threshold pinned at 1 MiB (tests/test_files_streams.py sends three and checks the bound).
"""

from __future__ import annotations

import os
from collections.abc import Mapping

MMAP_THRESHOLD = 1 << 20
"""Allocations from this size on always get their own mapping, unmapped when freed."""

_M_MMAP_THRESHOLD = -3  # from <malloc.h>


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
