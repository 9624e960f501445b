"""finetune/ has no import cycles: every module imports on its own, in a fresh interpreter.

A cycle often hides when the modules happen to be imported in a lucky order (the test suite, train.py);
importing each module first, alone, is the order that exposes it. The static check below names the
cycle itself, without starting an interpreter per module.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PACKAGE = REPO / "finetune"


def _module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = sorted(_module_name(p) for p in PACKAGE.rglob("*.py"))


def _runtime_imports(path: Path) -> set[str]:
    """The finetune modules ``path`` imports when it is imported (``if TYPE_CHECKING:`` blocks and
    imports inside functions excluded)."""
    found: set[str] = set()
    for node in ast.parse(path.read_text(encoding="utf-8")).body:
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return {name for name in found if name in MODULES}


def test_the_import_graph_of_finetune_has_no_cycle():
    graph = {_module_name(p): _runtime_imports(p) for p in PACKAGE.rglob("*.py")}
    state: dict[str, str] = {}

    def visit(module: str, path: list[str]) -> None:
        if state.get(module) == "done":
            return
        if state.get(module) == "open":
            cycle = path[path.index(module):] + [module]
            pytest.fail("import cycle: " + " -> ".join(cycle))
        state[module] = "open"
        for imported in sorted(graph[module]):
            visit(imported, [*path, module])
        state[module] = "done"

    for module in sorted(graph):
        visit(module, [])


@pytest.mark.slow
def test_every_finetune_module_imports_alone_in_a_fresh_interpreter():
    failures = []
    for module in MODULES:
        proc = subprocess.run([sys.executable, "-c", f"import {module}"], cwd=REPO, capture_output=True,
                              text=True, timeout=120)
        if proc.returncode != 0:
            failures.append(f"{module}: {proc.stderr.strip().splitlines()[-1]}")
    assert not failures, "\n".join(failures)
