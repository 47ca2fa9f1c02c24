"""The structure the import-linter contracts cannot say: no module uses another module's private
names, and no two modules import each other, directly or through others."""

from __future__ import annotations

import ast
from pathlib import Path

import grimp
import pytest

from tests.test_packaging import product_packages

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = tuple(sorted(product_packages()))


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def _first_party(module: str) -> bool:
    return module.split(".")[0] in PACKAGES


def private_uses(path: Path) -> list[str]:
    """``from m import _x`` and ``m._x`` where ``m`` is another first-party module."""
    this = _module_name(path)
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found: list[str] = []
    modules: dict[str, str] = {}  # local name -> first-party module it is bound to
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if not _first_party(node.module) or node.module == this:
                continue
            for alias in node.names:
                if _private(alias.name):
                    found.append(f"{this}: from {node.module} import {alias.name}")
                else:
                    modules[alias.asname or alias.name] = f"{node.module}.{alias.name}"
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if _first_party(alias.name) and alias.asname:
                    modules[alias.asname] = alias.name
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Name)
            and node.value.id in modules
            and _private(node.attr)
            and modules[node.value.id] != this
        ):
            found.append(f"{this}: {modules[node.value.id]}.{node.attr}")
    return found


def test_no_module_uses_another_modules_private_names() -> None:
    found = [
        use
        for package in PACKAGES
        for path in sorted((ROOT / package).rglob("*.py"))
        for use in private_uses(path)
    ]
    assert found == []


def _cycles(graph: grimp.ImportGraph) -> list[list[str]]:
    """Strongly connected groups of more than one first-party module (Tarjan)."""
    modules = sorted(m for m in graph.modules if _first_party(m))
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[list[str]] = []

    def visit(start: str) -> None:
        # iterative Tarjan: (module, iterator over what it imports)
        work = [(start, iter(sorted(graph.find_modules_directly_imported_by(start))))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            module, targets = work[-1]
            for target in targets:
                if not _first_party(target):
                    continue
                if target not in index:
                    index[target] = low[target] = len(index)
                    stack.append(target)
                    on_stack.add(target)
                    work.append(
                        (target, iter(sorted(graph.find_modules_directly_imported_by(target))))
                    )
                    break
                if target in on_stack:
                    low[module] = min(low[module], index[target])
            else:
                work.pop()
                if work:
                    parent = work[-1][0]
                    low[parent] = min(low[parent], low[module])
                if low[module] == index[module]:
                    group = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        group.append(member)
                        if member == module:
                            break
                    if len(group) > 1:
                        groups.append(sorted(group))

    for module in modules:
        if module not in index:
            visit(module)
    return groups


@pytest.fixture(scope="module")
def graph() -> grimp.ImportGraph:
    return grimp.build_graph(*PACKAGES)


def test_no_import_cycles_between_modules(graph: grimp.ImportGraph) -> None:
    assert _cycles(graph) == []


def test_the_cycle_check_finds_a_cycle() -> None:
    graph = grimp.ImportGraph()
    for module in ("worker.a", "worker.b", "worker.c"):
        graph.add_module(module)
    graph.add_import(importer="worker.a", imported="worker.b")
    graph.add_import(importer="worker.b", imported="worker.c")
    graph.add_import(importer="worker.c", imported="worker.a")
    assert _cycles(graph) == [["worker.a", "worker.b", "worker.c"]]


#: the packages that run in the node and the workers (offline tools are not held to it)
RUNTIME = (
    *("d2r_core", "d2r_http", "studydb", "cli", "dicom_node", "delivery", "observability"),
    *("worker", "model", "report"),
)
#: lines a function body may take (its docstring not counted) without a reason beside it
SCREEN = 50
REASON = "# Longer than a screen:"


def long_functions_without_reason(path: Path, root: Path = ROOT) -> list[str]:
    """Functions of ``path`` longer than :data:`SCREEN` lines with no :data:`REASON` comment
    in the comment block above the ``def`` (or above its decorators)."""
    text = path.read_text(encoding="utf-8")
    lines = text.splitlines()
    found = []
    for node in ast.walk(ast.parse(text)):
        if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            continue
        first = node.body[0]
        docstring = isinstance(first, ast.Expr) and isinstance(
            getattr(first, "value", None), ast.Constant
        )
        start = first.end_lineno + 1 if docstring and first.end_lineno else first.lineno
        assert node.end_lineno is not None
        if node.end_lineno - start + 1 <= SCREEN:
            continue
        top = min([node.lineno, *(d.lineno for d in node.decorator_list)])
        comments = []  # the comment block right above the def (or its decorators)
        for line in reversed(lines[: top - 1]):
            if not line.strip().startswith("#"):
                break
            comments.append(line.strip())
        if not any(c.startswith(REASON) for c in comments):
            found.append(f"{path.relative_to(root)}:{node.lineno} {node.name}")
    return found


def test_no_runtime_function_is_longer_than_a_screen_without_a_reason() -> None:
    found = [
        entry
        for package in RUNTIME
        for path in sorted((ROOT / package).rglob("*.py"))
        if "migrations" not in path.parts
        for entry in long_functions_without_reason(path)
    ]
    assert found == []


def test_the_length_check_finds_a_long_function(tmp_path: Path) -> None:
    body = "\n".join(f"    x{i} = {i}" for i in range(SCREEN + 1))
    plain = tmp_path / "plain.py"
    plain.write_text(f"def f() -> None:\n{body}\n")
    explained = tmp_path / "explained.py"
    explained.write_text(f"{REASON} one table\ndef f() -> None:\n{body}\n")
    assert [e.split()[1] for e in long_functions_without_reason(plain, tmp_path)] == ["f"]
    assert long_functions_without_reason(explained, tmp_path) == []
