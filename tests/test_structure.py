"""The package's import graph: one-way dependencies, and nothing but the command line imports it.

Every import counts, those inside functions included (they still tie the modules together);
only ``if TYPE_CHECKING:`` blocks are left out, since they never run. Importing ``a.b.c`` from
outside the package ``a.b`` also runs ``a/b/__init__.py``, so that package is an edge too.
The root package (the public facade that imports everything) is an edge only where a module
names it explicitly.
"""

from __future__ import annotations

import ast
from pathlib import Path

import sparseattn

ROOT = Path(sparseattn.__file__).parent


def package_modules() -> dict[str, Path]:
    """{dotted name: file} of every module of the package, packages named without __init__."""
    modules = {}
    for path in sorted(ROOT.rglob("*.py")):
        parts = path.relative_to(ROOT.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join(parts)] = path
    return modules


class _ImportCollector(ast.NodeVisitor):
    """Absolute names of every import in a module, relative ones resolved."""

    def __init__(self, package: list[str]):
        self.package = package  # the package relative imports start from
        self.names: set[tuple[str, str]] = set()  # (the name as a module, else this module)

    def visit_If(self, node: ast.If) -> None:
        test = node.test
        name = test.id if isinstance(test, ast.Name) else getattr(test, "attr", None)
        if name == "TYPE_CHECKING":
            for child in node.orelse:
                self.visit(child)
        else:
            self.generic_visit(node)

    def visit_Import(self, node: ast.Import) -> None:
        self.names.update((alias.name, alias.name) for alias in node.names)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        if node.level:
            base = self.package[: len(self.package) - (node.level - 1)]
            target = ".".join(base + ([node.module] if node.module else []))
        else:
            target = node.module or ""
        for alias in node.names:  # a submodule, or a name defined by the target module
            self.names.add((f"{target}.{alias.name}", target))


def import_graph() -> dict[str, set[str]]:
    """{module: package modules it imports}, with the packages those imports run."""
    modules = package_modules()
    graph = {}
    for name, path in modules.items():
        parts = name.split(".")
        package = parts if path.name == "__init__.py" else parts[:-1]
        collector = _ImportCollector(package)
        collector.visit(ast.parse(path.read_text(), str(path)))
        edges = set()
        for as_module, otherwise in collector.names:
            target = as_module if as_module in modules else otherwise
            if target not in modules:
                continue  # another library
            edges.add(target)
            pieces = target.split(".")
            for i in range(2, len(pieces)):  # packages below the root that the import runs
                ancestor = ".".join(pieces[:i])
                inside = name == ancestor or name.startswith(ancestor + ".")
                if ancestor in modules and not inside:  # a namespace package runs nothing
                    edges.add(ancestor)
        edges.discard(name)
        graph[name] = edges
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as [a, b, ..., a], or None."""
    state: dict[str, str] = {}  # "open" while on the current path, "done" after
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = "open"
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        path.pop()
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_the_graph_sees_function_level_and_relative_imports():
    graph = import_graph()
    assert "sparseattn.integration.hf" in graph["sparseattn"]
    assert "sparseattn.bench.recall" in graph["sparseattn.cli.bench.recall"]  # imported inside a function
    assert "sparseattn.backends" in graph["sparseattn.methods.base"]  # ..backends.masks runs it


def test_no_import_cycles():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_only_the_command_line_imports_the_command_line():
    importers = sorted(
        m
        for m, edges in import_graph().items()
        if "sparseattn.cli" in edges and not m.startswith("sparseattn.cli")
    )
    assert importers == [], f"{importers} import sparseattn.cli"


# Each package's rank: an import may only run to a package of a lower rank or its own (the
# foundations at the bottom, the command line at the top). The root package is the public
# facade: only the command line (and tests, scripts) may import it.
RANKS = {
    "errors": 0,
    "types": 0,
    "parsing": 0,
    "compat": 0,
    "version": 0,
    "backends": 1,
    "cache": 1,
    "profiles": 2,
    "models": 2,
    "methods": 3,
    "activation": 3,
    "registry": 3,
    "setting": 4,
    "integration": 5,
    "vllm": 5,
    "bench": 6,
    "ROOT": 7,
    "cli": 8,
}


def _package(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "ROOT"


def test_imports_run_downward_only():
    """Foundations never import what is built on them: the cache never imports the hook's
    integration, the hook never imports the benchmarks, the benchmarks never import the
    package root; every package is ranked (a new one must be placed)."""
    upward = []
    for module, edges in import_graph().items():
        mine = _package(module)
        assert mine in RANKS, f"package {mine!r} has no rank in RANKS"
        for target in edges:
            theirs = _package(target)
            if RANKS[theirs] > RANKS[mine]:
                upward.append(f"{module} -> {target}")
    assert upward == [], "imports running upward: " + ", ".join(sorted(upward))
