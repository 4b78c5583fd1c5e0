"""No import circles, and no imports hidden inside functions to dodge one.

The graph is read from the source (ast), not from a running interpreter: an edge A -> B for every
`import`/`from ... import` of a moeify module B in module A. Module-level edges must form no cycle. An import
inside a function (lazy: the CLI, ONNX export and torch.distributed load on first use) must not close a
cycle either: that would be a circle hidden from the import system. Not counted: imports under
`if TYPE_CHECKING:` (annotations only, never run) and a module's own ancestor packages (Python imports them
first anyway); `moeify.deprecation.moved` imports the new home of a moved name by name, when the old name is
first used.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
ROOTS = {"moeify": REPO / "moeify", "moeify.passes": REPO / "passes"}  # package -> folder (pyproject's map)


def _modules() -> dict[str, Path]:
    mods = {}
    for package, folder in ROOTS.items():
        for file in folder.rglob("*.py"):
            parts = [p for p in file.relative_to(folder).with_suffix("").parts if p != "__init__"]
            mods[".".join([package, *parts])] = file
    return mods


MODULES = _modules()


def _resolve(name: str) -> str | None:
    """The moeify module `name` lives in (a name imported from a module resolves to the module)."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def _imports(module: str) -> tuple[set[str], set[str]]:
    """(module-level, function-level) moeify modules `module` imports."""
    top, late = set(), set()

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                visit(ast.Module(body=child.orelse, type_ignores=[]), in_function)
                continue
            nested = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))
            names = []
            if isinstance(child, ast.Import):
                names = [a.name for a in child.names]
            elif isinstance(child, ast.ImportFrom) and child.module and child.level == 0:
                subs = [f"{child.module}.{a.name}" for a in child.names
                        if f"{child.module}.{a.name}" in MODULES]
                names = subs if len(subs) == len(child.names) else [*subs, child.module]
            for name in names:
                target = _resolve(name)
                if target is None or target == module:
                    continue
                if nested:
                    late.add(target)
                elif not module.startswith(target + "."):  # ancestors are imported first anyway
                    top.add(target)
            visit(child, nested)

    visit(ast.parse(MODULES[module].read_text()), False)
    return top, late


GRAPH = {m: _imports(m) for m in MODULES}


def _path(start: str, goal: str) -> list[str] | None:
    """A chain of module-level imports from start to goal, or None."""
    seen, stack = set(), [[start]]
    while stack:
        chain = stack.pop()
        if chain[-1] == goal:
            return chain
        if chain[-1] in seen:
            continue
        seen.add(chain[-1])
        stack.extend(chain + [nxt] for nxt in sorted(GRAPH[chain[-1]][0]))
    return None


def test_the_graph_sees_the_package():
    assert len(MODULES) > 50 and "moeify.passes.analyse" in MODULES and "moeify.config" in MODULES
    top, _ = GRAPH["moeify.layer"]
    assert {"moeify.config", "moeify.routers"} <= top  # the reader finds real edges
    assert "moeify" in GRAPH["moeify.cli.convert"][1]  # the CLI loads moeify lazily, inside its commands


def test_module_level_imports_form_no_cycle():
    cycles = [" -> ".join([m, *chain]) for m in MODULES for nxt in GRAPH[m][0]
              if (chain := _path(nxt, m)) is not None]
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_no_import_inside_a_function_closes_a_cycle():
    dodges = [f"{m} imports {nxt} late; {' -> '.join(chain)}" for m in MODULES for nxt in sorted(GRAPH[m][1])
              if (chain := _path(nxt, m)) is not None]
    assert not dodges, "late imports that hide a cycle:\n" + "\n".join(dodges)


@pytest.mark.slow
def test_every_module_imports_in_a_fresh_interpreter():
    """Every module imports (in module order, one fresh interpreter), and none uses a deprecated path."""
    code = ("import importlib, sys\n"
            f"for name in {sorted(MODULES)!r}:\n"
            "    importlib.import_module(name)\n")
    done = subprocess.run([sys.executable, "-W", "error::DeprecationWarning:moeify", "-c", code], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
