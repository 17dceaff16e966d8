"""The layout of src/, read from the source with ``ast``: imports go down the stages, never back up.

A job enters ``prepare``, then ``run``, then ``finish``, and never climbs back to a stage it left
(shared/STYLE.md, "A layout that shows the architecture"). Each module of src/ belongs to one layer,
in this order; a module may import its own layer and the ones before it, never one after:

    errors, settings, storage, schema, models, prompts, adapters, prepare, run, finish, concurrency, local, docs

``src/__init__.py`` (the version) is below them all. Besides: no cycle between modules at import
time, nothing in src/ imports ``handler``, ``bench`` or ``builder``, the request and settings models
import nothing of ours, and no class is over 250 lines nor any function over 60 unless a comment
says why it cannot be split.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SRC = ROOT / "src"
LAYERS = (
    "errors",
    "settings",
    "storage",
    "schema",
    "models",
    "prompts",
    "adapters",
    "prepare",
    "run",
    "finish",
    "concurrency",
    "local",
    "docs",
)
# Ours, but never for src/ to import: they use src/, not the reverse.
OUTSIDE = ("handler", "bench", "builder")
# Layers that import nothing of ours: the request and settings models.
SELF_CONTAINED = ("schema", "settings")
MAX_CLASS_LINES = 250
MAX_FUNCTION_LINES = 60
EXCUSE = "cannot be split"


@dataclass(frozen=True)
class Import:
    """One import in a module of src/: the module it names, where, and whether it runs at import time."""

    target: str
    line: int
    # False for an import inside a function: it runs when the function is called, not when the module loads.
    at_load: bool


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    """Every module of src/, by dotted name (a package by its own name, for its ``__init__.py``)."""
    return {module_name(path): path for path in sorted(SRC.rglob("*.py"))}


def layer(module: str) -> int:
    """The module's place in ``LAYERS``; -1 for ``src`` itself, which every layer may import."""
    if module == "src":
        return -1
    return LAYERS.index(module.split(".")[1])


def _resolved(node: ast.ImportFrom, module: str, is_package: bool) -> str:
    """The absolute name of the module ``from ... import`` reads from, relative imports included."""
    if not node.level:
        return node.module or ""
    package = module.split(".") if is_package else module.split(".")[:-1]
    base = package[: len(package) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def imports(module: str, path: Path, known: dict[str, Path]) -> list[Import]:
    """What ``module`` imports, at module level (``if TYPE_CHECKING:`` and class bodies included) and in functions.

    ``from a import b`` names the module ``a.b`` when that is a module of src/, else ``a``.
    """
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    found: list[Import] = []

    def visit(node: ast.AST, at_load: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.Import):
                found.extend(Import(alias.name, child.lineno, at_load) for alias in child.names)
            elif isinstance(child, ast.ImportFrom):
                source = _resolved(child, module, path.name == "__init__.py")
                for alias in child.names:
                    submodule = f"{source}.{alias.name}"
                    found.append(Import(submodule if submodule in known else source, child.lineno, at_load))
            visit(child, at_load and not isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda))

    visit(tree, True)
    return found


def ours(target: str) -> bool:
    return target == "src" or target.startswith("src.")


def outside(target: str) -> bool:
    return target.split(".", maxsplit=1)[0] in OUTSIDE


def all_imports() -> dict[str, list[Import]]:
    known = modules()
    return {module: imports(module, path, known) for module, path in known.items()}


def test_every_module_of_src_has_a_layer() -> None:
    unplaced = [module for module in modules() if module != "src" and module.split(".")[1] not in LAYERS]
    assert not unplaced, f"modules of src/ in no layer of LAYERS: {unplaced}"


def test_no_module_imports_from_a_later_layer() -> None:
    climbs = [
        f"{module} (line {item.line}): imports {item.target}, of a later layer"
        for module, found in all_imports().items()
        for item in found
        if ours(item.target) and layer(item.target) > layer(module)
    ]
    assert not climbs, "\n".join(climbs)


def test_nothing_in_src_imports_the_handler_bench_or_builder() -> None:
    found = [
        f"{module} (line {item.line}): imports {item.target}"
        for module, items in all_imports().items()
        for item in items
        if outside(item.target)
    ]
    assert not found, "\n".join(found)


def test_the_request_and_settings_models_import_nothing_of_ours() -> None:
    found = [
        f"{module} (line {item.line}): imports {item.target}"
        for module, items in all_imports().items()
        if module.split(".")[1:2] and module.split(".")[1] in SELF_CONTAINED
        for item in items
        if (ours(item.target) and item.target.split(".")[1:2] != module.split(".")[1:2]) or outside(item.target)
    ]
    assert not found, "\n".join(found)


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle through each strongly connected group of ``graph`` that has one (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[list[str]] = []

    def connect(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for after in sorted(graph.get(node, ())):
            if after not in index:
                connect(after)
                low[node] = min(low[node], low[after])
            elif after in on_stack:
                low[node] = min(low[node], index[after])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.append(member)
                if member == node:
                    break
            if len(group) > 1 or node in graph.get(node, ()):
                groups.append(sorted(group))

    for node in sorted(graph):
        if node not in index:
            connect(node)
    return groups


def test_cycles_are_found() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"a"}}) == [["a"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycle_between_modules_of_src() -> None:
    """Imports that run when a module loads, those under ``if TYPE_CHECKING:`` included: a cycle there is
    one edit away from a partly initialised module. Imports inside functions run later and do not count."""
    graph = {
        module: {item.target for item in found if item.at_load and ours(item.target) and item.target != module}
        for module, found in all_imports().items()
    }
    found = cycles(graph)
    assert not found, f"import cycles between modules of src/: {found}"


def _excused(lines: list[str], node: ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef) -> bool:
    """Whether the line before the definition, or its first lines up to its first statement after the
    docstring, hold a comment that says why it cannot be split."""
    first = node.decorator_list[0].lineno if node.decorator_list else node.lineno
    body = node.body
    if len(body) > 1 and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
        body = body[1:]
    last = body[0].lineno
    return any("#" in line and EXCUSE in line.split("#", 1)[1] for line in lines[first - 2 : last])


def oversized(path: Path) -> list[str]:
    lines = path.read_text(encoding="utf-8").splitlines()
    found = []
    for node in ast.walk(ast.parse("\n".join(lines), filename=str(path))):
        if isinstance(node, ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            size = (node.end_lineno or node.lineno) - node.lineno + 1
            limit = MAX_CLASS_LINES if isinstance(node, ast.ClassDef) else MAX_FUNCTION_LINES
            if size > limit and not _excused(lines, node):
                kind = "class" if isinstance(node, ast.ClassDef) else "function"
                found.append(f"{path.relative_to(ROOT)}:{node.lineno}: {kind} {node.name} is {size} lines (> {limit})")
    return found


def test_no_class_over_250_lines_and_no_function_over_60_unless_it_says_why() -> None:
    """Lines from the ``def`` or ``class`` line to the last, docstring and comments included."""
    found = [problem for path in [*modules().values(), ROOT / "handler.py"] for problem in oversized(path)]
    assert not found, "\n".join(found)
