"""No import cycles among bridge's modules, lazy or not (the layer contracts themselves:
tests/system/test_process_checks.py and `lint-imports` in ./test.sh)."""

from __future__ import annotations

import grimp


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
