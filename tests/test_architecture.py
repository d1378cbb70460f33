"""The import direction ARCHITECTURE.md states, checked by walking every module's imports (at
module top and inside functions alike: an import inside a function is still an edge)."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "spactor_mega"

# Layer of each top-level room of spactor_mega (ARCHITECTURE.md). A module may import rooms of a
# lower layer, and its own room; rooms of one layer are independent of each other.
LAYERS = {
    "errors": 0, "curriculum": 0, "seeding": 0, "quiet": 0,
    "config": 1,
    "data": 2, "parallel": 2,
    "plan": 3,
    "model": 4,
    "checkpoint": 5,
    "training": 6,
    "convert": 7, "study": 7,
    "cli": 8, "prepare_cli": 8,
}


def _room(module: str) -> str:
    """``spactor_mega.model.t5`` -> ``model``."""
    return module.split(".")[1]


def _modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        if name != "spactor_mega":
            out[name] = path
    return out


def _imports(name: str, path: Path) -> set[str]:
    """The spactor_mega modules ``name`` imports (relative imports resolved)."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("spactor_mega.")}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.startswith("spactor_mega."):
                found.add(target)
                found |= {f"{target}.{a.name}" for a in node.names}
    return found


def test_every_room_has_a_layer():
    assert {_room(m) for m in _modules()} <= set(LAYERS)


def test_imports_point_down_the_layers():
    modules = _modules()
    wrong = []
    for name, path in sorted(modules.items()):
        for target in sorted(_imports(name, path)):
            target_module = next((m for m in (target, target.rsplit(".", 1)[0]) if m in modules), None)
            if target_module is None:
                continue
            src, dst = _room(name), _room(target_module)
            if src != dst and LAYERS[dst] >= LAYERS[src]:
                wrong.append(f"{name} imports {target_module} ({src} layer {LAYERS[src]} -> {dst} layer {LAYERS[dst]})")
    assert not wrong, "\n".join(wrong)


def test_no_import_cycles():
    modules = _modules()
    graph = {name: {t if t in modules else t.rsplit(".", 1)[0] for t in _imports(name, path)} & set(modules)
             for name, path in modules.items()}
    state: dict[str, int] = {}

    def visit(node, trail):
        state[node] = 1
        for nxt in sorted(graph[node]):
            if nxt == node or nxt.startswith(node + "."):  # a package's __init__ naming its submodules
                continue
            if state.get(nxt) == 1:
                pytest.fail("import cycle: " + " -> ".join(trail[trail.index(nxt):] + [nxt]) if nxt in trail
                            else f"import cycle through {nxt}")
            if nxt not in state:
                visit(nxt, trail + [nxt])
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])


# torch.distributed's collectives (and the p2p ops): our code issues them through
# spactor_mega/parallel/collectives.py only, which puts each tensor on its group's device.
COLLECTIVE_NAMES = {
    "all_reduce", "all_gather", "all_gather_into_tensor", "all_gather_object", "all_to_all",
    "all_to_all_single", "barrier", "monitored_barrier", "broadcast", "broadcast_object_list",
    "gather", "gather_object", "reduce", "reduce_scatter", "reduce_scatter_tensor", "scatter",
    "scatter_object_list", "send", "recv", "isend", "irecv", "batch_isend_irecv",
    "_all_gather_base", "_reduce_scatter_base",
}
COLLECTIVES_OWNER = PACKAGE / "parallel" / "collectives.py"


def _distributed_aliases(tree: ast.AST) -> tuple[set[str], set[str]]:
    """Names bound to ``torch.distributed`` (``dist``, ``c10d``, ...) and collectives imported by name."""
    modules, functions = {"torch.distributed"}, set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            modules |= {a.asname for a in node.names if a.asname and a.name.startswith("torch.distributed")}
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("torch.distributed"):
            for a in node.names:
                if a.name in COLLECTIVE_NAMES:
                    functions.add(a.asname or a.name)
                elif a.name == "distributed_c10d":
                    modules.add(a.asname or a.name)
        elif isinstance(node, ast.ImportFrom) and node.module == "torch":
            modules |= {a.asname or a.name for a in node.names if a.name == "distributed"}
    return modules, functions


def direct_collectives(source: str) -> list[str]:
    """``line: call`` for every torch.distributed collective ``source`` calls directly."""
    tree = ast.parse(source)
    modules, functions = _distributed_aliases(tree)
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        f = node.func
        if isinstance(f, ast.Attribute) and f.attr in COLLECTIVE_NAMES and ast.unparse(f.value) in modules:
            found.append(f"{node.lineno}: {ast.unparse(f)}")
        elif isinstance(f, ast.Name) and f.id in functions:
            found.append(f"{node.lineno}: {f.id}")
    return found


def test_collectives_go_through_their_owner():
    wrong = [f"{path.relative_to(PACKAGE.parent)}:{hit}" for path in sorted(PACKAGE.rglob("*.py"))
             if path != COLLECTIVES_OWNER for hit in direct_collectives(path.read_text())]
    assert not wrong, "direct torch.distributed collectives (use spactor_mega.parallel.collectives):\n" + "\n".join(wrong)


@pytest.mark.parametrize("source", [
    "import torch\ntorch.distributed.all_reduce(t)",
    "import torch.distributed as dist\ndist.barrier()",
    "from torch import distributed as d\nd.broadcast_object_list(box, src=0)",
    "from torch.distributed import all_gather as ag\nag(parts, t)",
    "import torch.distributed.distributed_c10d as c10d\nc10d.all_reduce(t)",
])
def test_direct_collective_detector_sees_each_spelling(source):
    assert direct_collectives(source)
