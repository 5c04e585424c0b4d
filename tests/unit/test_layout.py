"""The walls of DESIGN.md §2: the model knows nothing of Ray/DeepSpeed/MLflow/data_pipeline; `platform/` is a
source root, not a package; every package opens with a docstring."""

from __future__ import annotations

import ast
import itertools
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PURE_TORCH = [ROOT / "platform" / "dlmoe" / "model", ROOT / "platform" / "dlmoe" / "diffusion"]
FORBIDDEN = ("ray", "deepspeed", "mlflow", "data_pipeline", "operators", "kopf")


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


@pytest.mark.parametrize("folder", PURE_TORCH, ids=lambda p: p.name)
def test_model_and_objective_import_no_platform_libraries(folder: Path) -> None:
    files = sorted(folder.glob("*.py"))
    assert files
    for path in files:
        for module in imported_modules(path):
            assert module.split(".")[0] not in FORBIDDEN, f"{path.relative_to(ROOT)} imports {module}"


def test_platform_is_a_source_root_not_a_package() -> None:
    assert not (ROOT / "platform" / "__init__.py").exists()
    assert (ROOT / "platform" / "dlmoe" / "__init__.py").is_file()


def test_every_package_has_a_docstring() -> None:
    inits = [*(ROOT / "platform").rglob("__init__.py"), ROOT / "data_pipeline" / "__init__.py",
             ROOT / "operators" / "__init__.py"]
    for init in inits:
        assert ast.get_docstring(ast.parse(init.read_text())), f"{init.relative_to(ROOT)} has no docstring"


DLMOE = ROOT / "platform" / "dlmoe"


def _component(module: str) -> str | None:
    """The component of ``dlmoe`` a module belongs to: its subpackage or top-level module (``dlmoe.train``,
    ``dlmoe.config``), ``dlmoe`` for the package itself, ``None`` outside it."""
    parts = module.split(".")
    if parts[0] != "dlmoe":
        return None
    return ".".join(parts[:2])


def component_imports() -> dict[str, dict[str, str]]:
    """component → {component it imports: the first file that does}, counting every import in a file, those inside
    functions included (an import moved into a function to dodge a cycle is still an arrow)."""
    graph: dict[str, dict[str, str]] = {}
    for path in sorted(DLMOE.rglob("*.py")):
        relative = path.relative_to(ROOT / "platform").with_suffix("")
        source = _component(".".join(p for p in relative.parts if p != "__init__"))
        assert source is not None
        arrows = graph.setdefault(source, {})
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module == "dlmoe":
                targets = [f"dlmoe.{alias.name}" if (DLMOE / alias.name).exists() or
                           (DLMOE / f"{alias.name}.py").exists() else "dlmoe" for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                targets = [node.module]
            else:
                continue
            for target in filter(None, map(_component, targets)):
                if target not in (source, "dlmoe"):
                    arrows.setdefault(target, str(path.relative_to(ROOT)))
    return graph


def find_cycle(graph: dict[str, dict[str, str]]) -> list[str]:
    """One cycle of ``graph`` as the list of its nodes (first repeated last), or [] when it has none."""
    done: set[str] = set()

    def visit(node: str, path: list[str]) -> list[str]:
        if node in path:
            return [*path[path.index(node):], node]
        if node in done:
            return []
        for target in sorted(graph.get(node, {})):
            cycle = visit(target, [*path, node])
            if cycle:
                return cycle
        done.add(node)
        return []

    for start in sorted(graph):
        cycle = visit(start, [])
        if cycle:
            return cycle
    return []


def test_the_cycle_finder_finds_a_cycle() -> None:
    assert find_cycle({"a": {"b": "x"}, "b": {"c": "y"}, "c": {"a": "z"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b": "x"}, "b": {"c": "y"}, "c": {}}) == []


def test_no_import_cycle_between_the_components_of_dlmoe() -> None:
    graph = component_imports()
    assert {"dlmoe.train", "dlmoe.export", "dlmoe.checkpointing", "dlmoe.parallel"} <= set(graph)
    assert "dlmoe.checkpointing" in graph["dlmoe.export"]  # the scan sees the arrows it must judge
    cycle = find_cycle(graph)
    arrows = [f"{a} -> {b} ({graph[a][b]})" for a, b in itertools.pairwise(cycle)]
    assert not cycle, "import cycle: " + "; ".join(arrows)


def test_only_the_ray_launch_imports_the_training_loop() -> None:
    importers = []
    for folder in ("platform", "bench", "tests", "data_pipeline", "operators"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            if "dlmoe.train.worker" in imported_modules(path):
                importers.append(str(path.relative_to(ROOT)))
    assert importers == ["platform/dlmoe/train/driver.py"]
