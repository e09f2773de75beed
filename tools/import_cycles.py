"""The import graph of a package and its cycles.

Every `import` / `from ... import` statement, at module level or inside functions and classes, is
an edge from the module holding it to the module it names. The statements under
`if __name__ == "__main__":` run only when the file is executed as a script, as the separate module
`__main__`: they are edges of a node "<module> (as __main__)".

    python -m tools.import_cycles [PACKAGE_DIR]     # default walrus_jax; exit status 1 when cycles
"""
from __future__ import annotations

import ast
import os
import sys
from collections import deque


def modules(root: str) -> dict[str, str]:
    """{dotted module name: file} of every .py file under the package folder `root`."""
    base = os.path.dirname(os.path.abspath(root))
    out = {}
    for folder, _, files in os.walk(root):
        for f in files:
            if f.endswith(".py"):
                path = os.path.join(folder, f)
                name = os.path.relpath(path, base)[:-3].replace(os.sep, ".")
                out[name.removesuffix(".__init__")] = path
    return out


def _is_main_block(node) -> bool:
    t = getattr(node, "test", None)
    return isinstance(node, ast.If) and isinstance(t, ast.Compare) and isinstance(t.left, ast.Name) \
        and t.left.id == "__name__" and any(getattr(c, "value", None) == "__main__" for c in t.comparators)


def _imported(tree, package: str, mods: dict) -> set[str]:
    """The package's modules that the import statements anywhere in `tree` name."""
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            mod = node.module or ""
            if node.level:  # relative: resolved against the importing module's package
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                mod = ".".join(parts + ([mod] if mod else []))
            names += [f"{mod}.{a.name}" if f"{mod}.{a.name}" in mods else mod for a in node.names]
    out = set()
    for name in names:
        while name and name not in mods:  # `a.b.attr` -> the module a.b
            name = name.rpartition(".")[0]
        if name:
            out.add(name)
    return out


def import_graph(mods: dict[str, str]) -> dict[str, set[str]]:
    """{module: modules it imports}, plus "<module> (as __main__)" nodes for script-only imports."""
    graph = {}
    for name, path in mods.items():
        package = name if path.endswith("__init__.py") else name.rpartition(".")[0]
        with open(path) as f:
            body = ast.parse(f.read()).body
        main = [n for n in body if _is_main_block(n)]
        graph[name] = _imported(ast.Module([n for n in body if n not in main], []), package, mods) - {name}
        if main:
            graph[f"{name} (as __main__)"] = _imported(ast.Module(main, []), package, mods)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while not comp or comp[-1] != v:
                comp.append(stack.pop())
                on.discard(comp[-1])
            if len(comp) > 1:
                out.append(sorted(comp))

    sys.setrecursionlimit(max(10_000, sys.getrecursionlimit()))
    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def shortest_cycle(graph: dict[str, set[str]], comp: list[str]) -> list[str]:
    """A shortest import cycle through comp[0] inside the component (breadth first)."""
    start, prev, queue = comp[0], {comp[0]: None}, deque([comp[0]])
    while queue:
        v = queue.popleft()
        for w in sorted(graph[v]):
            if w == start:
                path = [v]
                while prev[path[-1]] is not None:
                    path.append(prev[path[-1]])
                return path[::-1] + [start]
            if w in comp and w not in prev:
                prev[w] = v
                queue.append(w)
    return comp


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    mods = modules((argv[0] if argv else "walrus_jax").rstrip(os.sep))
    graph = import_graph(mods)
    found = cycles(graph)
    print(f"{len(mods)} modules ({len(graph) - len(mods)} also run as __main__), "
          f"{sum(map(len, graph.values()))} import edges, {len(found)} cycle(s)")
    for comp in found:
        print(f"  cycle among {len(comp)} modules {comp}:\n    " + " -> ".join(shortest_cycle(graph, comp)))
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
