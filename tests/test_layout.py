"""The module layout: the imports between vit_spine modules form a DAG (CONTRACTS.md "Layout").

The graph is read from each module's AST, so imports inside functions (often written to hide a cycle)
count as much as module-level ones; so do imports under `if TYPE_CHECKING:`.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE_DIR = Path(__file__).resolve().parents[1] / "vit_spine"


def module_name(path: Path, package_dir: Path = PACKAGE_DIR) -> str:
    """`vit_spine/models/vit.py` -> `vit_spine.models.vit`; a package's `__init__.py` -> the package."""
    parts = [package_dir.name, *path.relative_to(package_dir).with_suffix("").parts]
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def package_modules(package_dir: Path = PACKAGE_DIR) -> dict[str, Path]:
    return {module_name(path, package_dir): path for path in sorted(package_dir.rglob("*.py"))}


def imported_modules(path: Path, name: str, known: set[str]) -> set[str]:
    """The package's modules that the file at `path` (module `name`) imports, anywhere in its body.

    `from vit_spine import x` is an edge to `vit_spine.x` when that is a module, else to `vit_spine`
    (a name its `__init__` defines); relative imports are resolved against the module's package.
    """
    is_package = path.name == "__init__.py"
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = name.split(".") if is_package else name.split(".")[:-1]
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            for alias in node.names:
                submodule = f"{base}.{alias.name}"
                found.add(submodule if submodule in known else base)
    # `import vit_spine.a.b` names vit_spine.a.b; an unknown dotted tail falls back to its longest known prefix
    resolved = set()
    for target in found:
        while target and target not in known:
            target = target.rpartition(".")[0]
        if target and target != name:
            resolved.add(target)
    return resolved


def import_graph(package_dir: Path = PACKAGE_DIR) -> dict[str, set[str]]:
    modules = package_modules(package_dir)
    known = set(modules)
    return {name: imported_modules(path, name, known) for name, path in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as [a, b, ..., a], or None when the graph is a DAG (depth-first search, sorted for a stable answer)."""
    done: set[str] = set()
    path: list[str] = []
    on_path: set[str] = set()

    def visit(node: str) -> list[str] | None:
        path.append(node)
        on_path.add(node)
        for target in sorted(graph.get(node, ())):
            if target in on_path:
                return path[path.index(target) :] + [target]
            if target not in done:
                cycle = visit(target)
                if cycle:
                    return cycle
        on_path.discard(node)
        path.pop()
        done.add(node)
        return None

    for start in sorted(graph):
        if start not in done:
            cycle = visit(start)
            if cycle:
                return cycle
    return None


def test_find_cycle_names_the_cycle() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert find_cycle(graph) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_imports_are_read_from_the_whole_ast(tmp_path: Path) -> None:
    package = tmp_path / "vit_spine"
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("from vit_spine.schema import TARGETS\n")
    (package / "schema.py").write_text("TARGETS = ()\n")
    (package / "sub" / "__init__.py").write_text("from . import deep\n")
    (package / "sub" / "deep.py").write_text("from .. import schema\n")
    (package / "user.py").write_text(
        "from vit_spine import TARGETS, sub\n"
        "def later():\n"
        "    import vit_spine.sub.deep\n"
        "    import numpy  # not in the package: no edge\n"
    )
    assert import_graph(package) == {
        "vit_spine": {"vit_spine.schema"},
        "vit_spine.schema": set(),
        "vit_spine.sub": {"vit_spine.sub.deep"},
        "vit_spine.sub.deep": {"vit_spine.schema"},
        "vit_spine.user": {"vit_spine", "vit_spine.sub", "vit_spine.sub.deep"},
    }


def test_vit_spine_imports_form_a_dag() -> None:
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


# The bottom of the layout: what each of these may import from the package (nothing else).
FOUNDATIONS = {
    "vit_spine.schema": set(),
    "vit_spine.fs": set(),
    "vit_spine.options": set(),
    "vit_spine.artifacts": {"vit_spine.schema", "vit_spine.fs"},
}


@pytest.mark.parametrize("module", sorted(FOUNDATIONS))
def test_foundation_modules_import_only_below_them(module: str) -> None:
    assert import_graph()[module] <= FOUNDATIONS[module]


def reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for target in graph[todo.pop()] - seen:
            seen.add(target)
            todo.append(target)
    return seen


def functions_importing(path: Path, module: str) -> list[str]:
    """Names of the top-level functions of the file that import `module` (None for a module-level import)."""
    found = []
    for node in ast.parse(path.read_text()).body:
        for inner in ast.walk(node):
            names = [a.name for a in inner.names] if isinstance(inner, ast.Import) else []
            if isinstance(inner, ast.ImportFrom):
                names = [inner.module or "", *(f"{inner.module}.{a.name}" for a in inner.names)]
            if module in names:
                found.append(node.name if isinstance(node, ast.FunctionDef) else None)
    return found


def test_the_hub_knows_training_only_by_its_event() -> None:
    """The shard loop emits "shard saved" (artifacts.ShardSaved); the hub's pusher subscribes to it. The hub
    imports nothing of training, and train.py imports the hub only where its command wires the pusher in."""
    graph = import_graph()
    assert not reachable(graph, "vit_spine.hub") & {"vit_spine.train", "vit_spine.trainer"}
    assert functions_importing(PACKAGE_DIR / "train.py", "vit_spine.hub") == ["shard_pusher"]


def test_cli_is_the_top() -> None:
    """Stages parse their options with vit_spine.options; only the entry points import vit_spine.cli (the demo
    runs each step through it, for the one error policy)."""
    graph = import_graph()
    assert sorted(name for name, targets in graph.items() if "vit_spine.cli" in targets) == ["vit_spine.__main__", "vit_spine.demo"]
