#!/usr/bin/env python3
"""Checks the shim's layering (docs/ARCHITECTURE.md, "Layers"): every module
of src/ may use only modules of its own layer or below; nothing below hooks/
imports hooks; no import circle between modules. Prints the module graph with
--graph. Exit 1 on a violation."""
import re
import sys
from pathlib import Path

# Lowest first. A module may use modules of its own layer or lower ones,
# but the graph must stay acyclic.
LAYERS = [
    ["sys", "real", "lock", "log", "config", "stats", "ranges", "reentry", "fdcache", "alloc"],
    ["shadow", "track", "persist", "sigchain", "sud"],
    ["lazy"],
    ["runtime", "classify", "file", "registry", "fdtable", "writeback", "fileio", "mapping",
     "lifecycle", "stdio", "watcher"],
    ["hooks"],
    ["lib"],
]
RANK = {m: i for i, layer in enumerate(LAYERS) for m in layer}


def module_of(path: Path, src: Path) -> str:
    rel = path.relative_to(src)
    return rel.parts[0].removesuffix(".rs") if len(rel.parts) == 1 else rel.parts[0]


def uses(text: str, own: str) -> set:
    text = re.sub(r"//[^\n]*", "", text)  # comments (docs) name modules freely
    found = set(re.findall(r"\bcrate::([a-z_]+)", text))
    # `use crate::{a, b::c}` groups
    for group in re.findall(r"use crate::\{([^}]*)\}", text):
        found |= set(re.findall(r"(?:^|[,{\s])([a-z_]+)(?:::|\s*[,}]|$)", group))
    if own != "hooks":
        found |= {"hooks"} if re.search(r"\bsuper::super::|\bhooks::", text) and own != "lib" else set()
    return {m for m in found if m in RANK and m != own}


def main() -> int:
    src = Path(__file__).resolve().parent.parent / "src"
    graph = {}
    for f in sorted(src.rglob("*.rs")):
        m = module_of(f, src)
        if m not in RANK:
            print(f"check-layers: {f.relative_to(src.parent)}: module `{m}` has no layer "
                  "(add it to scripts/check-layers.py and docs/ARCHITECTURE.md)")
            return 1
        graph.setdefault(m, set()).update(uses(f.read_text(), m))
    bad = []
    for m, deps in sorted(graph.items()):
        for d in sorted(deps):
            if RANK[d] > RANK[m]:
                bad.append(f"{m} (layer {RANK[m]}) uses {d} (layer {RANK[d]}): upward")
    # cycles (Tarjan-free DFS is enough for ~30 nodes)
    state = {}
    stack = []

    def dfs(n):
        state[n] = 1
        stack.append(n)
        for d in sorted(graph.get(n, ())):
            if state.get(d) == 1:
                cyc = stack[stack.index(d):] + [d]
                bad.append("import circle: " + " -> ".join(cyc))
            elif d not in state:
                dfs(d)
        stack.pop()
        state[n] = 2

    for n in sorted(graph):
        if n not in state:
            dfs(n)
    if "--graph" in sys.argv:
        for m in sorted(graph, key=lambda m: (RANK[m], m)):
            print(f"{m} [{RANK[m]}] -> {', '.join(sorted(graph[m])) or '-'}")
    for b in bad:
        print(f"check-layers: {b}")
    if not bad:
        print(f"check-layers: {len(graph)} modules, no upward use, no import circle")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
