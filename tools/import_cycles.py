"""The import graph of a package and its cycles: every `import` / `from ... import` statement, at
module level or inside functions and classes, is an edge from the module holding it to the module it
names. The statements under `if __name__ == "__main__":` run only when the file is executed as a
script, as the separate module `__main__`: they are edges of a node "<module> (as __main__)".

    python -m tools.import_cycles [PACKAGE_DIR]     # default walrus_jax; exit status 1 when cycles
"""
import ast, os, sys

root = sys.argv[1] if len(sys.argv) > 1 else "walrus_jax"
root = root.rstrip(os.sep)
base = os.path.dirname(os.path.abspath(root))
mods = {}
for d, _, files in os.walk(root):
    for f in files:
        if f.endswith(".py"):
            p = os.path.join(d, f)
            rel = os.path.relpath(p, base)[:-3].replace(os.sep, ".")
            mods[rel[:-9] if rel.endswith(".__init__") else rel] = p

def target(name):
    while name and name not in mods:
        name = name.rpartition(".")[0]
    return name or None

def is_main_block(node):
    t = getattr(node, "test", None)
    return isinstance(node, ast.If) and isinstance(t, ast.Compare) and isinstance(t.left, ast.Name) \
        and t.left.id == "__name__" and any(getattr(c, "value", None) == "__main__" for c in t.comparators)

graph = {m: set() for m in mods}
parts_of = []
for m, p in mods.items():
    tree = ast.parse(open(p).read())
    main_blocks = [n for n in tree.body if is_main_block(n)]
    rest = ast.Module(body=[n for n in tree.body if not is_main_block(n)], type_ignores=[])
    parts_of.append((m, p, m, rest))
    if main_blocks:
        graph[f"{m} (as __main__)"] = set()
        parts_of.append((m, p, f"{m} (as __main__)", ast.Module(body=main_blocks, type_ignores=[])))
for m, p, node_name, tree in parts_of:
    pkg = m if p.endswith("__init__.py") else m.rpartition(".")[0]
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            mod = node.module or ""
            if node.level:
                parts = pkg.split(".")
                mod = ".".join(parts[: len(parts) - node.level + 1] + ([mod] if mod else []))
            names = [f"{mod}.{a.name}" if f"{mod}.{a.name}" in mods else mod for a in node.names]
        for n in names:
            t = target(n)
            if t and t != m:
                graph[node_name].add(t)

# strongly connected components (Tarjan), then one cycle per component
index, low, stack, on, sccs = {}, {}, [], set(), []
def visit(v):
    index[v] = low[v] = len(index); stack.append(v); on.add(v)
    for w in graph[v]:
        if w not in index:
            visit(w); low[v] = min(low[v], low[w])
        elif w in on:
            low[v] = min(low[v], index[w])
    if low[v] == index[v]:
        comp = []
        while True:
            w = stack.pop(); on.discard(w); comp.append(w)
            if w == v:
                break
        if len(comp) > 1:
            sccs.append(sorted(comp))
sys.setrecursionlimit(10000)
for v in sorted(graph):
    if v not in index:
        visit(v)
print(f"{len(mods)} modules ({len(graph) - len(mods)} also run as __main__), {sum(map(len, graph.values()))} import edges, {len(sccs)} cycle(s)")
for comp in sccs:
    # a shortest cycle through the component's first module (BFS inside the component)
    s = comp[0]; prev = {s: None}; q = [s]; cyc = None
    while q and cyc is None:
        v = q.pop(0)
        for w in sorted(graph[v]):
            if w == s:
                cyc = [v]; break
            if w in comp and w not in prev:
                prev[w] = v; q.append(w)
    path = []
    v = cyc[0]
    while v is not None:
        path.append(v); v = prev[v]
    path = path[::-1] + [s]
    print(f"  cycle among {len(comp)} modules {comp}:\n    " + " -> ".join(path))
sys.exit(1 if sccs else 0)
