"""The walls of DESIGN.md §2: the model knows nothing of Ray/DeepSpeed/MLflow/data_pipeline; `platform/` is a
source root, not a package; every package opens with a docstring."""

from __future__ import annotations

import ast
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
