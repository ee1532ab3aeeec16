"""Every module sits above what it imports: no import cycle in tlsfront/.

The imports are read with `ast`, not by importing: a module's top-level
imports and the imports inside its functions (a function-level import is
still a dependency, only a later one), but not those under
`if TYPE_CHECKING:`, which exist for the type checker alone.

`from package import name` depends on `package.name` when that is a
module, else on the package itself (its `__init__`). That a package's
`__init__` runs before its modules is Python's doing, not an edge: an
`__init__` that re-exports its own modules is a front, not a cycle, unless
one of those modules imports a name back from it.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator, Mapping
from pathlib import Path

import tlsfront

ROOT = Path(tlsfront.__file__).parent


def module_files(root: Path) -> dict[str, Path]:
    """Dotted module name -> file, for every module of the package at `root`."""
    modules = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(tree: ast.AST) -> Iterator[ast.Import | ast.ImportFrom]:
    """Every import statement, at any depth, outside `if TYPE_CHECKING:`."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for branch in node.orelse:
                if isinstance(branch, ast.Import | ast.ImportFrom):
                    yield branch
                yield from _imports(branch)
            continue
        if isinstance(node, ast.Import | ast.ImportFrom):
            yield node
        yield from _imports(node)


def dependencies(name: str, path: Path, modules: Mapping[str, Path]) -> set[str]:
    """The package's own modules that module `name` imports."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in _imports(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
            continue
        base = node.module or ""
        if node.level:
            anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
            base = ".".join(anchor + ([base] if base else []))
        for alias in node.names:
            submodule = f"{base}.{alias.name}"
            found.add(submodule if submodule in modules else base)
    found.discard(name)
    return {dep for dep in found if dep in modules}


def import_graph(root: Path) -> dict[str, set[str]]:
    modules = module_files(root)
    return {name: dependencies(name, path, modules) for name, path in modules.items()}


def find_cycle(graph: Mapping[str, set[str]]) -> list[str] | None:
    """One import cycle as a path (first module repeated at the end), or None."""
    done: set[str] = set()
    for start in sorted(graph):
        if start in done:
            continue
        path = [start]
        on_path = {start}
        stack = [iter(sorted(graph[start]))]
        while stack:
            nxt = next(stack[-1], None)
            if nxt is None:  # every module below this one is cycle-free
                stack.pop()
                finished = path.pop()
                on_path.discard(finished)
                done.add(finished)
                continue
            if nxt in on_path:
                return [*path[path.index(nxt) :], nxt]
            if nxt in done:
                continue
            path.append(nxt)
            on_path.add(nxt)
            stack.append(iter(sorted(graph[nxt])))
    return None


def test_tlsfront_has_no_import_cycle() -> None:
    graph = import_graph(ROOT)
    assert len(graph) > 50  # the walk saw the package
    assert "tlsfront.smtp" in graph["tlsfront.inbound.session"]
    assert "tlsfront.outbound.listener" in graph["tlsfront.inbound.server"]  # in a function
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_a_cycle_through_a_function_level_import_is_found(tmp_path: Path) -> None:
    package = tmp_path / "pkg"
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "sub" / "__init__.py").write_text("from pkg.sub.low import x\n")
    (package / "sub" / "low.py").write_text("def f():\n    from ..high import y\n")
    (package / "high.py").write_text("from pkg.sub import low\n")
    graph = import_graph(package)
    assert graph["pkg.high"] == {"pkg.sub.low"}  # a module, not its package
    assert graph["pkg.sub.low"] == {"pkg.high"}
    assert find_cycle(graph) == ["pkg.high", "pkg.sub.low", "pkg.high"]


def test_type_checking_imports_are_no_edge(tmp_path: Path) -> None:
    package = tmp_path / "pkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "low.py").write_text(
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n    from pkg.high import Thing\n"
        "else:\n    import pkg.other\n"
    )
    (package / "high.py").write_text("import pkg.low\n")
    (package / "other.py").write_text("")
    graph = import_graph(package)
    assert graph["pkg.low"] == {"pkg.other"}
    assert find_cycle(graph) is None
    # and a name imported back from a package's __init__ is an edge to it
    (package / "__init__.py").write_text("from pkg.high import z\n")
    (package / "other.py").write_text("from pkg import low\nfrom pkg import z\n")
    assert find_cycle(import_graph(package)) == ["pkg", "pkg.high", "pkg.low", "pkg.other", "pkg"]
