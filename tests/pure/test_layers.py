"""The package is cut in layers along the data path, one folder per layer; a module imports only from its own layer
or those below, never a private name of another module, and no two modules import each other (directly or round a
longer loop).

A module's layer is its folder: the first path component under trainer_sync/ (``rank/sender.py`` is in ``rank``).
At the root only ``errors.py`` and ``config.py`` (the bottom) and ``cli.py`` and ``__init__.py`` (the top) may live.
Every import is read from the source with ``ast``: relative and absolute ones (``from trainer_sync import x`` goes
through the package's ``__init__``, the top layer, unless ``x`` is a module), imports inside functions, and
``importlib.import_module("trainer_sync...")``; those under ``if TYPE_CHECKING:`` are not run and do not count.
ARCHITECTURE.md draws the same map.
"""
from __future__ import annotations

import ast
import sys
from pathlib import Path

PKG = Path(__file__).resolve().parents[2] / "trainer_sync"

# Bottom to top; the folders (or root modules) of one layer may import each other.
LAYERS = [["errors", "config"], ["protocol"], ["plan"], ["sources"], ["codec"], ["transport"], ["pipeline"],
          ["rank"], ["engines", "metrics"],
          ["integrations"],  # training-loop hooks know WeightSync only by its push(); WeightSync hands them out
          ["control"],
          ["testing", "cli", "__init__"]]  # testing: the process harness of the tests, benchmarks and recipes
RANK = {folder: i for i, folders in enumerate(LAYERS) for folder in folders}
ROOT_MODULES = {"errors", "config", "cli", "__init__"}
# Findings that are known and not yet fixed; each must still occur (remove it here once it is gone).
KNOWN: set[str] = set()


def module_of(path: Path) -> str:
    """Dotted name under trainer_sync: rank/sender.py -> "rank.sender", codec/__init__.py -> "codec"."""
    parts = list(path.relative_to(PKG).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" and len(parts) > 1 else parts)


def layer_of(module: str) -> int | None:
    return RANK.get(module.split(".")[0])


def is_module(dotted: str) -> bool:
    path = PKG.joinpath(*dotted.split(".")) if dotted != "__init__" else PKG / "__init__.py"
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def _package_of(path: Path) -> list[str]:
    me = module_of(path)
    if me == "__init__":
        return []
    return me.split(".") if path.name == "__init__.py" else me.split(".")[:-1]


def _type_checking_only(node: ast.AST, parents: dict) -> bool:
    while node in parents:
        node = parents[node]
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            return True
    return False


def imports_of(path: Path) -> list[tuple[int, str, str | None]]:
    """(line, module, name) of every trainer_sync import in ``path``: ``module`` is the dotted module it loads
    ("__init__" for the package itself), ``name`` the name taken from it (None for a whole module)."""
    package = _package_of(path)
    tree = ast.parse(path.read_text())
    parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
    out = []

    def add(line: int, base: list[str], names: list[str | None]) -> None:
        for name in names:
            if name is not None and is_module(".".join(base + [name])):
                out.append((line, ".".join(base + [name]), None))  # "from .pkg import module"
            else:
                out.append((line, ".".join(base) or "__init__", name))

    for node in ast.walk(tree):
        if _type_checking_only(node, parents):
            continue
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name == "trainer_sync" or a.name.startswith("trainer_sync."):
                    add(node.lineno, a.name.split(".")[1:], [None])
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[:len(package) - (node.level - 1)] + (node.module.split(".") if node.module else [])
            elif node.module == "trainer_sync" or (node.module or "").startswith("trainer_sync."):
                base = node.module.split(".")[1:]
            else:
                continue
            add(node.lineno, base, [a.name for a in node.names])
        elif (isinstance(node, ast.Call) and ast.unparse(node.func) in ("importlib.import_module", "import_module")
              and node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
            target = node.args[0].value
            if target.startswith("trainer_sync"):
                add(node.lineno, target.split(".")[1:], [None])
            elif target.startswith("."):
                level = len(target) - len(target.lstrip("."))
                add(node.lineno, package[:len(package) - (level - 1)] + target.lstrip(".").split("."), [None])
    return out


def all_imports() -> dict[str, list[tuple[int, str, str | None]]]:
    files = sorted(PKG.rglob("*.py"))
    return {str(path.relative_to(PKG)): imports_of(path) for path in files}


def findings() -> list[str]:
    """Every problem in the package, one line each (layer order, root modules, private names, cycles)."""
    out, graph = [], {}
    for rel, imports in all_imports().items():
        me = module_of(PKG / rel)
        if "/" not in rel and me not in ROOT_MODULES:
            out.append(f"{rel}: a root module (only {sorted(ROOT_MODULES)} live at the root; give it a layer folder)")
        elif layer_of(me) is None:
            out.append(f"{rel}: folder {me.split('.')[0]!r} has no layer in tests/pure/test_layers.py LAYERS")
        graph[me] = {module for _, module, _ in imports if module != me}
        for line, module, name in imports:
            mine, theirs = layer_of(me), layer_of(module)
            if mine is not None and theirs is not None and theirs > mine:
                out.append(f"{rel}:{line} ({me.split('.')[0]}) imports trainer_sync.{module} ({module.split('.')[0]}),"
                           f" a layer above")
            if module != me and name and name.startswith("_") and not name.startswith("__"):
                out.append(f"{rel}:{line} imports the private name {name} of trainer_sync.{module}")
    return out + [f"import cycle: {' -> '.join(cycle)}" for cycle in cycles(graph)]


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One loop per strongly connected group of modules (Tarjan), each closed on its first module."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while not group or group[-1] != v:
                group.append(stack.pop())
                on_stack.discard(group[-1])
            if len(group) > 1:
                out.append(_loop(sorted(group), graph))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def _loop(group: list[str], graph: dict[str, set[str]]) -> list[str]:
    """A shortest path from the group's first module back to itself, inside the group (breadth first)."""
    start, members = group[0], set(group)
    paths = {start: [start]}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(graph.get(v, ()) & members):
                if w == start:
                    return paths[v] + [start]
                if w not in paths:
                    paths[w] = paths[v] + [w]
                    nxt.append(w)
        frontier = nxt
    return group


def test_package_keeps_its_layers():
    assert len(list(PKG.rglob("*.py"))) > 30
    found = findings()
    wrong = [f for f in found if f not in KNOWN]
    assert not wrong, "the package's layers are broken:\n  " + "\n  ".join(wrong)
    assert KNOWN <= set(found), f"fixed, remove from KNOWN: {sorted(KNOWN - set(found))}"


def test_benchmarks_and_recipes_use_public_names_only():
    """Outside the package nothing imports a private module or name of it (``trainer_sync.codec._x``, ``_y``)."""
    root = PKG.parent
    wrong = []
    for path in sorted([*(root / "benchmarks").rglob("*.py"), *(root / "recipes").rglob("*.py")]):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "trainer_sync":
                dotted = [node.module + "." + a.name for a in node.names]
            elif isinstance(node, ast.Import):
                dotted = [a.name for a in node.names if a.name.split(".")[0] == "trainer_sync"]
            else:
                continue
            wrong += [f"{path.relative_to(root)}:{node.lineno} {d}" for d in dotted
                      if any(p.startswith("_") and not p.startswith("__") for p in d.split("."))]
    assert not wrong, wrong


def test_the_checker_resolves_every_kind_of_import(tmp_path, monkeypatch):
    """On a made-up package: relative, absolute, "from pkg import module", importlib, TYPE_CHECKING, private names
    and a cycle are each read as the layer rules need."""
    pkg = tmp_path / "trainer_sync"
    files = {
        "__init__.py": "from .rank.sender import Sender\n",
        "errors.py": "",
        "stray.py": "",
        "codec/__init__.py": "from .fp8 import quantize\n",
        "codec/fp8.py": "from . import triton_kernels\nfrom .helpers import _private\n",
        "codec/triton_kernels.py": "from .fp8 import quantize\n",
        "codec/helpers.py": "def _private(): pass\n",
        "rank/__init__.py": "",
        "rank/sender.py": ("import importlib\nfrom typing import TYPE_CHECKING\nfrom trainer_sync import errors\n"
                           "from trainer_sync import Sender\nimport trainer_sync.codec.fp8\n"
                           "importlib.import_module('trainer_sync.control.push')\n"
                           "if TYPE_CHECKING:\n    from ..control import push\n"),
        "control/__init__.py": "",
        "control/push.py": "",
    }
    for rel, text in files.items():
        (pkg / rel).parent.mkdir(parents=True, exist_ok=True)
        (pkg / rel).write_text(text)
    monkeypatch.setattr(sys.modules[__name__], "PKG", pkg)
    sender = imports_of(pkg / "rank" / "sender.py")
    assert [(line, m, n) for line, m, n in sender] == [
        (3, "errors", None), (4, "__init__", "Sender"), (5, "codec.fp8", None), (6, "control.push", None)]
    assert sorted(findings()) == sorted([
        "stray.py: a root module (only ['__init__', 'cli', 'config', 'errors'] live at the root; give it a layer "
        "folder)",
        "rank/sender.py:4 (rank) imports trainer_sync.__init__ (__init__), a layer above",
        "rank/sender.py:6 (rank) imports trainer_sync.control.push (control), a layer above",
        "codec/fp8.py:2 imports the private name _private of trainer_sync.codec.helpers",
        "import cycle: codec.fp8 -> codec.triton_kernels -> codec.fp8",
        "import cycle: __init__ -> rank.sender -> __init__",
    ])
