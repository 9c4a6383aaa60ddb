"""The house's import rules: no circles between edgeseq's modules (function-level imports
included: a circle hidden inside a function is still a circle), imports point down the layers
core -> runtime -> build -> cli, and every module imports on its own (docs/architecture.md).

- core: the bundle format, checkpoints, tokenizers, limits, registries, devices, kernels;
- runtime: running bundles (``edgeseq.runtime``: sessions, backends' runners, profiling, cost);
- build: making bundles (families, ``convert``, ``quant``, the zoo's training scripts, and a
  backend's own lowering and quantizing modules);
- cli: the command line, and the package's public facade (``edgeseq``: ``edgeseq.load``).

A package and its own modules are one unit here: a package naming its parts (a backend
class importing its ``lower`` or ``run`` module when asked to lower or load) is neither a
circle nor an upward import.
"""
from __future__ import annotations

import ast
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import tomllib

REPO = Path(__file__).resolve().parents[2]
LAYERS = ("core", "runtime", "build", "cli")
#: a backend folder's build side: imported by convert, never by a running bundle
BACKEND_BUILD = ("lower", "stamp", "layout", "fuse", "quantize")


def _modules() -> dict[str, Path]:
    dirs = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"][
        "package-dir"]
    out = {}
    for pkg, folder in dirs.items():
        if pkg.count(".") > 1:
            continue  # a subpackage mapped under its parent's folder: found from there
        for p in (REPO / folder).rglob("*.py"):
            parts = [x for x in p.relative_to(REPO / folder).with_suffix("").parts
                     if x != "__init__"]
            out[".".join([pkg, *parts])] = p
    return out


def layer(module: str) -> str:
    if module == "edgeseq" or module.startswith("edgeseq.cli"):
        return "cli"
    if module.startswith(("edgeseq.families", "edgeseq.quant", "edgeseq.convert",
                          "edgeseq.zoo")):
        return "build"
    if module.startswith("edgeseq.runtime.backends.") and \
            module.rsplit(".", 1)[-1] in BACKEND_BUILD:
        return "build"
    if module.startswith("edgeseq.runtime"):
        return "runtime"
    return "core"


def _edges(mods: dict[str, Path]) -> dict[tuple[str, str], int]:
    """(importer, imported) -> line, for every import between edgeseq's modules."""
    def resolve(name: str) -> str | None:
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name or None

    edges: dict[tuple[str, str], int] = {}
    for name, path in mods.items():
        is_pkg = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: from the module's own package
                    pkg = name if is_pkg else name.rpartition(".")[0]
                    for _ in range(node.level - 1):
                        pkg = pkg.rpartition(".")[0]
                    base = f"{pkg}.{base}".rstrip(".")
                targets = [base] + [f"{base}.{a.name}" for a in node.names]
            else:
                continue
            for t in targets:
                if not t.startswith("edgeseq"):
                    continue
                r = resolve(t)
                # a package's own submodules, and a module's own package, are not edges
                if r and r != name and not r.startswith(name + ".") \
                        and not name.startswith(r + "."):
                    edges.setdefault((name, r), node.lineno)
    return edges


def _cycles(nodes: list[str], edges: dict[tuple[str, str], int]) -> list[list[str]]:
    out_edges = defaultdict(list)
    for a, b in edges:
        out_edges[a].append(b)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    found = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in out_edges[v]:
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
                found.append(sorted(comp))

    for v in nodes:
        if v not in index:
            visit(v)
    return found


def test_no_import_circles():
    mods = _modules()
    assert len(mods) > 80
    edges = _edges(mods)
    circles = _cycles(sorted(mods), edges)
    assert circles == [], "\n".join(
        " <-> ".join(c) + ": " + ", ".join(f"{a} -> {b} (line {edges[a, b]})"
                                           for (a, b) in edges if a in c and b in c)
        for c in circles)


def test_imports_point_down_the_layers():
    mods = _modules()
    rank = {name: LAYERS.index(layer(name)) for name in mods}
    upward = [f"{a} ({layer(a)}) imports {b} ({layer(b)}) at line {line}"
              for (a, b), line in sorted(_edges(mods).items()) if rank[b] > rank[a]]
    assert upward == [], "\n".join(upward)


def test_the_rules_can_fail():
    """The checks see a circle and an upward import when there is one."""
    edges = {("a", "b"): 1, ("b", "c"): 1, ("c", "a"): 1, ("c", "d"): 1}
    assert _cycles(["a", "b", "c", "d"], edges) == [["a", "b", "c"]]
    assert layer("edgeseq.bundle") == "core" and layer("edgeseq.convert.pipeline") == "build"
    assert layer("edgeseq.runtime.session") == "runtime" and layer("edgeseq.cli") == "cli"


def test_every_module_imports_on_its_own():
    """Each module imported first, in a process that has imported no other edgeseq module (a
    circle or a missing import that another module's import used to hide shows here)."""
    mods = sorted(m for m in _modules() if not m.endswith("__main__"))
    code = (
        "import importlib, sys, traceback\n"
        "import torch, numpy\n"   # third-party packages may stay loaded: only ours are purged
        f"mods = {mods!r}\n"
        "bad = []\n"
        "for m in mods:\n"
        "    for k in [k for k in sys.modules if k == 'edgeseq' or k.startswith('edgeseq.')]:\n"
        "        del sys.modules[k]\n"
        "    try:\n"
        "        importlib.import_module(m)\n"
        "    except Exception as e:\n"
        "        bad.append(f'{m}: {type(e).__name__}: {e}')\n"
        "print('\\n'.join(bad))\n")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       timeout=600, cwd=REPO)
    assert p.returncode == 0, p.stderr[-3000:]
    assert p.stdout.strip() == "", p.stdout
