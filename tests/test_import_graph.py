"""The project's import graph, read from the source with ``ast`` (nothing is imported): the library never imports
the data-prep jobs, no modules import each other in a cycle, and no test module imports another.

Every ``import`` and ``from ... import`` counts, at any depth (a function-level import is still an import: it only
hides a cycle until the function runs), relative ones resolved against their package. The nodes are the modules of
prime_scale, data_prep, launchers and bench, and the top-level helper modules of tests/ (``slurm_helpers``, ...).
"""

from __future__ import annotations

import ast
import functools
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("prime_scale", "data_prep", "launchers", "bench")


def module_name(path: Path) -> str:
    """``prime_scale/data/shards.py`` -> ``prime_scale.data.shards``; a package's ``__init__.py`` is the package; a
    file of tests/ is the top-level module pytest imports it as."""
    parts = path.relative_to(REPO).with_suffix("").parts
    if parts[0] == "tests":
        parts = parts[1:]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_files() -> dict[str, Path]:
    """Module name -> file, for the nodes of the graph."""
    files = [p for package in PACKAGES for p in (REPO / package).rglob("*.py")]
    files += [p for p in (REPO / "tests").glob("*.py") if not p.name.startswith("test_") and p.name != "conftest.py"]
    return {module_name(p): p for p in files}


def imports(path: Path, name: str) -> list[tuple[str, int]]:
    """(imported name, line) for every import statement of a file. ``from X import Y`` gives ``X.Y`` (Y may be a
    submodule; ``resolve`` falls back to X when it is not)."""
    is_package = path.name == "__init__.py"
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: against this module's package
                package = name.split(".") if is_package else name.split(".")[:-1]
                package = package[: len(package) - (node.level - 1)]
                base = ".".join([*package, base] if base else package)
            found += [(f"{base}.{alias.name}", node.lineno) for alias in node.names]
    return sorted(found, key=lambda f: f[1])


def resolve(imported: str, modules: dict[str, Path]) -> str | None:
    """The project module an imported name lands in: the longest prefix that is one, or None (not ours)."""
    parts = imported.split(".")
    for end in range(len(parts), 0, -1):
        if ".".join(parts[:end]) in modules:
            return ".".join(parts[:end])
    return None


@functools.cache  # read once for the tests of this file
def build_graph() -> tuple[dict[str, dict[str, int]], dict[str, list[tuple[str, int]]]]:
    """(edges: module -> {imported project module: first line}, raw: module -> every imported name and line)."""
    modules = project_files()
    edges: dict[str, dict[str, int]] = {m: {} for m in modules}
    raw: dict[str, list[tuple[str, int]]] = {}
    for name, path in modules.items():
        raw[name] = imports(path, name)
        for imported, line in raw[name]:
            target = resolve(imported, modules)
            if target is not None and target != name:
                edges[name].setdefault(target, line)
    return edges, raw


def components(edges: dict[str, dict[str, int]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan): the modules that import each other."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:  # recursive: the graph is a few hundred modules, far from the recursion limit
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

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return sorted(found)


def shortest_cycle(start: str, members: set[str], edges: dict[str, dict[str, int]]) -> list[str]:
    """The shortest import chain from ``start`` back to itself within one component (breadth-first)."""
    came_from: dict[str, str] = {}
    frontier = [start]
    while start not in came_from:
        following = []
        for v in frontier:
            for w in sorted(edges[v]):
                if w in members and w not in came_from:
                    came_from[w] = v
                    following.append(w)
        frontier = following
    chain = [start]
    while len(chain) == 1 or chain[-1] != start:
        chain.append(came_from[chain[-1]])
    return chain[::-1]


def cycles(edges: dict[str, dict[str, int]]) -> list[list[str]]:
    """For each component, the shortest cycle through each of its modules (each cycle once)."""
    found = []
    for component in components(edges):
        for start in component:
            chain = shortest_cycle(start, set(component), edges)
            first = chain.index(min(chain))
            chain = chain[first:-1] + chain[:first] + [chain[first]]  # the same cycle starts at its least module
            if chain not in found:
                found.append(chain)
    return found


def describe(chain: list[str], edges: dict[str, dict[str, int]]) -> str:
    """``a:12 -> b:40 -> a``: each module with the line of its import of the next."""
    return " -> ".join(f"{a}:{edges[a][b]}" for a, b in zip(chain, chain[1:])) + f" -> {chain[-1]}"


def test_the_library_never_imports_data_prep():
    _, raw = build_graph()
    found = [f"{name}:{line} imports {imported}" for name, found in sorted(raw.items())
             if name.split(".")[0] == "prime_scale" for imported, line in found if imported.split(".")[0] == "data_prep"]
    assert not found, ("prime_scale imports data_prep (the library reads datasets through prime_scale.data; a data-prep "
                       "job runs as a child process, python -m data_prep.JOB):\n  " + "\n  ".join(found))


def test_no_import_cycles():
    edges, _ = build_graph()
    found = [describe(chain, edges) for chain in cycles(edges)]
    assert not found, ("import cycles among the project's modules (function-level imports included; break each by "
                       "moving what both sides need into a module of its own):\n  " + "\n  ".join(found))


def test_no_test_module_imports_another():
    found = []
    for path in sorted((REPO / "tests").glob("test_*.py")):
        for imported, line in imports(path, path.stem):
            parts = imported.removeprefix("tests.").split(".")
            if parts[0].startswith("test_") and f"tests/{path.name}:{line} imports {parts[0]}" not in found:
                found.append(f"tests/{path.name}:{line} imports {parts[0]}")
    assert not found, ("a test module imports another test module (the two files then depend on each other's "
                       "internals; shared fixtures belong in tests/conftest.py, shared helpers in a helper module of "
                       "tests/):\n  " + "\n  ".join(found))


def test_the_graph_resolves_relative_imports_and_finds_every_cycle(tmp_path):
    """The checks above can fail: a relative import names its module, and a cycle is reported through each module."""
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "a.py").write_text("def f():\n    from .sub import b\n    from . import c\n")
    assert imports(tmp_path / "pkg" / "a.py", "pkg.a") == [("pkg.sub.b", 2), ("pkg.c", 3)]
    edges = {"a": {"b": 1}, "b": {"c": 2}, "c": {"a": 3, "b": 4}, "d": {"a": 5}}
    assert cycles(edges) == [["a", "b", "c", "a"], ["b", "c", "b"]]
    assert describe(["a", "b", "c", "a"], edges) == "a:1 -> b:2 -> c:3 -> a"
