"""The code's shape, as DESIGN.md states it: no import circles, the policies on torch
alone, the loop free of Ray and MLflow, no private name imported across modules.

Imports are read with ``ast`` (nothing is imported). Imports under ``if TYPE_CHECKING:``
never run and only name types, so they are not edges; imports inside functions run and
are.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
PACKAGES = ("tune_alr", "trainables")


def _module(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(path: Path) -> list[tuple[str, list[str]]]:
    """``(module, names)`` of every import that runs, resolved to absolute names."""
    module = _module(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    out: list[tuple[str, list[str]]] = []

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            out.extend((alias.name, []) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package
            for _ in range(max(0, node.level - 1)):
                base = base.rpartition(".")[0]
            target = node.module or ""
            if node.level:
                target = f"{base}.{target}" if target else base
            out.append((target, [alias.name for alias in node.names]))
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text()))
    return out


def _sources() -> dict[str, Path]:
    return {_module(p): p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))}


def _graph() -> dict[str, set[str]]:
    modules = _sources()
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for name, path in modules.items():
        for target, names in _imports(path):
            # ``from . import tracking`` names a module; ``from .x import y`` the module x
            candidates = [f"{target}.{n}" for n in names] + [target]
            for candidate in candidates:
                if candidate in modules and candidate != name:
                    graph[name].add(candidate)
                    break
    return graph


def test_no_import_circles() -> None:
    graph = _graph()
    # package __init__ files only re-export (lazily, for tune_alr), so they are leaves here
    edges = {m: {t for t in ts if t not in PACKAGES} for m, ts in graph.items()}
    state: dict[str, int] = {}
    stack: list[str] = []
    circles: list[list[str]] = []

    def walk(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges[node]):
            if state.get(nxt) == 1:
                circles.append([*stack[stack.index(nxt) :], nxt])
            elif nxt not in state:
                walk(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            walk(node)
    assert circles == []


@pytest.mark.parametrize("path", sorted((ROOT / "tune_alr" / "policies").glob("*.py")))
def test_the_policies_import_torch_numpy_and_the_standard_library_only(path: Path) -> None:
    import sys

    allowed = {"torch", "numpy", "tune_alr"}
    for target, _ in _imports(path):
        top = target.split(".")[0]
        assert top in allowed or top in sys.stdlib_module_names, f"{path.name} imports {target}"
        if top == "tune_alr":
            assert target.startswith("tune_alr.policies"), f"{path.name} imports {target}"


def test_the_loop_and_the_data_never_import_ray_or_mlflow() -> None:
    for path in sorted((ROOT / "trainables").glob("*.py")):
        if path.name == "ray_trainable.py":
            continue  # the adapter: the one module that imports Ray
        for target, _ in _imports(path):
            assert target.split(".")[0] not in {"ray", "mlflow"}, f"{path.name}: {target}"


def test_no_private_name_is_imported_across_modules() -> None:
    for name, path in _sources().items():
        for target, names in _imports(path):
            if target.split(".")[0] in PACKAGES:
                private = [n for n in names if n.startswith("_") and n != "__version__"]
                assert not private, f"{name} imports {private} from {target}"
