"""The package boundaries ARCHITECTURE.md promises, checked on the source: who may import whom.

Every import counts, at module level or inside a function: a hidden import is still a dependency.
"""

import ast
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest
from conftest import REPO

PACKAGE = REPO / "irg"


def _module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """Every module ``path`` imports (absolute names; ``from irg import x`` counts as ``irg.x``)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


MODULES = {_module_name(p): _imports(p) for p in sorted(PACKAGE.rglob("*.py"))}


def _unit(module: str) -> str:
    """The part of the library a module belongs to: ``irg.model``, ``irg.train``, ``irg.tracking``, ..."""
    return ".".join(module.split(".")[:2])


def _importers_of(prefix: str, under: str) -> list[str]:
    return sorted(m for m, imported in MODULES.items() if m.startswith(under)
                  and any(name == prefix or name.startswith(prefix + ".") for name in imported))


def test_the_library_never_imports_the_cli():
    assert _importers_of("irg.cli", "irg.") == []


@pytest.mark.parametrize("package", ["irg.model", "irg.pipeline"])
def test_model_and_pipeline_import_no_ray(package):
    assert _importers_of("ray", package) == []


@pytest.mark.parametrize("module", ["irg.eval", "irg.registry", "irg.tracking"])
def test_evaluation_registry_and_tracking_do_not_import_training(module):
    assert _importers_of("irg.train", module) == []


def unit_graph(modules: dict[str, set[str]]) -> dict[str, set[str]]:
    """Which part of the library imports which other part."""
    units = {_unit(m) for m in modules if m != "irg"}
    graph = defaultdict(set)
    for module, imported in modules.items():
        for name in imported:
            target = next((u for u in units if name == u or name.startswith(u + ".")), None)
            if target and target != _unit(module) and module != "irg":
                graph[_unit(module)].add(target)
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    cycles = []

    def visit(node, path):
        for nxt in sorted(graph.get(node, ())):
            if nxt in path:
                cycles.append(path[path.index(nxt):] + [nxt])
            else:
                visit(nxt, path + [nxt])

    for unit in sorted(graph):
        visit(unit, [unit])
    return cycles


def test_no_import_cycle_between_the_parts_of_the_library():
    cycles = find_cycles(unit_graph(MODULES))
    assert not cycles, f"import cycles: {sorted({' -> '.join(c) for c in cycles})}"


def test_the_checker_finds_a_cycle_hidden_in_a_function(tmp_path):
    """The cycle this file guards against was hidden in a function (registry -> irg.train -> registry)."""
    registry, trainer = tmp_path / "registry.py", tmp_path / "trainer.py"
    registry.write_text("def f():\n    from irg.train.config import TrainConfig\n")
    trainer.write_text("from irg import registry\n")
    modules = {"irg.registry": _imports(registry), "irg.train.trainer": _imports(trainer)}
    assert find_cycles(unit_graph(modules)) == [["irg.registry", "irg.train", "irg.registry"],
                                                ["irg.train", "irg.registry", "irg.train"]]


@pytest.mark.parametrize("module", ["irg.train.export", "irg.train.checkpointing", "irg.train.engine",
                                    "irg.train.step", "irg.train", "irg.cli",
                                    "irg.tracking", "irg.registry", "irg.eval.run"])
def test_modules_that_need_no_cluster_import_no_ray(module):
    """Exporting a checkpoint, the CLI, tracking and the registry work where Ray is not installed."""
    code = f"import sys, {module}; print(sorted(m for m in sys.modules if m == 'ray' or m.startswith('ray.')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    assert out.stdout.strip() == "[]", f"{module} imports {out.stdout.strip()}"
