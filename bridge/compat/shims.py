"""The registry of shims: guarded uses of library internals, switched on at start-up if they fit.

`bridge/compat/paho.py` and `bridge/compat/aiohttp.py` register theirs when imported; `install()`
checks every registered shim against the installed library (bridge/runtime/startup.py calls it).
"""

from __future__ import annotations

import importlib.metadata
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(slots=True)
class Shim:
    """One guarded use of a library internal."""

    name: str
    library: str
    written_for: str
    """The library version the internals were read in."""
    check: Callable[[], bool]
    """Whether the installed library has the internals the shim relies on."""
    apply: Callable[[bool], None] | None = None
    """Switches the shim's patch on or off (None: the callers check `active` themselves)."""
    active: bool = False


def _version(distribution: str) -> str:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


SHIMS: dict[str, Shim] = {}
"""Every registered shim by name."""


def register(*shims: Shim) -> None:
    """Add shims to the registry (at import of their module)."""
    for shim in shims:
        SHIMS[shim.name] = shim


def install() -> list[str]:
    """Check every registered shim against the installed libraries, switch on those that fit.

    Idempotent; call once at start-up. Returns "<shim> (<library> <version>)" for each shim left
    off, whose library behaviour is used instead.
    """
    off: list[str] = []
    for shim in SHIMS.values():
        try:
            shim.active = shim.check()
        except Exception:  # noqa: BLE001  (any surprise in a library's internals means: off)
            shim.active = False
        if not shim.active:
            off.append(f"{shim.name} ({shim.library} {_version(shim.library)})")
        if shim.apply is not None:
            shim.apply(shim.active)
    return off


def uninstall() -> None:
    """Switch every shim off: the libraries' own behaviour everywhere (tests of the fallbacks)."""
    for shim in SHIMS.values():
        shim.active = False
        if shim.apply is not None:
            shim.apply(False)
