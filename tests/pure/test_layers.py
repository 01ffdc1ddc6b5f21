"""The package is cut in layers along the data path; a module imports only from its own layer or those below.

Every ``import`` and ``from ... import`` of a trainer_sync module is read from the source (``ast``; imports inside
functions count too, those under ``if TYPE_CHECKING:`` do not) and compared by layer rank. ARCHITECTURE.md draws
the same map. A new module must be given a layer here (the test fails for a module it does not know).
"""
from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[2] / "trainer_sync"

# Bottom to top. A module's layer is the longest prefix of its dotted name (without "trainer_sync.") listed here.
LAYERS: list[tuple[str, list[str]]] = [
    ("protocol", ["errors", "config", "protocol"]),
    ("plan", ["plan"]),
    ("sources", ["sources"]),
    ("codec", ["codec"]),
    ("transport", ["transport"]),
    ("pipeline", ["pipeline"]),
    ("per-rank", ["rank"]),
    ("engines", ["engines", "metrics"]),
    # Training-loop hooks know WeightSync only by its push(); WeightSync.attach()/callback() hand out these hooks.
    ("integrations", ["integrations"]),
    ("control", ["control"]),
    ("entry points", ["cli", "testing", "__init__"]),
]
# Imports against the order that are known and not yet cut (each must still exist: remove it here once it is gone).
KNOWN: set[tuple[str, str]] = set()
RANK = {prefix: i for i, (_, prefixes) in enumerate(LAYERS) for prefix in prefixes}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PKG).with_suffix("").parts)
    if parts[-1] == "__init__" and len(parts) > 1:
        parts = parts[:-1]
    return ".".join(parts)


def layer_of(name: str) -> int:
    parts = name.split(".")
    for n in range(len(parts), 0, -1):
        if ".".join(parts[:n]) in RANK:
            return RANK[".".join(parts[:n])]
    raise KeyError(f"trainer_sync.{name} has no layer in tests/pure/test_layers.py LAYERS")


def _type_checking_only(node: ast.AST, parents: dict) -> bool:
    while node in parents:
        node = parents[node]
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            return True
    return False


def imports_of(path: Path) -> list[tuple[int, str]]:
    """(line, dotted name inside trainer_sync) of every trainer_sync import in ``path``."""
    me = module_name(path)
    package = me.split(".") if path.name == "__init__.py" else me.split(".")[:-1]
    if me == "__init__":
        package = []
    tree = ast.parse(path.read_text())
    parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
    out = []
    for node in ast.walk(tree):
        if _type_checking_only(node, parents):
            continue
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name[len("trainer_sync."):]) for a in node.names
                    if a.name.startswith("trainer_sync.")]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[:len(package) - (node.level - 1)] if node.level > 1 else list(package)
                target = base + (node.module.split(".") if node.module else [])
            elif node.module and node.module.startswith("trainer_sync."):
                target = node.module.split(".")[1:]
            else:
                continue
            if node.module is None or not target:  # "from . import x" / "from .. import x": the names are modules
                out += [(node.lineno, ".".join(target + [a.name])) for a in node.names]
            else:
                out.append((node.lineno, ".".join(target)))
    return out


def test_every_module_imports_only_its_layer_or_below():
    files = sorted(PKG.rglob("*.py"))
    assert len(files) > 30
    wrong, seen = [], set()
    for path in files:
        me = module_name(path)
        mine = layer_of(me)
        for line, name in imports_of(path):
            if (me, name) in KNOWN:
                seen.add((me, name))
            elif layer_of(name) > mine:
                wrong.append(f"trainer_sync/{path.relative_to(PKG)}:{line} ({LAYERS[mine][0]}) imports "
                             f"trainer_sync.{name} ({LAYERS[layer_of(name)][0]})")
    assert not wrong, "imports against the layer order:\n  " + "\n  ".join(wrong)
    assert seen == KNOWN, f"no longer needed in KNOWN: {sorted(KNOWN - seen)}"


def test_the_checker_sees_relative_and_absolute_imports(tmp_path):
    names = {n for _, n in imports_of(PKG / "engines" / "vllm" / "backend.py")}
    assert {"protocol.messages", "rank.receiver", "engines.vllm.compat"} <= names
    assert layer_of("codec.fp8_source") == RANK["codec"] and layer_of("transport.ipc_send") == RANK["transport"]

