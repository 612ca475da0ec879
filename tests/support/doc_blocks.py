"""Fenced blocks of a doc page picked by a marker, so a test runs exactly what the page shows.

A page marks a block with an HTML comment on the line before its fence (invisible when
rendered):

    <!-- recipe: zigbee2mqtt -->
    ```toml
    ...
    ```
"""

from __future__ import annotations

import re
from pathlib import Path

__all__ = ["DOCS", "marked_block", "markers"]

DOCS = Path(__file__).resolve().parents[2] / "docs"
_BLOCK = re.compile(r"<!-- recipe: ([\w.-]+) -->\n```(\w*)\n(.*?)\n```", re.S)


def markers(page: str | Path) -> dict[str, tuple[str, str]]:
    """Every marked block of `page` (a file under docs/, or a path): name -> (language, text)."""
    path = page if isinstance(page, Path) else DOCS / page
    found: dict[str, tuple[str, str]] = {}
    for name, language, text in _BLOCK.findall(path.read_text(encoding="utf-8")):
        if name in found:
            raise ValueError(f"{path.name}: the marker {name!r} is used twice")
        found[name] = (language, text + "\n")
    return found


def marked_block(page: str | Path, name: str, language: str | None = None) -> str:
    """The text of the block marked `name` in `page`; KeyError names the markers there are."""
    blocks = markers(page)
    if name not in blocks:
        raise KeyError(f"no block marked {name!r} in {page}; marked: {sorted(blocks)}")
    found_language, text = blocks[name]
    if language is not None and found_language != language:
        raise ValueError(f"block {name!r} is ```{found_language}, not ```{language}")
    return text
