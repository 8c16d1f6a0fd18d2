"""The architecture's import rules, checked on the source (DESIGN.md, issue 13).

A module that imports, at any depth, a module that imports it back is a cycle: it works
only while every import in the loop stays inside a function, and breaks the day a helper
moves (a hidden cycle passes every import-time check, then fails on the first command
that reaches it). So cycles are looked for in the source itself, function-level imports
included; only imports under ``if TYPE_CHECKING:`` (never executed) are left out.
"""

from __future__ import annotations

import ast
import os

from conftest import REPO

SRC = os.path.join(REPO, "src")


def _modules() -> dict[str, str]:
    """Module name -> file, for every module under src/diskforge."""
    out = {}
    for folder, _, names in os.walk(os.path.join(SRC, "diskforge")):
        for n in names:
            if n.endswith(".py"):
                path = os.path.join(folder, n)
                rel = os.path.relpath(path, SRC)[:-3].replace(os.sep, ".")
                out[rel[:-len(".__init__")] if rel.endswith(".__init__") else rel] = path
    return out


def _type_checking_only(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)


def _imports(name: str, path: str, modules: dict[str, str]) -> set[str]:
    """The diskforge modules ``name`` imports anywhere in its body."""
    tree = ast.parse(open(path, encoding="utf-8").read(), path)
    package = name if path.endswith("__init__.py") else name.rpartition(".")[0]
    found: set[str] = set()
    skip: set[int] = set()
    for node in ast.walk(tree):
        if _type_checking_only(node):
            skip.update(id(n) for n in ast.walk(node))
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            # "from pkg import sub" imports the submodule when there is one
            targets = [f"{mod}.{a.name}" if f"{mod}.{a.name}" in modules else mod
                       for a in node.names]
        else:
            continue
        found.update(t for t in targets if t in modules and t != name)
    return found


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        work = [(v, iter(sorted(graph[v])))]
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        while work:
            node, it = work[-1]
            for w in it:
                if w not in index:
                    index[w] = low[w] = counter[0]
                    counter[0] += 1
                    stack.append(w)
                    on.add(w)
                    work.append((w, iter(sorted(graph[w]))))
                    break
                if w in on:
                    low[node] = min(low[node], index[w])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    comp = []
                    while True:
                        w = stack.pop()
                        on.discard(w)
                        comp.append(w)
                        if w == node:
                            break
                    if len(comp) > 1:
                        out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def import_graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(name, path, modules) for name, path in modules.items()}


def test_no_module_imports_itself_back():
    cycles = _cycles(import_graph())
    assert not cycles, "import cycles: " + "; ".join(" <-> ".join(c) for c in cycles)


def test_the_core_never_imports_operations_or_formats():
    """blockdev, checks, errors and the other core modules sit below ops, formats, cli."""
    graph = import_graph()
    upper = ("diskforge.ops", "diskforge.formats", "diskforge.cli", "diskforge.hypervisor",
             "diskforge.iso", "diskforge.batch")
    for core in ("diskforge.blockdev", "diskforge.checks", "diskforge.errors",
                 "diskforge.limits", "diskforge.byteorder", "diskforge.locks"):
        bad = sorted(m for m in graph[core] if m.startswith(upper))
        assert not bad, f"{core} imports {bad}"


def test_no_format_imports_another_format():
    graph = import_graph()
    prefix = "diskforge.formats."
    for mod, deps in graph.items():
        if not mod.startswith(prefix):
            continue
        own = mod[len(prefix):].split(".")[0]
        others = sorted(d for d in deps if d.startswith(prefix)
                        and d[len(prefix):].split(".")[0] != own)
        assert not others, f"{mod} imports {others}"
