"""The package's layers (pyproject's import-linter contracts) and no import cycles, lazy or not."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import grimp

REPO = Path(__file__).resolve().parents[2]


def test_no_module_imports_itself_back() -> None:
    """No cycle among bridge's modules, counting imports inside functions and TYPE_CHECKING."""
    graph = grimp.build_graph("bridge")
    cycles = sorted(
        (module, imported)
        for module in graph.modules
        for imported in graph.find_modules_directly_imported_by(module)
        if graph.chain_exists(importer=imported, imported=module)
    )
    assert cycles == []


def test_the_layer_contracts_hold() -> None:
    lint = Path(sys.executable).with_name("lint-imports")
    out = subprocess.run(
        [str(lint), "--no-cache"], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "0 broken" in out.stdout


def test_the_supervisor_and_call_load_neither_aiohttp_nor_the_http_transport() -> None:
    code = (
        "import sys, bridge.runtime.supervisor, bridge.cli.call\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'aiohttp'"
        " or m.startswith('bridge.service')))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
