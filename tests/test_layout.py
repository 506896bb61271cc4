"""The package's shape: imports point one way (cli -> demo -> commands -> runtime ->
storage -> algebra), hence no cycle, and no file grows past about 500 lines."""

import ast
import graphlib
from pathlib import Path

from twisted.trial import unittest

PACKAGE = Path(__file__).resolve().parent.parent / "synapse_nidstate"

#: Each layer may import only layers of a lower rank (and itself).
RANKS = {"algebra": 0, "storage": 1, "runtime": 2, "commands": 3, "demo": 4, "cli": 5}
MAX_LINES = 500


def _layer(module: str) -> str | None:
    """``synapse_nidstate.storage.reads`` -> ``storage``; the package itself -> None."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None


def _imports(path: Path, module: str) -> set[str]:
    """Modules of ours that ``path`` imports at run time (module or function level;
    imports under ``if TYPE_CHECKING:`` make no run-time dependency)."""
    tree = ast.parse(path.read_text())
    type_only: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            type_only.update(id(n) for stmt in node.body for n in ast.walk(stmt))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in type_only:
            continue
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            found.add(base)
            found.update(f"{base}.{a.name}" for a in node.names)
    return {m for m in found if m.startswith("synapse_nidstate")}


def _modules() -> dict[str, Path]:
    modules = {}
    for path in PACKAGE.rglob("*.py"):
        name = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        modules[name.removesuffix(".__init__")] = path
    return modules


class LayoutTests(unittest.TestCase):
    def test_every_top_level_part_has_a_rank(self) -> None:
        tops = {_layer(m) for m in _modules()} - {None}
        self.assertEqual(tops, set(RANKS))

    def test_imports_point_down(self) -> None:
        modules = _modules()
        wrong = []
        for module, path in modules.items():
            own = _layer(module)
            for target in _imports(path, module):
                while target not in modules:  # `from pkg import name` names no module
                    target = target.rpartition(".")[0]
                theirs = _layer(target)
                if own is None or theirs is None or own == theirs:
                    continue
                if RANKS[theirs] > RANKS[own]:
                    wrong.append(f"{module} imports {target}")
        self.assertEqual(wrong, [], "imports that point up the layers")

    def test_no_import_cycle(self) -> None:
        modules = _modules()
        graph: dict[str, set[str]] = {}
        for module, path in modules.items():
            edges = graph.setdefault(module, set())
            for target in _imports(path, module):
                while target not in modules:
                    target = target.rpartition(".")[0]
                # A module importing its own package (or the top package) runs
                # that package's __init__ first: no cycle through it.
                if target != module and not module.startswith(target + "."):
                    edges.add(target)
        try:
            graphlib.TopologicalSorter(graph).prepare()
        except graphlib.CycleError as e:
            self.fail(f"import cycle: {' -> '.join(e.args[1])}")

    def test_no_file_above_the_limit(self) -> None:
        long = {
            str(path.relative_to(PACKAGE)): n
            for path in PACKAGE.rglob("*.py")
            if (n := len(path.read_text().splitlines())) > MAX_LINES
        }
        self.assertEqual(long, {})

    def test_the_check_sees_an_upward_import(self) -> None:
        """The check is not vacuous: storage importing the runtime is caught."""
        source = "from synapse_nidstate.runtime.metrics import MirrorStats\n"
        scratch = Path(self.mktemp())
        scratch.mkdir()
        (scratch / "x.py").write_text(source)
        targets = _imports(scratch / "x.py", "synapse_nidstate.storage.x")
        self.assertIn("synapse_nidstate.runtime.metrics", targets)
        self.assertGreater(RANKS["runtime"], RANKS["storage"])
