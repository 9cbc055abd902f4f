"""The engine's layout kept true: no import cycle in worker/engine, no pass importing another pass, no long
function in worker/. Read from the source (ast), so an import inside a function counts as much as one at the top;
only imports under `if TYPE_CHECKING:` (never run) are left out."""

from __future__ import annotations

import ast
from pathlib import Path

from testing.stack import ROOT

ENGINE = Path(ROOT, "worker", "engine")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in ENGINE.rglob("*.py")}


def _imported(path: Path) -> set[str]:
    """The engine modules `path` imports (`from pkg import sub` counts as importing pkg.sub when that is one)."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                continue
            if isinstance(child, ast.Import):
                found.update(a.name for a in child.names)
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    parents = package.split(".")[: len(package.split(".")) - (child.level - 1)]
                    base = ".".join(parents + ([child.module] if child.module else []))
                found.update(f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in child.names)
            visit(child)

    visit(ast.parse(path.read_text(encoding="utf-8")))
    return {m for m in found if m in MODULES and m != name}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), each a cycle or several."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in graph:
        if v not in index:
            connect(v)
    return found


def test_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_the_engine_has_no_import_cycle():
    graph = {name: _imported(path) for name, path in MODULES.items()}
    assert graph["worker.engine.shared.training"] >= {"worker.engine.shared.selection"}  # the finder sees imports
    assert _cycles(graph) == []


def _pass_of(module: str, passes: set[str]) -> str | None:
    """The pass module (or package) `module` belongs to."""
    return next((p for p in passes if module == p or module.startswith(p + ".")), None)


def test_no_pass_imports_another_pass():
    from worker.engine.passes import PASSES

    passes = {cls.__module__ for cls in PASSES.values()}
    assert "worker.engine.passes.quantize" in passes and "worker.engine.passes.prune" in passes
    offenders = []
    for name, path in MODULES.items():
        own = _pass_of(name, passes)
        if own is None:
            continue
        for imported in _imported(path):
            other = _pass_of(imported, passes)
            if other is not None and other != own:
                offenders.append(f"{name} imports {imported}")
    assert offenders == []


def test_shared_helpers_import_no_pass():
    shared = [n for n in MODULES if n.startswith("worker.engine.shared")]
    assert "worker.engine.shared.data" in shared
    reaching = {n: sorted(m for m in _imported(MODULES[n]) if m.startswith("worker.engine.passes")) for n in shared}
    assert all(not m for m in reaching.values()), reaching
