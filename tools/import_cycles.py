"""Print the import cycles between edge_vlm's modules, read from the source with ``ast``.

Every ``import`` counts, at module level or inside a function (a deferred import still
ties the two modules together; it only hides the cycle from Python), and so does a string
that is exactly a module's name (``importlib.import_module(...)``, ``python -m ...``). A
cycle is printed as ``a -> b -> a``; the exit status is the number of cycles (capped at
100)::

    python tools/import_cycles.py [PACKAGE_DIR]
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path


def module_name(root: Path, path: Path) -> str:
    """``edge_vlm/store/store.py`` -> ``edge_vlm.store.store`` (packages by their name)."""
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(path: Path, name: str, known: set[str]) -> set[str]:
    """The package's modules that ``path`` imports, anywhere in the file."""
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    # a logger named after a module (`logging.getLogger("edge_vlm.server")`) imports nothing
    loggers = {id(arg) for call in ast.walk(tree) if isinstance(call, ast.Call)
               and getattr(call.func, "attr", getattr(call.func, "id", "")) == "getLogger"
               for arg in call.args}
    for node in ast.walk(tree):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - node.level + 1]
                base = ".".join([*anchor, base]) if base else ".".join(anchor)
            subs = [f"{base}.{a.name}" for a in node.names]
            # `from pkg import submodule` depends on the submodule, not on what pkg's
            # __init__ re-exports; `from pkg import name` depends on pkg
            targets = subs if all(t in known for t in subs) else [*subs, base]
        elif (isinstance(node, ast.Constant) and isinstance(node.value, str)
              and node.value in known and id(node) not in loggers):
            # a module named in a string is imported by name (importlib, `python -m`)
            targets = [node.value]
        for t in targets:
            # the longest known module the name starts with: `from x import y` may name a
            # module y or an attribute of x
            while t and t not in known:
                t = t.rpartition(".")[0]
            if t and t != name:
                found.add(t)
    return found


def graph(root: Path) -> dict[str, set[str]]:
    """Module -> the package modules it imports."""
    files = {module_name(root, p): p for p in sorted(root.rglob("*.py"))}
    known = set(files)
    return {name: imports_of(path, name, known) for name, path in files.items()}


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []
    counter = 0

    def visit(v: str) -> None:
        nonlocal counter
        index[v] = low[v] = counter
        counter += 1
        stack.append(v)
        on.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    sys.setrecursionlimit(10_000)
    for v in sorted(edges):
        if v not in index:
            visit(v)
    return sorted(out)


def shortest_loop(edges: dict[str, set[str]], comp: list[str]) -> list[str]:
    """One shortest cycle through the component's first module, for the printout."""
    members = set(comp)
    start = comp[0]
    paths = {start: [start]}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(edges.get(v, ())):
                if w not in members:
                    continue
                if w == start:
                    return [*paths[v], start]
                if w not in paths:
                    paths[w] = [*paths[v], w]
                    nxt.append(w)
        frontier = nxt
    return comp


def main(argv: list[str]) -> int:
    """Print every cycle (its modules, and one loop through them)."""
    root = Path(argv[1] if len(argv) > 1 else Path(__file__).resolve().parent.parent / "edge_vlm")
    edges = graph(root.resolve())
    # every module imports the top package implicitly; edges *to* it are not cycles of ours
    top = root.resolve().name
    edges = {k: {w for w in v if w != top} for k, v in edges.items()}
    found = cycles(edges)
    for comp in found:
        print(f"{len(comp)} modules: {' -> '.join(shortest_loop(edges, comp))}")
        if len(comp) > 2:
            print(f"    all: {', '.join(comp)}")
    print(f"{len(found)} import cycle(s) in {len(edges)} modules")
    return min(len(found), 100)


if __name__ == "__main__":
    sys.exit(main(sys.argv))
