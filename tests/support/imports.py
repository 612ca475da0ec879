"""What importing a module drags in, measured in a fresh interpreter."""

from __future__ import annotations

import subprocess
import sys


def top_level_packages_after(statement: str) -> set[str]:
    """The top-level packages in `sys.modules` after running `statement` in a fresh Python."""
    report = "print(' '.join({m.split('.')[0] for m in sys.modules}))"
    code = f"import sys\n{statement}\n{report}"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return set(out.stdout.split())
