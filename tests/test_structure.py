"""The package's shape: no import circles among its modules, counting imports inside functions too."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parent.parent / "src" / "adaptune"


def _module_name(path: Path) -> str:
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """Module -> the adaptune modules it imports anywhere in its file (module level or in functions).

    ``from adaptune.x import y`` counts as an import of ``adaptune.x.y`` when that is a module, else
    of ``adaptune.x``. A package's ``__init__`` importing its own modules does not count (that is how
    a package re-exports), nor does a module importing the package it belongs to for a name, nor an
    import under ``if TYPE_CHECKING:`` (for annotations only; it never runs)."""
    files = {_module_name(p): p for p in SRC.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets: set[str] = set()
        tree = ast.parse(path.read_text(encoding="utf-8"))
        typing_only = {
            id(n)
            for block in ast.walk(tree)
            if isinstance(block, ast.If) and getattr(block.test, "id", None) == "TYPE_CHECKING"
            for stmt in block.body
            for n in ast.walk(stmt)
        }
        for node in ast.walk(tree):
            if id(node) in typing_only:
                continue
            if isinstance(node, ast.Import):
                targets.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(
                        package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else [])
                    )
                for alias in node.names:
                    targets.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in files else base)
        own = {t for t in targets if t in files and t != name}
        if path.name == "__init__.py":
            own = {t for t in own if not t.startswith(name + ".")}
        own = {t for t in own if not (name.startswith(t + ".") and files[t].name == "__init__.py")}
        graph[name] = own
    return graph


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_circle_finder_finds_a_circle():
    assert circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert circles({"a": {"b"}, "b": set()}) == []


def test_no_import_circles():
    found = circles(import_graph())
    assert found == [], "import circles: " + "; ".join(" <-> ".join(c) for c in found)


def test_no_function_over_80_lines():
    """Long units hide what they do: every function in src fits on a screen (docstring included)."""
    long = []
    for path in sorted(SRC.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= 80:
                long.append(f"{path.relative_to(SRC)}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1})")
    assert long == [], "functions over 80 lines: " + ", ".join(long)


def test_no_file_over_400_lines():
    big = [f"{p.relative_to(SRC)} ({n})" for p in sorted(SRC.rglob("*.py")) if (n := p.read_text().count("\n")) > 400]
    assert big == [], "files over 400 lines: " + ", ".join(big)


def _reaches_out(graph: dict[str, set[str]], inside: str, allowed: set[str]) -> list[str]:
    return sorted(
        f"{m} -> {t}"
        for m in graph
        if m.startswith(inside)
        for t in graph[m]
        if not t.startswith(inside) and t not in allowed
    )


def test_the_core_imports_no_backend_and_nothing_above_it():
    """The adapter core (adaptune.core) is pure PyTorch: it imports only itself and the two
    foundations (errors, env), at import time or in a function; the CPU backend (adaptune.cpu)
    registers with it through adaptune.core.backend, never the other way round."""
    graph = import_graph()
    wrong = _reaches_out(graph, "adaptune.core.", {"adaptune.errors", "adaptune.env"})
    assert wrong == [], "the core reaches out: " + ", ".join(wrong)
    assert any(m.startswith("adaptune.cpu.") for m in graph) and any(
        "adaptune.core.backend" in graph[m] for m in graph if m.startswith("adaptune.cpu.")
    )  # the backend is there and registers with the core


def test_the_cpu_backend_depends_only_on_the_core_and_foundations():
    graph = import_graph()
    wrong = _reaches_out(graph, "adaptune.cpu.", {"adaptune.errors", "adaptune.env", "adaptune.core.backend"})
    assert wrong == [], "the CPU backend reaches out: " + ", ".join(wrong)
