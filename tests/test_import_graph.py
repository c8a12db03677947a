"""vitlab's import graph points down: no module imports, even inside a function, a module that
imports it back (``if TYPE_CHECKING:`` blocks excepted), and no module takes another's private
name (``from .x import _helper``). Read from the source with ``ast``; nothing is imported."""
from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "vitlab"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _under_type_checking(tree: ast.AST) -> set[int]:
    """ids of the nodes inside ``if TYPE_CHECKING:`` blocks (imports for annotations only)."""
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If):
            test = node.test
            if getattr(test, "id", None) == "TYPE_CHECKING" or getattr(test, "attr", None) == "TYPE_CHECKING":
                skip.update(id(sub) for sub in ast.walk(node))
    return skip


def _owner(name: str) -> str | None:
    """The vitlab module a dotted name lives in (``vitlab.spec.ViTSpec`` -> ``vitlab.spec``)."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def _imports(module: str, path: Path) -> list[tuple[str, str | None]]:
    """``(imported module, private name taken from it or None)`` for every vitlab import."""
    tree = ast.parse(path.read_text(), str(path))
    skip, out = _under_type_checking(tree), []
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            out += [(_owner(a.name), None) for a in node.names if a.name.startswith("vitlab")]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(base + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            if not base.startswith("vitlab"):
                continue
            for a in node.names:
                target = _owner(f"{base}.{a.name}")
                private = a.name if target == base and a.name.startswith("_") and not a.name.startswith("__") else None
                out.append((target, private))
    return [(t, p) for t, p in out if t is not None and t != module]


GRAPH = {m: _imports(m, p) for m, p in MODULES.items()}


def _cycles() -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    edges = {m: {t for t, _ in deps} for m, deps in GRAPH.items()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in edges:
        if v not in index:
            visit(v)
    return found


def test_the_graph_is_read():
    # the walk sees function-level imports too: the CLI loads its commands inside functions
    assert "vitlab.spec" in {t for t, _ in GRAPH["vitlab.recipes"]}
    assert len(MODULES) > 50


def test_no_import_cycle():
    assert _cycles() == []


def test_no_private_name_taken_across_modules():
    taken = sorted(f"{m} takes {p} from {t}" for m, deps in GRAPH.items() for t, p in deps if p is not None)
    assert taken == []
