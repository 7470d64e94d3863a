"""The import graph of src/tuneforge has no cycles, counting imports inside functions too.

A cycle hidden in a function-level import still ties the two modules together (neither can be
understood, tested or moved without the other), so every `import` statement anywhere in a
module counts. Dependencies point one way: cli -> train -> (parallel, data, model) -> config/errors.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "src" / "tuneforge"


def module_name(path: Path, root: Path = PACKAGE) -> str:
    parts = path.relative_to(root.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph(root: Path = PACKAGE) -> dict[str, set[str]]:
    """module -> the tuneforge modules it imports (anywhere in its body)."""
    files = {module_name(p, root): p for p in root.rglob("*.py")}
    graph: dict[str, set[str]] = {name: set() for name in files}
    for name, path in files.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            targets = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                    base = ".".join(anchor + ([base] if base else []))
                targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in files else base for alias in node.names]
            for target in targets:
                while target and target not in files:  # `import tuneforge.a.b` -> the deepest module that exists
                    target = target.rpartition(".")[0]
                if target and target != name and target.startswith("tuneforge") and target != "tuneforge":
                    if files[target].name != "__init__.py" or files[target].read_text().strip().count("\n") > 1:
                        graph[name].add(target)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_the_package_has_no_import_cycles():
    graph = import_graph()
    assert len(graph) > 50 and graph["tuneforge.cli"]  # the walk found the modules and their imports
    found = cycles(graph)
    assert not found, "import cycles (function-level imports count):\n" + "\n".join(
        "  " + " <-> ".join(c) + "\n    " + "; ".join(f"{a} -> {b}" for a in c for b in sorted(graph[a]) if b in c)
        for c in found)


def test_the_checker_finds_a_function_level_cycle(tmp_path):
    pkg = tmp_path / "tuneforge"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from tuneforge.sub import b\n")
    (pkg / "sub" / "b.py").write_text("def f():\n    from ..c import g\n")
    (pkg / "c.py").write_text("def g():\n    import tuneforge.a\n")
    (pkg / "d.py").write_text("from tuneforge import a\n")
    graph = import_graph(pkg)
    assert graph["tuneforge.sub.b"] == {"tuneforge.c"} and graph["tuneforge.d"] == {"tuneforge.a"}
    assert cycles(graph) == [["tuneforge.a", "tuneforge.c", "tuneforge.sub.b"]]
